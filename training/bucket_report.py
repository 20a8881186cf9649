"""Samples per aspect bucket: a terminal table and DATA/reports/buckets.html (common/html.py helpers).

    print(format_buckets(index, changes))
    write_bucket_report(data / "reports" / "buckets.html", set_dir, index, changes, skipped, errors, estimate)

`index` is the shard set's index.parquet; `changes` the small buckets that were merged or dropped (never silently:
both the terminal and the page list them); `skipped` the keys without every caption variant; `errors` the samples
that could not be made.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from common.html import figure_tag, new_figure, table_html, write_page

ERRORS_SHOWN = 50


def bucket_rows(index: pd.DataFrame, changes: list[dict]) -> list[dict]:
    """One row per bucket that holds samples or lost them: samples, shards, share, and what happened to it."""
    total = int(index["samples"].sum()) or 1
    per = index.groupby(["bucket", "base", "ratio"], sort=False).agg(samples=("samples", "sum"),
                                                                      shards=("shard", "count"))
    rows = [{"bucket": b, "base": f"{base}²", "ratio": r, "samples": int(x.samples), "shards": int(x.shards),
             "share": f"{100 * x.samples / total:.1f}%", "note": ""} for (b, base, r), x in per.iterrows()]
    merged_in = Counter()
    for c in changes:
        if c["into"]:
            merged_in[c["into"]] += c["samples"]
    for row in rows:
        if merged_in[row["bucket"]]:
            row["note"] = f"+{merged_in[row['bucket']]} merged in"
    for c in changes:
        note = f"merged into {c['into']}" if c["into"] else "dropped (too few samples)"
        rows.append({"bucket": c["bucket"], "base": "", "ratio": "", "samples": 0, "shards": 0, "share": "",
                     "note": f"{c['samples']} {note}"})
    return sorted(rows, key=lambda r: (-r["samples"], r["bucket"]))


def format_buckets(index: pd.DataFrame, changes: list[dict]) -> str:
    rows = bucket_rows(index, changes)
    cols = ["bucket", "base", "ratio", "samples", "shards", "share", "note"]
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = lambda values: "  ".join(v.rjust(w) if i in (3, 4, 5) else v.ljust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    return "\n".join(["samples per bucket:", line(cols), *(line(r) for r in cells)])


def _chart(index: pd.DataFrame) -> str:
    if index.empty:
        return "<p class='note'>no samples</p>"
    per = index.groupby(["base", "ratio"], sort=True)["samples"].sum().reset_index()
    ratios = list(dict.fromkeys(per.sort_values("ratio", key=lambda s: s.map(_ratio_value))["ratio"]))
    bases = sorted(per["base"].unique())
    fig = new_figure(8, 3.2)
    ax = fig.add_subplot()
    width = 0.8 / len(bases)
    for j, base in enumerate(bases):
        sub = per[per["base"] == base].set_index("ratio")["samples"]
        ax.bar([i + j * width for i in range(len(ratios))], [int(sub.get(r, 0)) for r in ratios], width,
               label=f"{base}²")
    ax.set_xticks([i + width * (len(bases) - 1) / 2 for i in range(len(ratios))], ratios)
    ax.set_xlabel("ratio (width:height)")
    ax.set_ylabel("samples")
    ax.legend(title="base area")
    return figure_tag(fig, "samples per bucket")


def _ratio_value(ratio: str) -> float:
    w, _, h = ratio.partition(":")
    return int(w) / int(h)


def write_bucket_report(path: str | Path, set_dir: Path, index: pd.DataFrame, changes: list[dict],
                        skipped: Counter, errors: pd.DataFrame, estimate: dict) -> Path:
    summary = [{"shard set": str(set_dir), "samples": int(index["samples"].sum()), "shards": len(index),
                "bytes": int(index["bytes"].sum()), "errors": len(errors), "skipped (captions)": sum(skipped.values()),
                "estimated bytes/sample": round(estimate["per_sample"]),
                "padded fp32 bytes/sample": round(estimate["padded_fp32_per_sample"])}]
    sections = [
        ("Summary", table_html(summary)),
        ("Samples per bucket", _chart(index) + table_html(bucket_rows(index, changes))),
        ("Small buckets", table_html(changes) if changes else "<p class='note'>none: no bucket was under "
                                                              "min_bucket_samples</p>"),
        ("Skipped keys", table_html([{"reason": k, "keys": v} for k, v in skipped.items()]) if skipped else
         "<p class='note'>none: every kept image had every requested caption variant</p>"),
        ("Errors", (table_html(errors.head(ERRORS_SHOWN)) + (f"<p class='note'>first {ERRORS_SHOWN} of "
                                                            f"{len(errors)}; all in errors.parquet</p>"
                                                            if len(errors) > ERRORS_SHOWN else ""))
         if len(errors) else "<p class='note'>none</p>"),
    ]
    return write_page(path, "Precompute: aspect buckets", sections)
