"""training/precompute_parts.py: the plan as tasks over manifest parts. Over a DATA of several manifest parts and
caption parts that are not cut by key: the per-part candidates are the whole DATA's; the plan is the same on a
rerun and whatever order its tasks end in; shards mix parts and keep their sizes; with one group per bucket it is
precompute_plan.assign_shards's plan; then a whole run encodes it and rebuilds the index from the markers."""

import json
import shutil
from datetime import timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import training.precompute_parts as parts
from captioning.schema import CAPTIONS_SCHEMA, key_ranges, latest_captions
from curation.manifest import manifest_parts
from training.cache_key import table_for
from training.precompute import precompute
from training.precompute_config import PrecomputeConfig
from training.precompute_plan import (assign_buckets, assign_shards, caption_column, caption_sources, locate_images,
                                      order_key, part_captions, read_candidates, shard_hashes)
from training.shard_format import read_index

SIZES = [(64, 64), (96, 48), (64, 64), (40, 80), (64, 64), (96, 48)] * 5  # 30 images, three buckets
PARTS = [0, 7, 12, 21, 30]  # manifest parts of 7, 5, 9 and 9 keys
SECTION = {"variants": ["dense", "alt"], "shard_size": 2, "batch_size": 4, "decode_batch_size": 2,
           "buckets": {"base_sides": [32, 64], "ratios": ["1:2", "1:1", "2:1"]}}


def split_data(data):
    """The builder's one manifest part cut into PARTS; its captions into three parts that are not cut by key: the
    even keys, the odd ones, and an earlier failed attempt at every fifth key (the ok row must win)."""
    manifest = pq.read_table(data / "manifest" / "part-00000.parquet")
    (data / "manifest" / "part-00000.parquet").unlink()
    for i, (a, b) in enumerate(zip(PARTS, PARTS[1:])):
        pq.write_table(manifest.slice(a, b - a), data / "manifest" / f"part-{i:05d}.parquet")
    captions = pq.read_table(data / "captions" / "part-00000.parquet").to_pylist()
    (data / "captions" / "part-00000.parquet").unlink()
    failed = [{**r, "status": "error", "text": None, "created_at": r["created_at"] - timedelta(days=1)}
              for r in captions[::5]]
    for name, rows in (("even", captions[::2]), ("odd", captions[1::2]), ("failed", failed)):
        pq.write_table(pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA), data / "captions" / f"part-{name}.parquet")
    return data


@pytest.fixture(scope="module")
def data(tmp_path_factory, data_builder):
    root = tmp_path_factory.mktemp("parts")
    return split_data(data_builder(root / "data", SIZES, uncaptioned={3}))


def test_part_candidates_are_the_whole_datas_and_the_range_read_is_latest_captions(data):
    sources = caption_sources(data, SECTION["variants"])
    whole, skipped = read_candidates(data, SECTION["variants"], sources)
    ranges = parts.captions_by_part(parts.part_ranges([str(p) for p in manifest_parts(data)]), key_ranges(data))
    assert [len(r) for r in ranges] == [3, 3, 3, 3]  # the even, odd and failed parts each span every key
    per_part = [read_candidates(data, SECTION["variants"], sources, part=p, ranges=r)
                for p, r in zip(manifest_parts(data), ranges)]
    pd.testing.assert_frame_equal(pd.concat([r for r, _ in per_part], ignore_index=True), whole)
    assert sum((s for _, s in per_part), type(skipped)()) == skipped == {
        "dense: not captioned by scene-parser (dense@test)": 1}
    latest = latest_captions(data, sources).to_pandas()[["key", "variant", "text", "status"]]
    ours = part_captions(data, sources)[["key", "variant", "text", "status"]]
    pd.testing.assert_frame_equal(ours.reset_index(drop=True), latest.reset_index(drop=True))
    assert (ours["status"] == "ok").all()  # the failed attempts lost to the ok rows


def test_caption_parts_go_to_the_manifest_parts_whose_keys_they_meet():
    manifest = [("a", "c"), None, ("d", "f"), ("g", "k")]
    captions = [("all", "a", "z"), ("first", "b", "b"), ("f-to-g", "f", "g"), ("unknown", None, None),
                ("after", "l", "m")]
    all_, first, f_to_g, unknown, _ = captions
    assert parts.captions_by_part(manifest, captions) == [[all_, first, unknown], [], [all_, f_to_g, unknown],
                                                          [all_, f_to_g, unknown]]
    overlapping = [("a", "e"), ("d", "f")]
    assert parts.captions_by_part(overlapping, captions) == [captions, captions]  # not disjoint: all of them


def local_tasks(fn, jobs, num_cpus=1):
    """run_tasks without Ray, last job first: the plan must not depend on the order tasks end in."""
    for i in reversed(range(len(jobs))):
        yield i, fn(*jobs[i])


