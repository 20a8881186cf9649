"""Caption statistics per variant, for the terminal and for DATA/reports/captions.html.

    from captioning.stats import caption_stats, format_stats, write_captions_report
    print(format_stats(caption_stats("data")))
    write_captions_report("data")          # -> data/reports/captions.html

Statistics are taken over the latest attempt per (key, variant) (`schema.latest_captions`: the ok row when any
attempt succeeded), except cost, which sums every attempt: a failed or refused request is still paid for. A variant
captioned by several models or prompt versions is reported once per source, as `dense (model, prompt_id)`, so a
comparison of captioners never mixes them.

Words per caption are counted as the caption checks count them (`checks.words`: whitespace-separated), so the
histograms line up with the presets' word ranges; vocabulary and nouns use a regex tokenizer (letters/digits,
inner apostrophes and hyphens kept), lower-cased.
"Nouns per caption" is a PROXY, not a parse: the number of caption words found in a fixed list of common concrete
nouns (below) plus the shapes of the synthetic scene world, with a plural -s/-es stripped. It undercounts nouns
outside the list and counts a listed word even where it is used as a verb or adjective ("a star-shaped sign"
counts sign but not star-shaped; "to table a motion" counts table). It is meant to compare variants and prompt
versions on the same images, e.g. dense against short, not to be read as an absolute noun count. No NLP model or
download is involved.
"""

from __future__ import annotations

import re
from collections import defaultdict
from html import escape
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from captioning.checks import words as word_count
from captioning.schema import (
    SOURCE_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_REFUSED,
    latest_captions,
    read_captions,
)
from common.html import figure_tag, new_figure, table_html, write_page
from curation.manifest import read_manifest
from curation.report import download_thumbnails

WORD_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
HIST_MAX_BINS = 30
SAMPLES = 12
THUMB_SIDE = 160

# Common concrete, picturable nouns (people, animals, objects, places, nature, food, vehicles, clothing), singular.
CONCRETE_NOUNS = frozenset(
    """
    man woman person people child boy girl baby family crowd player face hand hair eye head arm leg
    dog cat bird horse cow sheep fish animal duck chicken pig bear elephant giraffe zebra lion tiger insect
    car truck bus bicycle bike motorcycle train boat ship airplane plane vehicle wheel road street highway bridge
    house building home room wall floor roof window door stairs kitchen bathroom bedroom office church tower city
    table chair sofa couch bed desk shelf lamp clock mirror cup mug glass bottle plate bowl fork knife spoon
    book paper sign poster logo text letter word screen phone computer laptop keyboard camera television tv
    shirt dress hat cap jacket coat shoe boot bag backpack umbrella glasses watch ring
    tree flower plant grass leaf forest garden field mountain hill rock stone river lake sea ocean beach sand
    sky cloud sun moon water snow ice fire light shadow
    apple banana orange fruit vegetable bread cake pizza sandwich food drink coffee
    ball toy box basket flag fence pole post bench park market shop store
    circle square triangle star rectangle shape object background pattern line stripe dot
    """.split()
)


def nouns() -> frozenset[str]:
    """The proxy's noun list: CONCRETE_NOUNS plus the synthetic scene world's shape names."""
    from scenes.scene import SHAPES  # the scene world owns its vocabulary; imported lazily (pure data)

    return CONCRETE_NOUNS | frozenset(SHAPES)


def words(text: str) -> list[str]:
    """Lower-cased words of `text`: "A red-orange star's edge." -> ["a", "red-orange", "star's", "edge"]."""
    return WORD_RE.findall(text.lower())


def noun_count(tokens: list[str], vocab: frozenset[str]) -> int:
    """How many tokens are in `vocab`, directly or after dropping a plural -s / -es (see the module docstring)."""
    n = 0
    for w in tokens:
        if w in vocab or (w.endswith("s") and w[:-1] in vocab) or (w.endswith("es") and w[:-2] in vocab):
            n += 1
    return n


