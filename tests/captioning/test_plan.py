"""Pending work per manifest part (captioning/plan.py): the same as the old whole-table plan, each part reading only
its key range of captions, summaries, the deal of parts over workers, chunks and the dry run's sample."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from captioning import plan
from captioning.pipeline import pending_work
from captioning.presets import PRESETS
from captioning.schema import (CAPTIONS_SCHEMA, captions_dir, key_ranges, read_captions, read_captions_range,
                               write_part)
from curation.manifest import make_key, manifest_parts, read_manifest
from tests.captioning.manifests import write_parted_manifest

MODEL = "gpt-4.1-mini"
PRESETS_USED = {"short": PRESETS["short"], "tags": PRESETS["tags"]}
N_ROWS, PART_ROWS = 40, 7  # 6 parts, the last one short


def caption_row(key: str, variant: str, status: str = "ok", model: str = MODEL, prompt_id: str | None = None):
    return {"key": key, "variant": variant, "text": "a caption" if status == "ok" else None, "model": model,
            "prompt_id": prompt_id or PRESETS[variant].prompt_id, "status": status,
            "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}


@pytest.fixture
def plan_data(tmp_path):
    """DATA with a 6-part manifest (some rows not kept, one keep null) and captions in 4 caption parts whose keys
    are shuffled over the parts, as several runs and workers leave them: ok, error, another captioner, an older
    prompt."""
    rng = random.Random(3)
    rows = [{"key": make_key(i), "alt_text": f"alt {i}", "status": "ok", "shard": f"{i // 10:05d}.tar",
             "member": f"{make_key(i)}.jpg", "keep": None if i == 5 else i % 6 != 0} for i in range(N_ROWS)]
    write_parted_manifest(rows, tmp_path, PART_ROWS)
    captions = []
    for i in range(N_ROWS):
        key = make_key(i)
        for variant in PRESETS_USED:
            kind = rng.choice(["none", "ok", "ok", "error", "other-model", "old-prompt", "error-then-ok"])
            if kind == "ok":
                captions.append(caption_row(key, variant))
            elif kind == "error":
                captions.append(caption_row(key, variant, "error"))
            elif kind == "other-model":
                captions.append(caption_row(key, variant, model="gpt-4.1"))
            elif kind == "old-prompt":
                captions.append(caption_row(key, variant, prompt_id=f"{variant}@00000000"))
            elif kind == "error-then-ok":
                captions += [caption_row(key, variant, "error"), caption_row(key, variant)]
    rng.shuffle(captions)
    for n in range(4):
        write_part(captions_dir(tmp_path) / f"part-run-{n:03d}-00000.parquet", captions[n::4])
    return tmp_path


def whole_table_pending(data, presets, model) -> list[dict]:
    """The plan before issue 15 (captioning/pipeline.py's pending_work): the whole manifest and every caption."""
    kept = read_manifest(data, columns=list(plan.MANIFEST_COLUMNS))
    kept = kept.filter(pc.fill_null(kept["keep"], False)).sort_by("key").to_pandas()
    done = read_captions(data, columns=["key", "variant", "status", "model", "prompt_id"]).to_pandas()
    done = done[(done["status"] == "ok") & (done["model"] == model)]
    todo = {v: ~kept["key"].isin(done.loc[(done["variant"] == v) & (done["prompt_id"] == p.prompt_id), "key"])
            for v, p in presets.items()}
    items = []
    for i, row in enumerate(kept.itertuples(index=False)):
        variants = [v for v in presets if todo[v].iat[i]]
        if variants:
            items.append({"key": row.key, "alt_text": row.alt_text, "shard": row.shard, "member": row.member,
                          "variants": variants})
    return items


def test_per_part_plan_equals_the_whole_table_plan(plan_data):
    parts = manifest_parts(plan_data)
    assert len(parts) == 6
    expected = whole_table_pending(plan_data, PRESETS_USED, MODEL)
    assert 0 < len(expected) < N_ROWS  # some keys fully done, some not kept
    per_part = [plan.part_pending(plan_data, p, PRESETS_USED, MODEL) for p in parts]
    assert [item for items in per_part for item in items] == expected
    assert pending_work(plan_data, PRESETS_USED, MODEL) == expected
    for variant in PRESETS_USED:  # one preset alone: the same too
        one = {variant: PRESETS_USED[variant]}
        assert pending_work(plan_data, one, MODEL) == whole_table_pending(plan_data, one, MODEL)

    summaries = plan.part_summaries(plan_data, PRESETS_USED, MODEL)
    assert [s["part"] for s in summaries] == [str(p) for p in parts]
    assert [s["images"] for s in summaries] == [len(items) for items in per_part]
    pairs, images = plan.totals(summaries)
    assert (pairs, images) == (sum(len(i["variants"]) for i in expected), len(expected))
    for variant in PRESETS_USED:
        assert sum(s["pairs"].get(variant, 0) for s in summaries) == sum(variant in i["variants"] for i in expected)


def test_a_part_reads_only_the_captions_of_its_key_range(plan_data, monkeypatch):
    reads = []

    def spy(data, first, last, columns, where=None, ranges=None):
        table = read_captions_range(data, first, last, columns, where, ranges)
        reads.append((first, last, table))
        return table

    monkeypatch.setattr(plan, "read_captions_range", spy)
    everything = read_captions(plan_data).to_pylist()
    for part in manifest_parts(plan_data):
        kept = plan.kept_rows(part)["key"].to_pylist()
        reads.clear()
        plan.part_pending(plan_data, part, PRESETS_USED, MODEL)
        ((first, last, table),) = reads  # one read per part, over the part's kept keys only
        assert (first, last) == (kept[0], kept[-1])
        expected = [r for r in everything if first <= r["key"] <= last and r["status"] == "ok"
                    and r["model"] == MODEL and r["prompt_id"] == PRESETS[r["variant"]].prompt_id]
        assert table.column_names == ["key", "variant", "prompt_id"]  # the columns needed, nothing else
        assert sorted(table.column("key").to_pylist()) == sorted(r["key"] for r in expected)
        assert len(table) < len(everything) / 3  # the other parts' captions never came in


def test_read_captions_range_fills_columns_an_old_part_lacks(plan_data):
    old = CAPTIONS_SCHEMA.remove(CAPTIONS_SCHEMA.get_field_index("served_model"))
    pq.write_table(pa.Table.from_pylist([caption_row(make_key(1), "short")], schema=old),
                   captions_dir(plan_data) / "part-old.parquet")
    table = read_captions_range(plan_data, make_key(1), make_key(1), ["key", "served_model"])
    assert make_key(1) in table["key"].to_pylist() and table["served_model"].null_count == len(table)
    assert read_captions_range(plan_data / "nowhere", "0", "9", ["key"]).num_rows == 0


def test_key_ranges_open_only_the_caption_parts_that_overlap(plan_data):
    write_part(captions_dir(plan_data) / "part-narrow.parquet",
               [caption_row(make_key(38), "short"), caption_row(make_key(39), "tags")])
    ranges = key_ranges(plan_data)
    for path, first, last in ranges:
        keys = pq.read_table(path, columns=["key"])["key"].to_pylist()
        assert (first, last) == (min(keys), max(keys))
    narrow = captions_dir(plan_data) / "part-narrow.parquet"
    narrow.write_bytes(b"not parquet")  # opening it would fail
    lo, hi, columns = make_key(0), make_key(6), ["key", "variant"]
    pruned = read_captions_range(plan_data, lo, hi, columns, ranges=ranges)
    assert 0 < len(pruned) and max(pruned["key"].to_pylist()) <= hi
    with pytest.raises(pa.ArrowInvalid):
        read_captions_range(plan_data, lo, hi, columns)  # without the ranges every part's footer is read
    with pytest.raises(pa.ArrowInvalid):
        read_captions_range(plan_data, make_key(30), make_key(39), columns, ranges=ranges)


def test_deal_and_chunks_keep_a_part_whole(plan_data):
    assert plan.deal(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert plan.deal(["a"], 1) == [["a"]]
    parts = manifest_parts(plan_data)
    chunks = list(plan.part_chunks(plan_data, parts[::2], PRESETS_USED, MODEL, size=3))
    expected = [plan.part_pending(plan_data, p, PRESETS_USED, MODEL) for p in parts[::2]]
    assert [i for c in chunks for i in c] == [i for items in expected for i in items]
    assert all(1 <= len(c) <= 3 for c in chunks)
    part_of = {i["key"]: n for n, items in enumerate(expected) for i in items}
    assert all(len({part_of[i["key"]] for i in c}) == 1 for c in chunks)  # a chunk never spans two parts


def test_the_dry_run_sample_plans_only_the_parts_it_hits(plan_data, monkeypatch):
    summaries = plan.part_summaries(plan_data, PRESETS_USED, MODEL)
    everything = pending_work(plan_data, PRESETS_USED, MODEL)
    assert plan.sample_items(plan_data, summaries, PRESETS_USED, MODEL, 1000) == everything  # all, in order

    planned = []
    real = plan.part_pending
    monkeypatch.setattr(plan, "part_pending", lambda data, part, *a: planned.append(part) or real(data, part, *a))
    sample = plan.sample_items(plan_data, summaries, PRESETS_USED, MODEL, 2)
    assert len(sample) == 2 and all(item in everything for item in sample)
    assert len(planned) <= 2 and len(set(planned)) == len(planned)
    assert plan.sample_items(plan_data, summaries, PRESETS_USED, MODEL, 2) == sample  # deterministic
    assert plan.sample_items(plan_data, [], PRESETS_USED, MODEL, 5) == []