def planned(set_dir, summary) -> dict:
    """shard → (plan hash, its rows' keys in order, done) from a plan's summary and its _plan/shards/ files."""
    return {s["shard"]: (s["plan"], pd.read_parquet(s["file"])["key"].tolist(), s["done"])
            for s in summary["shards"]}


def test_the_plan_is_the_same_on_a_rerun_and_in_any_task_order_and_mixes_parts(tmp_path, data, ray_local,
                                                                              monkeypatch):
    cfg = PrecomputeConfig(**SECTION)
    first = parts.plan(data, cfg, tmp_path / "a", group_rows=4)
    shards = planned(tmp_path / "a", first)
    again = parts.plan(data, cfg, tmp_path / "a", group_rows=4)
    assert planned(tmp_path / "a", again) == shards
    monkeypatch.setattr(parts, "run_tasks", local_tasks)
    reversed_ = parts.plan(data, cfg, tmp_path / "b", group_rows=4)
    assert planned(tmp_path / "b", reversed_) == shards
    assert {k: v for k, v in reversed_.items() if k not in ("shards", "seconds")} == \
        {k: v for k, v in first.items() if k not in ("shards", "seconds")}
    assert first["parts"] == 4 and len(shards) == sum(-(-n // 2) for n in first["counts"].values())
    keys = [k for _, ks, _ in shards.values() for k in ks]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == first["candidates"] == 29
    part_of = {k: i for i, (a, b) in enumerate(zip(PARTS, PARTS[1:])) for k in (f"{j:010d}" for j in range(a, b))}
    for bucket, n in first["counts"].items():
        mine = sorted(s for s in shards if s.startswith(f"{bucket}/"))
        sizes = [len(shards[s][1]) for s in mine]
        assert sizes == [2] * (n // 2) + [n % 2] * (n % 2)  # shard_size each but the bucket's last
        for s in mine:
            assert shards[s][1] == sorted(shards[s][1], key=order_key)  # sha1 order inside a shard
    assert any(len({part_of[k] for k in ks}) > 1 for _, ks, _ in shards.values())  # a shard draws from 2+ parts
    assert len(first["sample"]["dense"]) == 29 and first["sample"] == reversed_["sample"]
    for consumed in ("candidates", "groups"):  # each pass removes what the next one has read
        assert not list((tmp_path / "a" / "_plan" / consumed).rglob("*.parquet"))


def test_one_group_per_bucket_is_assign_shards_plan(tmp_path, data, ray_local):
    cfg = PrecomputeConfig(**SECTION)
    summary = parts.plan(data, cfg, tmp_path / "set")
    rows, _ = read_candidates(data, cfg.variants, caption_sources(data, cfg.variants))
    rows, _ = locate_images(data, rows)
    rows, _ = assign_buckets(rows, table_for(cfg))
    rows = assign_shards(rows, cfg.shard_size)
    assert {s["shard"]: s["plan"] for s in summary["shards"]} == shard_hashes(rows, cfg.variants)
    for s in summary["shards"]:
        assert pd.read_parquet(s["file"])["key"].tolist() == rows.loc[rows["shard"] == s["shard"], "key"].tolist()
    chars = {v: int(rows[caption_column(v)].str.len().sum()) for v in cfg.variants}
    assert summary["chars"] == chars and summary["counts"] == rows["bucket"].value_counts().to_dict()


@pytest.mark.slow  # ~19 s; test_precompute.py's kill-and-resume test covers markers and a rerun fast
def test_a_multi_part_run_encodes_every_shard_and_rebuilds_the_index_from_the_markers(tmp_path, data, ray_local,
                                                                                     monkeypatch, capsys):
    monkeypatch.setattr(parts, "GROUP_ROWS", 8)  # groups of two shards: shards mix manifest parts
    shutil.copytree(data, tmp_path / "data")
    cfg = PrecomputeConfig(**{**SECTION, "shard_size": 4})
    set_dir = precompute(tmp_path / "data", cfg)
    index = read_index(set_dir)
    report = json.loads((tmp_path / "data" / "reports" / "precompute.json").read_text())
    assert index["samples"].sum() == 29 and report["parts"] == 4 and not (set_dir / "_plan").exists()
    assert sum(report["encoded_by_node"].values()) == report["shards"] == len(index)
    stamps = {p: p.stat().st_mtime_ns for p in set_dir.glob("*/shard-*.tar")}
    (set_dir / "index.parquet").unlink()
    capsys.readouterr()
    precompute(tmp_path / "data", cfg)
    assert f"{len(index)} shards, {len(index)} already done, 0 images to encode" in capsys.readouterr().out
    pd.testing.assert_frame_equal(read_index(set_dir), index)
    assert {p: p.stat().st_mtime_ns for p in set_dir.glob("*/shard-*.tar")} == stamps
    report = json.loads((tmp_path / "data" / "reports" / "precompute.json").read_text())
    assert report["encoded_by_node"] == {} and report["already_done"] == len(index)