def _histogram(counts: np.ndarray) -> dict:
    """Integer-aligned bins: [edges[i], edges[i+1]) words, at most HIST_MAX_BINS of them."""
    top = int(counts.max()) if counts.size else 0
    width = max(1, -(-(top + 1) // HIST_MAX_BINS))
    edges = np.arange(0, top + width + 1, width)
    hist, _ = np.histogram(counts, bins=edges)
    return {"edges": edges.tolist(), "counts": hist.tolist()}


def _variant_stats(table: pa.Table, attempts: pa.Table, vocab: frozenset[str]) -> dict:
    """Statistics of one variant: `table` its latest rows, `attempts` all of its rows."""
    status = table["status"].to_pylist()
    n = len(status)
    texts = [t for t, s in zip(table["text"].to_pylist(), status) if s == STATUS_OK and t is not None]
    tokenized = [words(t) for t in texts]
    counts = np.array([word_count(t) for t in texts], dtype=np.int64)
    cost = pc.sum(attempts["cost_usd"]).as_py() or 0.0
    out = {
        "count": n,
        "ok": len(texts),
        "refused": status.count(STATUS_REFUSED),
        "error": status.count(STATUS_ERROR),
        "refusal_rate": status.count(STATUS_REFUSED) / n if n else 0.0,
        "error_rate": status.count(STATUS_ERROR) / n if n else 0.0,
        "attempts": attempts.num_rows,
        "cost_usd": float(cost),
        "words_mean": float(counts.mean()) if counts.size else None,
        "words_median": float(np.median(counts)) if counts.size else None,
        "words_p5": float(np.percentile(counts, 5)) if counts.size else None,
        "words_p95": float(np.percentile(counts, 95)) if counts.size else None,
        "words_hist": _histogram(counts),
        "vocabulary": len({w for t in tokenized for w in t}),
        "nouns_per_caption": (float(np.mean([noun_count(t, vocab) for t in tokenized])) if tokenized else None),
    }
    return out


def caption_stats(data: str | Path) -> dict[str, dict]:
    """{variant: statistics} over DATA/captions (see the module docstring for what each number means).

    Per variant: count (keys with a row), ok / refused / error counts and refusal_rate / error_rate (of count,
    latest attempt), attempts (rows over all attempts), cost_usd (all attempts), words_mean / _median / _p5 /
    _p95 and words_hist {"edges", "counts"} over ok captions, vocabulary (distinct words over ok captions) and
    nouns_per_caption (the proxy, mean over ok captions). Variants in name order; {} when there are no captions.
    """
    latest = by_source(latest_captions(data))
    every = by_source(read_captions(data, columns=["variant", "cost_usd", *SOURCE_COLUMNS]))
    vocab = nouns()
    out = {}
    for variant in sorted(set(latest["variant"].to_pylist())):
        out[variant] = _variant_stats(
            latest.filter(pc.equal(latest["variant"], variant)),
            every.filter(pc.equal(every["variant"], variant)),
            vocab,
        )
    return out


def by_source(table: pa.Table) -> pa.Table:
    """`table` with `variant` relabelled `variant (model, prompt_id)` where it comes from several sources."""
    df = table.select(["variant", *SOURCE_COLUMNS]).to_pandas()
    sources = df.drop_duplicates().groupby("variant").size()
    several = set(sources[sources > 1].index)
    labels = [f"{v} ({m}, {p})" if v in several else v for v, m, p in zip(df["variant"], df["model"], df["prompt_id"])]
    return table.set_column(table.schema.get_field_index("variant"), "variant", pa.array(labels, pa.string()))


def _stats_rows(stats: dict[str, dict]) -> list[dict]:
    rows = []
    for variant, s in stats.items():
        rows.append(
            {
                "variant": variant, "count": s["count"], "ok": s["ok"],
                "refused %": 100 * s["refusal_rate"], "error %": 100 * s["error_rate"],
                "words mean": s["words_mean"], "median": s["words_median"], "p5": s["words_p5"],
                "p95": s["words_p95"], "vocabulary": s["vocabulary"], "nouns/caption*": s["nouns_per_caption"],
                "attempts": s["attempts"], "cost $": s["cost_usd"],
            }
        )
    return rows


def format_stats(stats: dict[str, dict]) -> str:
    """A fixed-width table of caption_stats() for the terminal."""
    if not stats:
        return "no captions yet"
    rows = _stats_rows(stats)
    cols = list(rows[0])

    def cell(v, col: str) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.4f}" if col.startswith("cost") else f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[cell(r[c], c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    total = sum(s["cost_usd"] for s in stats.values())
    lines.append(f"total cost ${total:,.4f}; * nouns/caption is a word-list proxy (captioning/stats.py)")
    return "\n".join(lines)


# --- the report ---------------------------------------------------------------------------------------------


def words_histograms(stats: dict[str, dict]) -> str:
    charts = []
    for variant, s in stats.items():
        h = s["words_hist"]
        if not s["ok"]:
            continue
        fig = new_figure(4.2, 2.6)
        ax = fig.add_subplot()
        ax.stairs(h["counts"], h["edges"], fill=True, color="#0550ae", alpha=0.8)
        ax.axvline(s["words_median"], color="black", linestyle="--", linewidth=1,
                   label=f"median {s['words_median']:g}")
        ax.set_title(f"{variant} ({s['ok']:,} ok captions)", fontsize=10)
        ax.set_xlabel("words per caption")
        ax.set_ylabel("captions")
        ax.legend(fontsize=7, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        charts.append(f"<figure>{figure_tag(fig, alt=f'{variant} words per caption')}</figure>")
    if not charts:
        return '<p class="note">No ok captions yet.</p>'
    return f'<div class="thumbs">{"".join(charts)}</div>'


def _thumbnails(download_dir: Path, where: dict[str, tuple[str, str]], max_side: int) -> dict[str, str]:
    """{key: <img> tag or a 'no image: ...' note} for keys located at (shard, member) in DATA/download tars."""
    tags = download_thumbnails(download_dir, where, max_side)
    return {k: ("no image: " + v[len("thumbnail: "):] if v.startswith("thumbnail: ") else v) for k, v in tags.items()}


def _samples(data: Path, latest: pa.Table, n: int, max_side: int) -> str:
    ok = latest.filter(pc.equal(latest["status"], STATUS_OK))
    keys = sorted(set(ok["key"].to_pylist()))
    if not keys:
        return '<p class="note">No ok captions yet.</p>'
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(keys, size=min(n, len(keys)), replace=False).tolist())
    variants = sorted(set(ok["variant"].to_pylist()))
    texts: dict[str, dict[str, str]] = defaultdict(dict)
    for row in ok.filter(pc.is_in(ok["key"], pa.array(picked))).select(["key", "variant", "text"]).to_pylist():
        texts[row["key"]][row["variant"]] = row["text"]
    try:
        manifest = read_manifest(data, columns=["key", "shard", "member"])
        manifest = manifest.filter(pc.is_in(manifest["key"], pa.array(picked)))
        where = {r["key"]: (r["shard"], r["member"]) for r in manifest.to_pylist() if r["shard"] and r["member"]}
    except FileNotFoundError:
        where = {}
    tags = _thumbnails(data / "download", where, max_side)
    rows = []
    for key in picked:
        tag = tags.get(key, "no image: not in the manifest")
        image = tag if tag.startswith("<img") else escape(tag)
        rows.append({"key": key, "image": image} | {v: texts[key].get(v) for v in variants})
    note = f'<p class="note">{len(picked)} keys with at least one ok caption, picked at random (seed 0).</p>'
    return note + table_html(rows, columns=["key", "image", *variants], html_columns={"image"})


def write_captions_report(data: str | Path, out: str | Path | None = None, samples: int = SAMPLES,
                          thumb_side: int = THUMB_SIDE) -> Path:
    """Write DATA/reports/captions.html (or `out`), atomically and self-contained: the statistics table,
    words-per-caption histograms per variant and `samples` image/caption pairs (thumbnails from DATA/download
    via the manifest's shard/member columns). Returns the path."""
    data = Path(data)
    out = Path(out) if out is not None else data / "reports" / "captions.html"
    stats = caption_stats(data)
    latest = by_source(latest_captions(data))
    total = sum(s["cost_usd"] for s in stats.values())
    intro = (
        f"<p>{latest.num_rows:,} (key, variant) pairs over {len(set(latest['key'].to_pylist())):,} keys, "
        f"{len(stats)} variant(s); total cost ${total:,.4f} (every attempt). "
        f"Data: <code>{escape(str(data))}</code></p>"
    )
    proxy = ('<p class="note">* nouns/caption is a proxy: words found in a fixed list of common concrete nouns '
             "and the scene world's shapes (plural -s/-es stripped); compare variants with it, do not read it as a "
             "parse. Rates are of the latest attempt per key; cost sums every attempt.</p>")
    sections = [
        ("", intro),
        ("Statistics", table_html(_stats_rows(stats)) + proxy if stats else '<p class="note">No captions.</p>'),
        ("Words per caption", words_histograms(stats)),
        ("Samples", _samples(data, latest, samples, thumb_side)),
    ]
    return write_page(out, "lensforge captions report", sections)
