"""DATA/reports/curation.html: one self-contained page to audit a curation run.

    from curation.manifest import read_manifest
    write_report(Path("data"), read_manifest("data"), cfg)   # cfg: the CurateConfig the run used

The page holds the funnel (bar chart + table), one histogram per score column that has values with the configured
thresholds drawn in, a width×height scatter with the area and aspect limits, and thumbnails of kept images and of
the rejected ones per reason. Thumbnails are read from img2dataset's tars under DATA/download/ (manifest columns
`shard`, `member`), each tar opened once and only the chosen members decoded; rows without bytes get a table of
their URL and error instead.
"""

from __future__ import annotations

import tarfile
from html import escape
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.decode import decode_rgb
from common.html import figure_tag, image_tag, new_figure, table_html, write_page
from curation.config import CurateConfig
from curation.download import read_members
from curation.funnel import funnel
from curation.manifest import MANIFEST_COLUMNS, REJECT_REASONS, SCORE_COLUMNS

THUMB_SIDE = 128
FAILED_ROWS_SHOWN = 5  # URL/error rows listed per reason for rows that have no image bytes
SCATTER_MAX_POINTS = 20_000  # subsample above this: the PNG stays small and quick to render
LOG_SCALE_SCORES = ("blur",)  # variance of the Laplacian spans decades
COLORS = {"kept": "#2e7d32", "this": "#c62828", "other": "#9e9e9e"}
_GROUP_LABELS = {"kept": "kept", "this": "rejected by this score", "other": "rejected by another check"}


def thresholds(cfg: CurateConfig) -> dict[str, list[tuple[str, float]]]:
    """Per score column, the (config name, value) limits that reject a row on it."""
    m = cfg.models
    return {
        "blur": [("min_blur", cfg.min_blur)],
        "entropy": [("min_entropy", cfg.min_entropy)],
        "luminance": [("min_luminance", cfg.min_luminance), ("max_luminance", cfg.max_luminance)],
        "clip_score": [("models.min_clip_score", m.min_clip_score)],
        "aesthetic": [("models.min_aesthetic", m.min_aesthetic)],
        "nsfw": [("models.max_nsfw", m.max_nsfw)],
        "watermark": [("models.max_watermark", m.max_watermark)],
    }


def _mask(array: pa.ChunkedArray) -> np.ndarray:
    """A boolean arrow column as numpy, null = False."""
    return pc.fill_null(array.cast(pa.bool_()), False).to_numpy(zero_copy_only=False).astype(bool)


def _floats(array: pa.ChunkedArray) -> np.ndarray:
    """A numeric arrow column as float64 numpy, null = NaN."""
    return array.cast(pa.float64()).to_numpy(zero_copy_only=False)


# --- funnel -------------------------------------------------------------------------------------------------


def funnel_section(f: dict) -> str:
    total = f["total"]
    stages = list(f["reject_reasons"].items())
    if f["unexplained"]:
        stages.append(("(no reason)", f["unexplained"]))
    labels = [s for s, _ in stages] + ["kept"]
    counts = [n for _, n in stages] + [f["kept"]]

    fig = new_figure(8, 0.3 * len(labels) + 1.0)
    ax = fig.add_subplot()
    colors = [COLORS["this"]] * len(stages) + [COLORS["kept"]]
    ax.barh(labels, counts, color=colors)
    ax.invert_yaxis()  # check order, top to bottom
    for y, n in enumerate(counts):
        ax.annotate(f" {n:,} ({100 * n / total:.1f}%)" if total else " 0", (n, y), va="center", fontsize=8)
    ax.set_xlim(0, max(max(counts), 1) * 1.25)
    ax.set_xlabel(f"rows (of {total:,} input URLs)")
    ax.spines[["top", "right"]].set_visible(False)

    rows, remaining = [], total
    for stage, n in stages:
        remaining -= n
        rows.append({"stage": stage, "rows": n, "% of input": _pct(n, total), "remaining": remaining})
    rows.append({"stage": "kept", "rows": f["kept"], "% of input": _pct(f["kept"], total), "remaining": None})
    status = [{"status": s, "rows": n, "% of input": _pct(n, total)} for s, n in f["status"].items()]
    return "\n".join(
        [figure_tag(fig, alt="curation funnel"), "<h3>Rejections, in check order</h3>", table_html(rows),
         "<h3>Download status</h3>", table_html(status)]
    )


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


