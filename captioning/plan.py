"""Pending work one manifest part at a time: what `lensforge caption` still has to ask, without any process holding
the whole job's rows.

    parts = manifest_parts(data)                                # DATA/manifest/part-*.parquet, in key order
    summaries = part_summaries(data, presets, model, parts)     # the driver's view: [{part, images, pairs}]
    items = part_pending(data, parts[0], presets, model)        # a worker's: [{key, alt_text, shard, member, variants}]
    for chunk in part_chunks(data, parts[::2], presets, model, 256): ...   # what a Worker is fed

A part's pending work is its kept rows ⋈ the ok captions of its key range: the variants for which this captioner
(`model`) has no `ok` row under the preset's prompt_id. The caption parts are not partitioned by key (a run's part
holds whatever its worker answered), so the captions are read with the part's first and last key pushed down
(schema.read_captions_range), with status, model and prompt_ids too, and a process that plans many parts reads
the caption parts' key ranges once (schema.key_ranges: footers only) to open only those that overlap: a part's
planning reads its own manifest rows and its own captions, whatever the size of DATA.

The driver (pipeline.caption) holds the list of parts and one small summary each; the workers plan their own
parts (`deal`: part i → worker i % n) as they reach them. Nothing here replays journals: the caller does that once,
first (pipeline.replay_journals), so an interrupted run's answers count as done.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from captioning.presets import Preset
from captioning.schema import STATUS_OK, KeyRanges, key_ranges, read_captions_range
from curation.manifest import manifest_parts

MANIFEST_COLUMNS = ["key", "alt_text", "shard", "member", "keep"]
ITEM_COLUMNS = ("key", "alt_text", "shard", "member")  # an item's fields, beside its `variants`


def kept_rows(part: str | Path) -> pa.Table:
    """A manifest part's kept rows (MANIFEST_COLUMNS), in key order (keys are zero-padded: string order is row
    order)."""
    table = pq.read_table(part, columns=MANIFEST_COLUMNS)
    return table.filter(pc.fill_null(table["keep"], False)).sort_by("key")


def done_keys(data: str | Path, first: str, last: str, presets: dict[str, Preset], model: str,
              ranges: KeyRanges | None = None) -> dict[str, pa.Array]:
    """{variant: keys in [first, last] with an ok caption by `model` under the preset's prompt_id}."""
    prompt_ids = [p.prompt_id for p in presets.values()]
    where = (ds.field("status") == STATUS_OK) & (ds.field("model") == model) & ds.field("prompt_id").isin(prompt_ids)
    done = read_captions_range(data, first, last, ["key", "variant", "prompt_id"], where, ranges)
    return {v: done.filter(pc.and_(pc.equal(done["variant"], v), pc.equal(done["prompt_id"], p.prompt_id)))["key"]
            .combine_chunks() for v, p in presets.items()}


def part_pending(data: str | Path, part: str | Path, presets: dict[str, Preset], model: str,
                 ranges: KeyRanges | None = None) -> list[dict]:
    """One manifest part's pending work: {key, alt_text, shard, member, variants} per kept key with a variant not
    yet ok for `model` and the preset's prompt_id, in key order (variants in the presets' order). `ranges`
    (schema.key_ranges, taken once by a caller that plans many parts): only the caption parts that overlap are
    opened."""
    kept = kept_rows(part)
    if kept.num_rows == 0:
        return []
    keys = kept["key"]
    done = done_keys(data, keys[0].as_py(), keys[-1].as_py(), presets, model, ranges)
    todo = {v: pc.invert(pc.is_in(keys, value_set=done[v])).to_pylist() for v in presets}
    columns = {c: kept[c].to_pylist() for c in ITEM_COLUMNS}
    items = []
    for i in range(kept.num_rows):
        variants = [v for v in presets if todo[v][i]]
        if variants:
            items.append({c: columns[c][i] for c in ITEM_COLUMNS} | {"variants": variants})
    return items


def summarize(part: str | Path, items: list[dict]) -> dict:
    """A part's summary: {"part": path, "images": keys pending, "pairs": {variant: pairs pending}}."""
    return {"part": str(part), "images": len(items), "pairs": dict(Counter(v for i in items for v in i["variants"]))}


def part_summary(data: str | Path, part: str | Path, presets: dict[str, Preset], model: str,
                 ranges: KeyRanges | None = None) -> dict:
    """`summarize` of `part_pending`: what the driver keeps of a part."""
    return summarize(part, part_pending(data, part, presets, model, ranges))


def part_summaries(data: str | Path, presets: dict[str, Preset], model: str,
                   parts: list[str | Path] | None = None) -> list[dict]:
    """`part_summary` of every part (default: all of DATA's manifest parts), one after the other in this process
    (with workers > 1, a Ray task runs it over a slice of the parts), the caption parts' key ranges read once."""
    ranges = key_ranges(data)
    return [part_summary(data, p, presets, model, ranges) for p in (manifest_parts(data) if parts is None else parts)]


def totals(summaries: list[dict]) -> tuple[int, int]:
    """(pairs, images) pending over all summaries."""
    return sum(sum(s["pairs"].values()) for s in summaries), sum(s["images"] for s in summaries)


def deal(parts: list[str], n: int) -> list[list[str]]:
    """The parts of each of `n` workers: part i → worker i % n (deterministic; a part's items are never split)."""
    return [parts[w::n] for w in range(n)]


def part_chunks(data: str | Path, parts: list[str | Path], presets: dict[str, Preset], model: str,
                size: int) -> Iterator[list[dict]]:
    """A worker's work: each part planned when reached, its items `size` at a time (a chunk never spans parts),
    so a worker holds one part's items at most. The caption parts' key ranges are read once, before the first
    part: those this run writes later hold keys of parts already planned (by this worker or another)."""
    ranges = key_ranges(data)
    for part in parts:
        items = part_pending(data, part, presets, model, ranges)
        for i in range(0, len(items), size):
            yield items[i:i + size]


def sample_items(data: str | Path, summaries: list[dict], presets: dict[str, Preset], model: str, n: int,
                 seed: int = 0) -> list[dict]:
    """A uniform sample of `n` pending items over all parts, without planning more parts than it hits: positions
    in the concatenated pending list (the summaries' counts), then each hit part planned once."""
    counts = [s["images"] for s in summaries]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    picks = sorted(random.Random(seed).sample(range(starts[-1]), min(n, starts[-1])))
    by_part: dict[int, list[int]] = {}
    for pos in picks:
        part = bisect.bisect_right(starts, pos) - 1
        by_part.setdefault(part, []).append(pos - starts[part])
    sample, ranges = [], key_ranges(data) if by_part else None
    for part, offsets in by_part.items():
        items = part_pending(data, summaries[part]["part"], presets, model, ranges)
        sample += [items[i] for i in offsets if i < len(items)]  # a part changed since its summary: fewer
    return sample
