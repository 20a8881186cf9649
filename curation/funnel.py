"""The curation funnel: how many input URLs each check removed, in the order the checks run.

    f = funnel(read_manifest("data"))
    print(format_funnel(f))
    write_funnel_json(f, "data/reports/funnel.json")
    print(funnel_hint(f, cfg) or "")  # a check that removed everything (or nearly): its threshold, its setting

Reject reasons are counted among the rows that were not kept, so `kept + sum(reject_reasons) + unexplained ==
total` always holds; `unexplained` (not kept, no reason) is 0 in a finished manifest and counts rows whose
filters have not run yet or whose reason is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from common.atomic import write_json
from curation.filters import hint
from curation.manifest import REJECT_REASONS, STATUSES

if TYPE_CHECKING:
    import pandas as pd

    from curation.config import CurateConfig

NEARLY_ALL = 0.9  # a check that removes this share of the rows reaching it gets a hint, even when some are kept
HINT_MIN_ROWS = 10  # ... when at least this many reached it
NULL_LABEL = "(null)"  # JSON keys are strings: how a null status or an unknown null is counted
_FUNNEL_COLUMNS = ("status", "keep", "reject_reason")


def _counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    out = {}
    for item in pc.value_counts(column).to_pylist():
        value = item["values"]
        out[NULL_LABEL if value is None else str(value)] = int(item["counts"])
    return out


def funnel(manifest: pa.Table | pd.DataFrame) -> dict:
    """Counts of a manifest (extra columns ignored):

    {"total": int,
     "status": {status: count} — every STATUSES entry, zeros included, then any other value seen,
     "reject_reasons": {reason: count} — REJECT_REASONS order, zeros included, then any unknown reason,
     "unexplained": int, "kept": int, "kept_fraction": float}
    """
    if not isinstance(manifest, pa.Table):  # a pandas DataFrame
        missing = [c for c in _FUNNEL_COLUMNS if c not in manifest.columns]
        if missing:
            raise ValueError(f"manifest lacks column(s) {missing}")
        manifest = pa.Table.from_pandas(manifest[list(_FUNNEL_COLUMNS)], preserve_index=False)
    missing = [c for c in _FUNNEL_COLUMNS if c not in manifest.column_names]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing}")

    total = manifest.num_rows
    kept_mask = pc.fill_null(manifest["keep"].cast(pa.bool_()), False)
    kept = int(pc.sum(kept_mask).as_py() or 0)
    rejected = manifest.filter(pc.invert(kept_mask))

    seen_status = _counts(manifest["status"])
    status = {s: seen_status.pop(s, 0) for s in STATUSES} | seen_status

    seen_reasons = _counts(rejected["reject_reason"])
    unexplained = seen_reasons.pop(NULL_LABEL, 0)
    reasons = {r: seen_reasons.pop(r, 0) for r in REJECT_REASONS} | seen_reasons

    return {
        "total": total,
        "status": status,
        "reject_reasons": reasons,
        "unexplained": unexplained,
        "kept": kept,
        "kept_fraction": kept / total if total else 0.0,
    }


def merge_funnels(parts: list[dict]) -> dict:
    """The funnel of a manifest from its parts' funnels (`funnel` per part): counts add up."""
    out = {"total": 0, "status": {s: 0 for s in STATUSES}, "reject_reasons": {r: 0 for r in REJECT_REASONS},
           "unexplained": 0, "kept": 0}
    for f in parts:
        for name in ("total", "unexplained", "kept"):
            out[name] += f[name]
        for group in ("status", "reject_reasons"):
            for k, n in f[group].items():
                out[group][k] = out[group].get(k, 0) + n
    out["kept_fraction"] = out["kept"] / out["total"] if out["total"] else 0.0
    return out


def format_funnel(f: dict) -> str:
    """A compact terminal table: one line per reject reason in check order, with the share of the input it
    removed and how many rows remain after it, ending at the kept count."""
    total = f["total"]

    def pct(n: int) -> str:
        return f"{100.0 * n / total:.1f}%" if total else "-"

    status = "  ".join(f"{s} {n:,}" for s, n in f["status"].items() if n or s in STATUSES)
    rows = [("input", f"{total:,}", pct(total), f"{total:,}")]
    remaining = total
    for reason, n in f["reject_reasons"].items():
        remaining -= n
        rows.append((reason, f"{n:,}", pct(n), f"{remaining:,}"))
    if f.get("unexplained"):
        remaining -= f["unexplained"]
        rows.append(("(no reason)", f"{f['unexplained']:,}", pct(f["unexplained"]), f"{remaining:,}"))
    rows.append(("kept", f"{f['kept']:,}", pct(f["kept"]), ""))

    header = ("stage", "rows", "% input", "remaining")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join([r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in range(1, 4))]).rstrip()

    rule = "-" * len(line(header))
    body = [line(r) for r in rows]
    return "\n".join([f"status: {status}", line(header), rule, *body[:-1], rule, body[-1]])


def write_funnel_json(f: dict, path: str | Path) -> Path:
    """Write the funnel as indented JSON, atomically (temp file + rename)."""
    return write_json(path, f, indent=2)


def funnel_hint(f: dict, cfg: CurateConfig) -> str | None:
    """One line naming the check, its threshold and the setting to change, when nothing was kept (the check that
    removed the most) or when one check removed NEARLY_ALL of the rows that reached it; else None."""
    checks, reaching = [], f["total"]  # (reason, rows it removed, rows that reached it), in check order
    for reason, n in f["reject_reasons"].items():
        checks.append((reason, n, reaching))
        reaching -= n
    if f["total"] and f["kept"] == 0:
        reason, n, _ = max(checks, key=lambda c: c[1])
        if not n:  # no reason recorded (a manifest of rows not yet filtered)
            return f"curate: kept 0 of {f['total']}"
        why = hint(reason, cfg)
        others = ", ".join(f"{r} {k}" for r, k, _ in checks if k and r != reason)
        return (f"curate: kept 0 of {f['total']}: {reason} rejected {n}" + (f" ({why[0]}); {why[1]}" if why else "")
                + (f"; also {others}" if others else ""))
    for reason, n, seen in checks:
        why = hint(reason, cfg)
        if why and seen >= HINT_MIN_ROWS and n >= NEARLY_ALL * seen:
            return f"curate: {reason} rejected {n} of the {seen} rows that reached it ({why[0]}); {why[1]}"
    return None
