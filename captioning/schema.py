"""The captions table: DATA/captions/part-*.parquet, long format, one row per attempt at (key, variant).

This module owns the schema (ARCHITECTURE.md, "Captions"), how a part is written and which captions a stage reads;
precompute and training import it from here. A caption is identified by (key, variant, model, prompt_id): `model`
is the captioner as configured (`caption.model`, or the Azure deployment), `served_model` what the endpoint said
answered (e.g. a dated snapshot), `prompt_id` the preset's name and version hash. A (key, variant) already `ok`
for the configured model and prompt is never requested again; a new model or prompt captions anew, beside the old
rows, and `choose_sources` says which captions a stage reads; `read_captions_range` reads one key range (a manifest
part's), for the stages that plan per part. Only `part-*.parquet` files are the table: sidecar folders beside them
start with `_` (`_journal/`, `_batches/`), which pyarrow datasets and pandas skip, and hold no .parquet files, which
Ray Data's read_parquet skips by extension.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from common.atomic import atomic_path

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_REFUSED = "refused"
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_REFUSED)

# `alt` is the manifest's original alt text, never requested: precompute reads it from the manifest.
ALT_VARIANT = "alt"

CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # the manifest key
        pa.field("variant", pa.string(), nullable=False),  # prompt preset name: dense, medium, short, tags, ...
        pa.field("text", pa.string()),  # null unless status ok
        pa.field("model", pa.string()),  # the captioner as configured: what pending work and stages key on
        pa.field("prompt_id", pa.string()),  # "<preset>@<version hash>"
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("latency_s", pa.float64()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),  # why, when status is error or refused
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("served_model", pa.string()),  # the response's `model` (null in parts written before it existed)
    ]
)
CAPTION_COLUMNS = tuple(CAPTIONS_SCHEMA.names)
LATER_COLUMNS = ("served_model",)  # added since the first parts and journals were written: may be missing there


def captions_dir(data: str | Path) -> Path:
    return Path(data) / "captions"


def write_part(path: Path, rows: list[dict], metadata: dict[bytes, bytes] | None = None) -> Path:
    """Rows → one part at `path`, atomically: written to a hidden temporary name in the same folder, fsynced, renamed,
    and the folder fsynced, so neither a reader nor a crash ever sees half a part. `metadata` goes into the Parquet
    schema's key-value metadata (the journal's compaction records there which journal lines the part holds)."""
    table = pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, tmp)
    return path


def read_captions(data: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every caption row of DATA (all parts, all attempts); empty table when none yet."""
    parts = sorted(captions_dir(data).glob("part-*.parquet"))
    if not parts:
        return CAPTIONS_SCHEMA.empty_table() if columns is None else CAPTIONS_SCHEMA.empty_table().select(columns)
    # The schema fills columns an older part lacks (served_model) with nulls.
    return pa.concat_tables(pq.read_table(p, columns=columns, schema=CAPTIONS_SCHEMA) for p in parts)


KeyRanges = list[tuple[Path, str | None, str | None]]  # caption part, its first and last key (None: unknown)


def key_ranges(data: str | Path) -> KeyRanges:
    """Every caption part with its first and last key, from its row groups' statistics (footers only, no data;
    None where a part has none: it is always read). Taken once by a process that plans many manifest parts, so
    each of them opens only the caption parts that overlap it; parts written later are not in it."""
    out = []
    for path in sorted(captions_dir(data).glob("part-*.parquet")):
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.names.index("key")
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
        known = stats and all(st is not None and st.has_min_max for st in stats)
        out.append((path, min(st.min for st in stats), max(st.max for st in stats)) if known else (path, None, None))
    return out


