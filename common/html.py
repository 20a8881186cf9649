"""Self-contained HTML for lensforge's reports (curation.html, captions.html, buckets.html, the demo's report.html).

Everything is inlined: charts and thumbnails as base64 data URIs, CSS in a <style> block, no scripts and no
external assets, so a report opens offline and can be mailed or archived as one file.

    from common.html import new_figure, figure_tag, table_html, write_page
    fig = new_figure(6, 3); fig.gca().plot([1, 2, 3])
    write_page("DATA/reports/x.html", "x", [("A chart", figure_tag(fig)), ("Rows", table_html(rows))])
"""

from __future__ import annotations

import base64
import io
import math
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from html import escape
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic import write_text
from common.decode import has_alpha, to_rgb

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
nav { font-size: .9em; color: #666; }
nav a { margin-right: .9em; }
a { color: #0550ae; text-decoration: none; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .2em .55em; text-align: left; vertical-align: top;
         max-width: 40em; overflow-wrap: anywhere; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.chart { max-width: 100%; height: auto; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; margin: .3em 0 1em; }
.thumbs figure { margin: 0; text-align: center; font-size: .75em; color: #666; }
.thumbs img { display: block; border: 1px solid #ccc; }
.note { color: #666; font-size: .9em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
"""


def new_figure(width: float = 7.0, height: float = 3.5) -> Figure:
    """A matplotlib Figure on the Agg canvas, outside pyplot's global state (safe in workers and threads)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_tag(fig: Figure, alt: str = "chart", dpi: int = 100) -> str:
    """The figure as an inline PNG <img>; the figure is closed (released from pyplot if pyplot made it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # PNG is rendered by Agg whatever backend pyplot picked
    pyplot = sys.modules.get("matplotlib.pyplot")  # never import pyplot ourselves: it picks a GUI backend
    if pyplot is not None:
        pyplot.close(fig)
    fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="chart" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def image_tag(pil_image, max_side: int = 128, title: str = "", alt: str | None = None) -> str:
    """A thumbnail (longest side ≤ max_side) as an inline <img>: JPEG, or PNG when the image has alpha.
    `title` is the hover text (newlines allowed); the caller's image is not modified."""
    img = pil_image
    alpha = has_alpha(img)
    img = img.convert("RGBA") if alpha else to_rgb(img)  # to_rgb: 16-bit and float modes scaled, not clipped
    w, h = img.size
    scale = min(1.0, max_side / max(w, h, 1))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, reducing_gap=3.0)
    buf = io.BytesIO()
    if alpha:
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        img.save(buf, format="JPEG", quality=80)
        mime = "image/jpeg"
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    alt = title.splitlines()[0] if alt is None and title else (alt or "image")
    return (
        f'<img src="data:{mime};base64,{data}" width="{size[0]}" height="{size[1]}" '
        f'alt="{escape(alt)}" title="{escape(title)}">'
    )


def _cell(value) -> tuple[str, bool]:
    """(escaped text, is numeric) of one table cell; null and NaN print empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", False
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        return f"{float(value):.4g}", True
    if isinstance(value, int) or type(value).__name__.startswith(("int", "uint")):
        return f"{int(value):,}", True
    return escape(str(value)), False


def table_html(rows, columns: Iterable[str] | None = None, html_columns: Collection[str] = ()) -> str:
    """An HTML table of `rows` (a list of dicts or a DataFrame). Cells are escaped except in `html_columns`,
    whose values are trusted HTML (e.g. an image_tag); numbers are right-aligned, floats to 4 digits."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
        columns = list(rows.columns) if columns is None else list(columns)
        rows = rows.to_dict("records")
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
    columns = list(columns)
    out = ["<table>", "<tr>" + "".join(f"<th>{escape(str(c))}</th>" for c in columns) + "</tr>"]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c) if isinstance(row, Mapping) else None
            if c in html_columns:
                cells.append(f"<td>{'' if value is None else value}</td>")
            else:
                text, numeric = _cell(value)
                cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """A complete, self-contained HTML page: `sections` are (heading, body HTML); an empty heading adds the body
    without a heading or a nav entry."""
    taken: set[str] = set()
    nav, body = [], []
    for heading, html in sections:
        if heading:
            slug = _slug(heading, taken)
            nav.append(f'<a href="#{slug}">{escape(heading)}</a>')
            body.append(f'<h2 id="{slug}">{escape(heading)}</h2>')
        body.append(html)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title>",
            f"<style>{CSS}</style>",
            "</head><body>",
            f"<h1>{escape(title)}</h1>",
            f"<nav>{''.join(nav)}</nav>" if len(nav) > 1 else "",
            *body,
            "</body></html>",
            "",
        ]
    )


def write_page(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write page(title, sections) to `path` atomically (temp file in the same folder, then rename), so a reader
    never sees half a report."""
    return write_text(path, page(title, sections))