# --- scores -------------------------------------------------------------------------------------------------


def _score_histogram(name: str, values: np.ndarray, groups: dict[str, np.ndarray], limits) -> str:
    """Stacked histogram of one score: kept / rejected by this score / rejected by another check."""
    log = name in LOG_SCALE_SCORES and np.nanmax(values) > 0
    if log:
        floor = np.nanmin(values[values > 0])
        values = np.maximum(values, floor)  # zeros (flat images) land in the first bin
        bins = np.geomspace(floor, np.nanmax(values) * 1.001, 41)
    else:
        lo, hi = np.nanmin(values), np.nanmax(values)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    fig = new_figure(5.5, 2.8)
    ax = fig.add_subplot()
    ax.hist(
        [values[mask] for mask in groups.values()],
        bins=bins,
        stacked=True,
        color=[COLORS[g] for g in groups],
        label=[f"{_GROUP_LABELS[g]} ({int(mask.sum()):,})" for g, mask in groups.items()],
    )
    for (limit_name, value), style in zip(limits, ("--", ":")):
        ax.axvline(value, color="black", linestyle=style, linewidth=1.2, label=f"{limit_name} = {value:g}")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(name + (" (log)" if log else ""))
    ax.set_ylabel("rows")
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_tag(fig, alt=f"{name} histogram")


def scores_section(manifest: pa.Table, kept: np.ndarray, cfg: CurateConfig) -> str:
    limits = thresholds(cfg)
    charts, summary, not_run = [], [], []
    for name in SCORE_COLUMNS:
        values = _floats(manifest[name])
        scored = ~np.isnan(values)
        if not scored.any():
            not_run.append(name)
            continue
        by_this = _mask(pc.equal(manifest["reject_reason"], name))
        groups = {"kept": kept & scored, "this": by_this & scored, "other": ~kept & ~by_this & scored}
        v = values[scored]
        charts.append(_score_histogram(name, values, groups, limits[name]))
        summary.append(
            {"score": name, "rows scored": int(scored.sum()), "min": float(v.min()),
             "median": float(np.median(v)), "max": float(v.max()),
             "threshold": ", ".join(f"{k} = {x:g}" for k, x in limits[name]),
             "rejected by it": int(by_this.sum())}
        )
    parts = [table_html(summary)] if summary else []
    parts += charts
    if not_run:
        parts.append(f'<p class="note">Not run (no values): {", ".join(not_run)}.</p>')
    return "\n".join(parts)


# --- sizes --------------------------------------------------------------------------------------------------