def read_captions_range(data: str | Path, first: str, last: str, columns: list[str],
                        where: ds.Expression | None = None, ranges: KeyRanges | None = None) -> pa.Table:
    """The caption rows with `first` <= key <= `last` (one manifest part's keys) that match `where`, only
    `columns`. The caption parts are not partitioned by key: with `ranges` (`key_ranges`), only the parts that
    overlap are opened, else every part's footer; within those the range is pushed down, and a run writes its
    parts in key order, so row groups outside are skipped unread by their statistics. A caller never holds other
    keys' rows."""
    if ranges is None:
        parts = sorted(captions_dir(data).glob("part-*.parquet"))
    else:
        parts = [p for p, lo, hi in ranges if lo is None or (lo <= last and hi >= first)]
    if not parts:
        return CAPTIONS_SCHEMA.empty_table().select(columns)
    expr = (ds.field("key") >= first) & (ds.field("key") <= last)
    if where is not None:
        expr = expr & where
    # The schema fills columns an older part lacks (served_model) with nulls, as in read_captions.
    return ds.dataset([str(p) for p in parts], schema=CAPTIONS_SCHEMA, format="parquet").to_table(
        columns=columns, filter=expr)


SOURCE_COLUMNS = ["model", "prompt_id"]  # with (key, variant): what identifies a caption


def latest_captions(data: str | Path, sources: dict[str, tuple[str, str | None]] | None = None) -> pa.Table:
    """One row per (key, variant, model, prompt_id): the ok row if any attempt succeeded, else the latest attempt.
    `sources` ({variant: (model, prompt_id)}, from `choose_sources`): only those captions, one row per (key,
    variant)."""
    import pandas as pd

    df = read_captions(data).to_pandas()
    if sources is not None:
        pick = pd.Series(False, index=df.index)
        for variant, (model, prompt_id) in sources.items():
            pick |= (df["variant"] == variant) & (df["model"] == model) & (df["prompt_id"] == prompt_id)
        df = df[pick]
    if df.empty:
        return CAPTIONS_SCHEMA.empty_table()
    df["_ok"] = df["status"] == STATUS_OK
    group = ["key", "variant", *SOURCE_COLUMNS]
    df = df.sort_values([*group, "_ok", "created_at"]).groupby(group, sort=True, dropna=False).tail(1)
    return pa.Table.from_pandas(df.drop(columns="_ok").sort_values(group), schema=CAPTIONS_SCHEMA,
                                preserve_index=False)


def choose_sources(data: str | Path, variants: list[str], model: str | None = None,
                   prompt_ids: dict[str, str] | None = None) -> dict[str, tuple[str, str | None]]:
    """{variant: (model, prompt_id)}: whose captions of each variant a stage reads. `model` and `prompt_ids`
    ({variant: prompt_id}) as configured; where not, the only one among DATA's ok captions, or for the prompt the
    built-in preset's current version when it is among several. A variant with no ok caption (by `model`) maps to
    `model` and the preset's prompt, so its keys are skipped as not captioned. ValueError naming the candidates
    when several fit and none is configured."""
    from captioning.presets import PRESETS

    ok = read_captions(data, columns=["variant", "status", *SOURCE_COLUMNS]).to_pandas()
    ok = ok[ok["status"] == STATUS_OK]
    out: dict[str, tuple[str, str | None]] = {}
    for variant in variants:
        rows = ok[ok["variant"] == variant]
        models = rows["model"].value_counts()
        if model is None and len(models) > 1:
            raise ValueError(f"{variant!r} captions come from several captioners ({_counts(models)}): name one "
                             "with precompute.caption_model (--caption-model)")
        chosen = model if model is not None else (str(models.index[0]) if len(models) else None)
        current = PRESETS[variant].prompt_id if variant in PRESETS else None
        prompts = rows.loc[rows["model"] == chosen, "prompt_id"].value_counts()
        prompt = (prompt_ids or {}).get(variant)
        if prompt is None and len(prompts) > 1 and current not in prompts.index:
            raise ValueError(f"{variant!r} captions by {chosen} come from several prompts ({_counts(prompts)}): "
                             "name one with precompute.caption_prompts")
        if prompt is None:
            prompt = str(prompts.index[0]) if len(prompts) == 1 else current
        if chosen is not None:
            out[variant] = (chosen, prompt)
    return out


def _counts(values) -> str:
    return ", ".join(f"{name}: {n:,}" for name, n in values.items())
