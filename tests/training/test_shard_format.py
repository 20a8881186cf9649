"""The sample format: unpadded text features round trip, fp8 with a per-token scale, plain webdataset reads the
tars, encoders.json mismatches are refused by name, a sample cut short names its shard, and a done marker vouches
for its tar only at the size it records."""

import json

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as st_load

from training.shard_format import (
    check_encoders,
    done_marker,
    pack_sample,
    read_done,
    read_sample,
    shard_set_id,
    tar_mismatch,
    write_encoders,
    write_sample,
)

META = {"key": "0000000001", "bucket": "32x32", "size": [64, 64], "crop": [0, 0, 64, 64]}


def padded_batch(lengths, dim=12, seed=0):
    """What TextEncoder.encode returns: features (B, L, D) zeroed past each prompt, mask (B, L)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return torch.randn(len(lengths), width, dim, generator=g) * mask[..., None], mask


def test_unpadded_features_round_trip_and_repad_to_the_encoders_batch():
    features, mask = padded_batch([5, 0, 3])  # the middle prompt is empty: no tokens
    latent = torch.randn(48, 8, 8).to(torch.bfloat16)
    samples = [read_sample(pack_sample(f"{i:010d}", latent, META, text={"dense": features[i][mask[i]]}))
               for i in range(3)]
    assert [s["text"]["dense"].shape for s in samples] == [(5, 12), (0, 12), (3, 12)]
    repadded = torch.zeros_like(features)
    for i, s in enumerate(samples):
        repadded[i, : len(s["text"]["dense"])] = s["text"]["dense"].float()
    torch.testing.assert_close(repadded, features.to(torch.bfloat16).float())
    assert torch.equal(samples[0]["latent"], latent) and samples[0]["meta"] == META


def test_fp8_stores_a_scale_per_token():
    features, mask = padded_batch([7], dim=64)
    feats = features[0] * torch.logspace(-3, 3, 7)[:, None]  # token norms over six decades
    packed = pack_sample("k", torch.zeros(3, 2, 2), META, text={"dense": feats}, text_dtype="float8_e4m3fn")
    sample = read_sample(packed)
    rel = (sample["text"]["dense"].float() - feats).norm(dim=1) / feats.norm(dim=1)
    assert rel.max() < 0.08  # e4m3: 3 mantissa bits, the per-token scale keeps small tokens as exact as big ones
    assert set(st_load(packed["tensors.safetensors"])) == {"latent", "text.dense", "scale.dense"}


def test_plain_webdataset_iterates_written_shards(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for i in range(4):
            write_sample(sink, f"{i:010d}", torch.full((3, 4, 4), float(i)), {**META, "key": f"{i:010d}"},
                         text={"dense": torch.ones(i, 6), "alt": torch.ones(0, 6)})
    raw = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in raw] == [f"{i:010d}" for i in range(4)]
    assert set(raw[0]) >= {"__key__", "tensors.safetensors", "meta.json"}
    decoded = list(wds.WebDataset(str(path), shardshuffle=False).decode())  # default decoders: meta.json → dict
    for i, s in enumerate(decoded):
        sample = read_sample(s)
        assert sample["meta"]["key"] == f"{i:010d}" and sample["latent"][0, 0, 0].item() == i
        assert sample["text"]["dense"].shape == (i, 6) and sample["text"]["alt"].shape == (0, 6)
    with pytest.raises(ValueError, match="may not contain"):
        pack_sample("a.b", torch.zeros(1), META)


ENCODERS = {"format": 1, "codec": {"codec": "pixel", "weights": None}, "text": {"layers": [2, 5], "dim": 384},
            "buckets": {"sizes": ["32x32"]}, "crop": "center", "flip": "none"}


def test_check_encoders_refuses_a_mismatch_naming_the_fields(tmp_path):
    write_encoders(tmp_path, ENCODERS)
    assert check_encoders(tmp_path, json.loads(json.dumps(ENCODERS))) == ENCODERS
    other = json.loads(json.dumps(ENCODERS))
    other["text"]["layers"] = [5]
    other["buckets"]["sizes"] = ["64x64"]
    with pytest.raises(ValueError, match=r"text\.layers: \[2, 5\] in the shards, \[5\] expected") as err:
        check_encoders(tmp_path, other)
    assert "buckets.sizes" in str(err.value)
    old = tmp_path / "old"
    write_encoders(old, {k: v for k, v in ENCODERS.items() if k != "flip"})  # made before `flip` was recorded
    with pytest.raises(ValueError, match="flip: missing in the shards"):
        check_encoders(old, ENCODERS)
    with pytest.raises(FileNotFoundError):
        check_encoders(tmp_path / "nowhere", ENCODERS)


def test_set_id_is_stable_and_changes_with_the_key(tmp_path):
    assert shard_set_id(ENCODERS) == shard_set_id(dict(reversed(list(ENCODERS.items()))))
    assert len(shard_set_id(ENCODERS)) == 12
    assert shard_set_id(ENCODERS) != shard_set_id({**ENCODERS, "crop": "random"})


def test_a_sample_cut_short_names_its_shard():
    whole = pack_sample("0000000001", torch.zeros(3, 4, 4), META)
    for broken in ({k: v for k, v in whole.items() if k != "tensors.safetensors"},  # the tar ended between members
                   {**whole, "tensors.safetensors": whole["tensors.safetensors"][:40]}):  # ... inside one
        with pytest.raises(ValueError, match=r"sample 0000000001 of shard /d/32x32/shard-000003.tar is incomplete"):
            read_sample({**broken, "__url__": "/d/32x32/shard-000003.tar"})


def test_a_done_marker_vouches_for_its_tar_only_at_the_size_it_records(tmp_path):
    tar = tmp_path / "32x32" / "shard-000000.tar"
    tar.parent.mkdir()
    tar.write_bytes(b"x" * 2048)
    assert done_marker(tar) == tmp_path / "32x32" / "shard-000000.done.json" and read_done(tar) is None
    done_marker(tar).write_text(json.dumps({"bytes": 2048}))
    assert tar_mismatch(tar, read_done(tar)) is None
    tar.write_bytes(b"x" * 1024)
    assert tar_mismatch(tar, read_done(tar)) == f"{tar} is 1,024 bytes, its done marker records 2,048"
    assert tar_mismatch(tar, {}) == f"{tar} is 1,024 bytes, its done marker records no size"
    tar.unlink()
    assert tar_mismatch(tar, read_done(tar)) == f"{tar} is missing"
    done_marker(tar).write_text('{"bytes": 20')  # cut short itself: no marker
    assert read_done(tar) is None
