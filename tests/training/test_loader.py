"""The training loader: bucket-homogeneous batches with per-base sizes, per-rank bucket scheduling that is a pure
function of (seed, rank, step), disjoint rank shares, the caption mix and dropout, the hold-out, resuming at a
saved position; and what `lensforge train` refuses in one line: a truncated shard, another bucket table."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from training.loader import BucketStream, Loader, holdout_batches, held_out, open_shard_set, prefetch
from training.train_config import TrainConfig

BUCKETS = {(32, 32): 48, (48, 48): 24}  # base 32 in 4 shards of 12, base 48 in 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from scenes.shards import cached_scene_shards

    return cached_scene_shards(tmp_path_factory, "two-buckets", BUCKETS, variants=("dense", "short"), shard_size=12)


def config(**data) -> TrainConfig:
    base = {"batch_sizes": {32: 8, 48: 4}, "shuffle_buffer": 6, "captions": {"dense": 0.5, "short": 0.5}}
    return TrainConfig(data={**base, **data})


def test_batches_are_bucket_homogeneous_with_per_base_batch_sizes(shards):
    cfg = config()
    loader = Loader(open_shard_set(shards, cfg), cfg)
    seen = set()
    for _ in range(12):
        b = loader.next_batch()
        side = {"32x32": 8, "48x48": 12}[b.bucket]  # latent side: pixel codec ÷ 4
        assert b.latents.shape == (cfg.batch_size_for({"32x32": 32, "48x48": 48}[b.bucket]), 48, side, side)
        assert b.text.shape[:2] == b.mask.shape and b.text.shape[2] == 768
        seen.add(b.bucket)
    assert seen == {"32x32", "48x48"}


def test_each_rank_draws_its_bucket_from_seed_rank_and_step(shards):
    cfg = config()
    s = open_shard_set(shards, cfg)
    plans = {r: [Loader(s, cfg, r, 2).plan(step)[0] for step in range(400)] for r in (0, 1)}
    assert plans[0] == [Loader(s, cfg, 0, 2).plan(step)[0] for step in range(400)]  # pure function
    differ = sum(a != b for a, b in zip(plans[0], plans[1]))
    assert 100 < differ < 300  # ranks train different resolutions in the same step about half the time
    # P(bucket) ∝ samples / batch size: 48 / 8 = 24 / 4, so both buckets are drawn equally often.
    counts = Counter(plans[0] + plans[1])
    assert abs(counts["32x32"] - counts["48x48"]) < 100
    skewed = config(batch_sizes={32: 2, 48: 4})  # base 32 now needs 24 steps per pass, base 48 needs 6
    counts = Counter(Loader(s, skewed, 0, 1).plan(step)[0] for step in range(1000))
    assert 0.72 < counts["32x32"] / 1000 < 0.88


@pytest.mark.parametrize("world", [2, 4])  # 4 shards of base 32 split by shard; 2 shards of base 48 < 4: by sample
def test_rank_shares_of_an_epoch_are_disjoint_and_cover_the_bucket(shards, world):
    s = open_shard_set(shards, config())
    for name, bucket in s.buckets.items():
        keys = []
        for rank in range(world):
            stream = BucketStream(bucket, rank, world, seed=0, buffer=4, keep=lambda k: True)
            mine = []
            while (key := next(stream)["__key__"]) and stream.epoch == 0:  # the first sample of epoch 1 ends it
                mine.append(key)
            keys.append(mine)
        flat = [k for mine in keys for k in mine]
        assert len(flat) == len(set(flat)) == bucket.samples, name


def test_caption_mix_and_dropout_follow_the_config(shards):
    cfg = config(captions={"dense": 0.75, "short": 0.25}, caption_dropout=0.2)
    loader = Loader(open_shard_set(shards, cfg), cfg)
    variants = []
    for _ in range(60):
        b = loader.next_batch()
        for i, v in enumerate(b.variants):
            assert bool(b.mask[i].any()) == (v is not None)  # a dropped caption has no tokens at all
            assert not b.text[i][~b.mask[i]].any()  # zero past the tokens
        variants += b.variants
    n = len(variants)
    dropped, dense = variants.count(None) / n, variants.count("dense") / (n - variants.count(None))
    assert 0.14 < dropped < 0.26 and 0.68 < dense < 0.82


def test_a_saved_position_resumes_the_same_batches(shards):
    cfg = config()
    s = open_shard_set(shards, cfg)
    first = Loader(s, cfg, rank=1, world=2)
    for _ in range(7):
        saved = first.next_batch().position
    expected = [first.next_batch() for _ in range(9)]  # crosses shard and epoch boundaries
    resumed = Loader(s, cfg, rank=1, world=2, state=saved)
    for want in expected:
        got = resumed.next_batch()
        assert (got.step, got.bucket, got.keys, got.variants) == (want.step, want.bucket, want.keys, want.variants)
        assert torch.equal(got.latents, want.latents) and torch.equal(got.text, want.text)


def test_prefetch_thread_yields_the_synchronous_sequence(shards):
    cfg = config()
    s = open_shard_set(shards, cfg)
    direct = Loader(s, cfg)
    want = [direct.next_batch().keys for _ in range(6)]
    it = prefetch(Loader(s, cfg), depth=2)
    try:
        assert [next(it).keys for _ in range(6)] == want
    finally:
        it.close()


def test_held_out_keys_never_train_and_form_the_validation_set(shards):
    cfg = config(holdout=0.25, caption_dropout=0.0)
    s = open_shard_set(shards, cfg)
    loader = Loader(s, cfg)
    trained = {k for _ in range(30) for k in loader.next_batch().keys}
    val = holdout_batches(s, cfg, samples=100, batch_size=4)
    val_keys = [k for b in val for k in b.keys]
    assert val_keys and all(held_out(k, 0.25) for k in val_keys)
    assert not trained & set(val_keys)
    assert all(v == "dense" for b in val for v in b.variants)  # the mix's most likely variant, never dropped
    assert len({b.bucket for b in val}) == 2 and all(len(set(np.shape(b.latents)[2:])) == 1 for b in val)


# --- what `lensforge train` refuses before (or while) reading ------------------------------------------------------


@pytest.fixture
def lensforge(monkeypatch):
    """`lensforge ...` in this process with only `train` registered."""
    from pipelines import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["train"])
    return cli.main


def train_argv(data, run, *extra) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), "--max-steps", "1", "--set", "train.progress=false",
            "--set", "train.data.batch_size=8", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("lensforge: error:") and err.count("\n") == 1, err
    return err


def member_offsets(tar) -> list[int]:
    import tarfile

    with tarfile.open(tar) as f:
        return [m.offset for m in f.getmembers()]


@pytest.mark.parametrize("cut", ["inside a member", "between members"])
def test_a_truncated_shard_stops_training_in_one_line_naming_it(tmp_path, lensforge, capsys, cut):
    from scenes.shards import write_scene_shards

    set_dir = write_scene_shards(tmp_path / "data", {(32, 32): 8}, shard_size=4)  # no done markers: read to find it
    tar = sorted(set_dir.glob("*/shard-*.tar"))[1]
    raw = tar.read_bytes()
    tar.write_bytes(raw[:len(raw) // 2] if cut == "inside a member" else raw[:member_offsets(tar)[3]])
    capsys.readouterr()
    assert lensforge(train_argv(tmp_path / "data", tmp_path / "run")) == 2
    err = one_error_line(capsys)
    assert str(tar) in err and "truncated or corrupt" in err and "rerun `lensforge precompute`" in err


def test_a_shard_cut_since_its_done_marker_is_refused_before_training(tmp_path, lensforge, capsys):
    from scenes.shards import write_scene_shards
    from training.shard_format import done_marker

    set_dir = write_scene_shards(tmp_path / "data", {(32, 32): 8}, shard_size=4)
    tar = sorted(set_dir.glob("*/shard-*.tar"))[0]
    size = tar.stat().st_size
    done_marker(tar).write_text(json.dumps({"shard": tar.name, "bytes": size}))  # as precompute writes it
    tar.write_bytes(tar.read_bytes()[:member_offsets(tar)[2]])  # one whole sample left: a tar reader sees no error
    capsys.readouterr()
    assert lensforge(train_argv(tmp_path / "data", tmp_path / "run")) == 2
    err = one_error_line(capsys)
    assert f"{tar} is {tar.stat().st_size:,} bytes, its done marker records {size:,}" in err
    assert "rerun `lensforge precompute`" in err and not (tmp_path / "run").exists()


def test_shards_made_with_another_bucket_table_are_refused(shards, tmp_path, lensforge, capsys):
    # the shards: bases 32 and 48, ratio 1:1, sides multiples of 4 (scenes/shards.py)
    argv = train_argv(shards, tmp_path / "run", "--set", "train.buckets={base_sides: [512, 768, 1024]}")
    assert lensforge(argv) == 2
    err = one_error_line(capsys)
    assert "buckets.base_sides: [32, 48] in the shards, [512, 768, 1024] expected" in err
    assert "buckets.ratios: ['1:1'] in the shards" in err and not (tmp_path / "run").exists()
    assert open_shard_set(shards, TrainConfig(buckets={"base_sides": [48, 32], "ratios": ["1:1"]})).samples == 72
    assert open_shard_set(shards, TrainConfig(buckets={"base_sides": [32, 48], "ratios": ["1:1"], "multiple": 4}))
    with pytest.raises(ValueError, match=r"buckets\.multiple: 4 in the shards, 8 expected"):
        open_shard_set(shards, TrainConfig(buckets={"base_sides": [32, 48], "ratios": ["1:1"], "multiple": 8}))
    assert open_shard_set(shards, TrainConfig()).samples == 72  # no table named: whichever the shards have