def _sizes_section(manifest: pa.Table, kept: np.ndarray, cfg: CurateConfig) -> str:
    w, h = _floats(manifest["width"]), _floats(manifest["height"])
    valid = (w > 0) & (h > 0)  # NaN compares False
    if not valid.any():
        return '<p class="note">No decoded images: no sizes to plot.</p>'
    by_size = _mask(pc.is_in(manifest["reject_reason"], pa.array(["min_area", "aspect"])))
    groups = {
        "kept": kept & valid,
        "this": by_size & valid,
        "other": ~kept & ~by_size & valid,
    }
    labels = {"kept": "kept", "this": "rejected: min_area / aspect", "other": "rejected by another check"}
    rng = np.random.default_rng(0)
    n_valid = int(valid.sum())
    keep_frac = min(1.0, SCATTER_MAX_POINTS / n_valid)

    fig = new_figure(6, 5)
    ax = fig.add_subplot()
    for g, mask in groups.items():
        idx = np.flatnonzero(mask)
        if keep_frac < 1.0:
            idx = idx[rng.random(len(idx)) < keep_frac]
        ax.scatter(w[idx], h[idx], s=6, alpha=0.5, color=COLORS[g], label=f"{labels[g]} ({int(mask.sum()):,})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo = min(w[valid].min(), h[valid].min()) / 1.5
    hi = max(w[valid].max(), h[valid].max()) * 1.5
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    xs = np.geomspace(lo, hi, 200)
    if cfg.min_area > 0:
        ax.plot(xs, cfg.min_area / xs, "k--", linewidth=1, label=f"min_area = {cfg.min_area:,} px")
    ax.plot(xs, xs / cfg.max_aspect, "k:", linewidth=1, label=f"max_aspect = {cfg.max_aspect:g} (w/h)")
    ax.plot(xs, xs / cfg.min_aspect, "k-.", linewidth=1, label=f"min_aspect = {cfg.min_aspect:g} (w/h)")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    note = f"{n_valid:,} decoded images" + (f", {SCATTER_MAX_POINTS:,} sampled" if keep_frac < 1.0 else "")
    return figure_tag(fig, alt="width by height scatter") + f'<p class="note">{note}.</p>'


# --- thumbnails ---------------------------------------------------------------------------------------------


def _hover(row: dict) -> str:
    lines = [row["key"], row["reject_reason"] or "kept"]
    if row["width"] and row["height"]:
        lines.append(f"{row['width']}×{row['height']}")
    scores = [f"{s} {row[s]:.4g}" for s in SCORE_COLUMNS if row[s] is not None]
    lines += scores
    if row["dup_of"]:
        lines.append(f"dup_of {row['dup_of']}")
    return "\n".join(lines)


def download_thumbnails(download_dir: Path, where: dict, max_side: int, title=None) -> dict:
    """{id: <img> tag, or an error text starting with 'thumbnail: '} for ids located at (shard, member) in the
    DATA/download tars; each tar is opened once (curation.download.read_members). `title(id)` gives hover text.
    Shared by every report that shows downloaded images (curation, captions)."""
    wanted: dict[str, dict[str, object]] = defaultdict(dict)
    for ident, (shard, member) in where.items():
        wanted[shard][member] = ident
    out: dict = {}
    for shard, members in wanted.items():
        try:
            blobs = read_members(download_dir / shard, list(members))
        except (OSError, tarfile.TarError) as err:
            out.update({ident: f"thumbnail: cannot read {shard}: {err}" for ident in members.values()})
            continue
        for member, ident in members.items():
            if member not in blobs:
                out[ident] = f"thumbnail: {member} not in {shard}"
                continue
            try:
                img = decode_rgb(blobs[member], draft=max_side * 2)  # as the filters saw it; JPEG at reduced scale
                hover = title(ident) if title else str(ident)
                out[ident] = image_tag(img, max_side=max_side, title=hover, alt=str(ident))
            except Exception as err:  # a corrupt member must not sink the whole report
                out[ident] = f"thumbnail: cannot decode {member}: {err}"
    return out


def _read_thumbnails(download_dir: Path, rows: dict[int, dict], max_side: int) -> dict[int, str]:
    """{row index: <img> tag, or an error text starting with 'thumbnail: '}."""
    where = {i: (row["shard"], row["member"]) for i, row in rows.items()}
    return download_thumbnails(download_dir, where, max_side, title=lambda i: _hover(rows[i]))


def _pick(manifest: pa.Table, kept: np.ndarray, n: int, reasons: list[str]) -> dict[str, tuple[list, list]]:
    """Per group ('kept' and each reason with rows): (first n row indices with image bytes, first few without)."""
    has_bytes = _mask(pc.and_(pc.is_valid(manifest["shard"]), pc.is_valid(manifest["member"])))
    groups = {"kept": kept} | {r: _mask(pc.equal(manifest["reject_reason"], r)) & ~kept for r in reasons}
    picked = {}
    for g, mask in groups.items():
        with_img = np.flatnonzero(mask & has_bytes)[:n].tolist()
        without = np.flatnonzero(mask & ~has_bytes)[:FAILED_ROWS_SHOWN].tolist()
        if with_img or without:
            picked[g] = (with_img, without)
    return picked


def _group_html(title: str, count: int, idx_img: list, idx_none: list, rows: dict, tags: dict) -> str:
    figures, failed = [], []
    for i in idx_img:
        tag = tags[i]
        if tag.startswith("<img"):
            figures.append(f"<figure>{tag}<figcaption>{escape(rows[i]['key'])}</figcaption></figure>")
        else:
            failed.append(rows[i] | {"error": tag})
    failed += [rows[i] for i in idx_none]
    parts = [f"<h3>{escape(title)} — {count:,} row{'' if count == 1 else 's'}</h3>"]
    if figures:
        parts.append(f'<div class="thumbs">{"".join(figures)}</div>')
    if failed:
        parts.append('<p class="note">No image for these rows:</p>')
        parts.append(table_html(failed, columns=["key", "status", "url", "error"]))
    return "\n".join(parts)


def _thumbnail_sections(data_dir: Path, manifest: pa.Table, kept: np.ndarray, f: dict, n: int):
    reasons = [r for r, c in f["reject_reasons"].items() if c]
    picked = _pick(manifest, kept, n, reasons)
    all_idx = sorted({i for a, b in picked.values() for i in a + b})
    cols = ["key", "url", "status", "error", "width", "height", *SCORE_COLUMNS, "dup_of", "reject_reason",
            "shard", "member"]
    taken = manifest.select(cols).take(pa.array(all_idx, pa.int64())).to_pylist()
    rows = dict(zip(all_idx, taken))
    with_img = {i: rows[i] for a, _ in picked.values() for i in a}
    tags = _read_thumbnails(data_dir / "download", with_img, THUMB_SIDE)

    kept_html = '<p class="note">No kept rows.</p>'
    if "kept" in picked:
        kept_html = _group_html("kept", f["kept"], *picked["kept"], rows, tags)
    rejected = [_group_html(r, f["reject_reasons"][r], *picked[r], rows, tags) for r in reasons if r in picked]
    zero = [r for r in REJECT_REASONS if not f["reject_reasons"].get(r)]
    if zero:
        rejected.append(f'<p class="note">No rows rejected by: {", ".join(zero)}.</p>')
    note = f'<p class="note">Up to {n} per group, in manifest order; hover an image for its key and scores.</p>'
    return note + kept_html, note + "\n".join(rejected)


# --- the page -----------------------------------------------------------------------------------------------


def _config_section(cfg: CurateConfig) -> str:
    rows = [{"setting": k, "value": v} for k, v in
            [("min_area", cfg.min_area), ("min_aspect", cfg.min_aspect), ("max_aspect", cfg.max_aspect)]]
    rows += [{"setting": k, "value": v} for limits in thresholds(cfg).values() for k, v in limits]
    return table_html(rows)


def write_report(
    data_dir: Path,
    manifest: pa.Table,
    cfg: CurateConfig,
    out: Path | None = None,
    thumbs_per_reason: int = 8,
    summary: dict | None = None,
) -> Path:
    """Write the curation report (default DATA/reports/curation.html, atomically) and return its path.
    `cfg` should be the config the manifest was made with: its thresholds are drawn on the charts. `summary`: the
    whole manifest's funnel when `manifest` is a sample of its rows (curate: the parts' first rows per group and
    an even sample; the charts then say so)."""
    data_dir = Path(data_dir)
    out = Path(out) if out is not None else data_dir / "reports" / "curation.html"
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.column_names]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing}; see curation/manifest.py MANIFEST_SCHEMA")
    manifest = manifest.select(list(MANIFEST_COLUMNS))  # extra carried-through columns are not reported

    f = summary or funnel(manifest)
    kept = _mask(manifest["keep"])
    kept_html, rejected_html = _thumbnail_sections(data_dir, manifest, kept, f, thumbs_per_reason)
    sampled = manifest.num_rows < f["total"]
    intro = (
        f'<p>{f["total"]:,} input URLs, {f["kept"]:,} kept ({100 * f["kept_fraction"]:.1f}%). '
        f"Data: <code>{escape(str(data_dir))}</code></p>"
        + (f'<p class="note">Charts and images over a sample of {manifest.num_rows:,} rows; counts over all.</p>'
           if sampled else "")
    )
    sections = [
        ("", intro),
        ("Funnel", funnel_section(f)),
        ("Scores", scores_section(manifest, kept, cfg)),
        ("Image sizes", _sizes_section(manifest, kept, cfg)),
        ("Kept images", kept_html),
        ("Rejected images", rejected_html),
        ("Thresholds", _config_section(cfg)),
    ]
    return write_page(out, "lensforge curation report", sections)
