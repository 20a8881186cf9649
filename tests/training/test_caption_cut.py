"""Random-length captions cut per draw (`dense@random`): the cut is uniform over 1 … all words, each cut is encoded
exactly as inference encodes that prompt, a saved position resumes the same cuts, a mix without one never loads a
text encoder, and the names are refused where a random cut cannot be (precompute, val.captions)."""

import numpy as np
import pytest
import torch

from training.caption_cut import draw_cut
from training.caption_variants import random_base, split_variant, stored_variant
from training.loader import Loader, holdout_batches, open_shard_set
from training.train_config import TrainConfig

BUCKETS = {(32, 32): 48, (48, 48): 24}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from scenes.shards import cached_scene_shards

    return cached_scene_shards(tmp_path_factory, "two-buckets", BUCKETS, variants=("dense", "short"), shard_size=12)


def config(**data) -> TrainConfig:
    base = {"batch_sizes": {32: 8, 48: 4}, "shuffle_buffer": 6, "captions": {"dense@random": 1.0},
            "caption_dropout": 0.0}
    return TrainConfig(data={**base, **data})


def test_a_cut_is_uniform_over_one_to_every_word():
    text = "one two three four five"
    assert draw_cut(text, 0.0) == ("one", 1) and draw_cut(text, 0.999) == (text, 5)
    counts = np.bincount([draw_cut(text, u)[1] for u in np.random.default_rng(0).random(5000)], minlength=6)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] / 5000 - 0.2) < 0.02)
    assert draw_cut("", 0.5) == ("", 0)


def test_names_say_where_a_random_cut_lives():
    assert random_base("dense@random") == "dense" and stored_variant("dense@random") == "dense"
    assert random_base("dense@15") is None and stored_variant("dense@15") == "dense@15"
    with pytest.raises(ValueError, match="cut per draw by the trainer"):
        split_variant("dense@random")  # what precompute validates its variants with: nothing to store
    with pytest.raises(ValueError, match="whole caption"):
        random_base("dense@15@random")
    with pytest.raises(ValueError, match="val.captions"):
        TrainConfig(val={"captions": "dense@random"})


def test_each_draw_is_the_exact_encoding_of_its_cut_text(shards):
    from inference.text import load_text_encoder

    cfg = config()
    loader = Loader(open_shard_set(shards, cfg), cfg)
    encoder = load_text_encoder("minilm")
    fractions = []
    for _ in range(6):
        batch = loader.next_batch()
        texts = []
        for key, variant in zip(batch.keys, batch.variants):
            base, n = split_variant(variant)
            assert base == "dense" and n >= 1
            full = loader_caption(loader, key)
            fractions.append(n / len(full.split()))
            texts.append(" ".join(full.split()[:n]))
        want, mask = encoder.encode(texts)
        for i in range(batch.size):
            assert int(batch.mask[i].sum()) == int(mask[i].sum())
            got = batch.text[i][batch.mask[i]].float()
            # bf16 storage, and another batch's padding: equal up to bf16 rounding
            torch.testing.assert_close(got, want[i][mask[i]].to(torch.bfloat16).float(), rtol=0, atol=0.02)
    assert min(fractions) < 0.2 and max(fractions) > 0.8  # short and long cuts both occur


def test_chunked_encoding_keeps_each_texts_features_in_order(shards):
    """More cuts than one chunk, in no length order: each comes back as its own text's features."""
    from inference.text import load_text_encoder
    from training.caption_cut import CHUNK, CaptionCut
    from training.loader import open_shard_set

    words = "a large red circle sits left of a small hollow blue star on a grey ground".split()
    texts = [" ".join(words[:1 + (7 * k) % len(words)]) for k in range(CHUNK + 5)]
    got = CaptionCut(open_shard_set(shards, config()).encoders).encode(texts)
    encoder = load_text_encoder("minilm")
    for text, features in zip(texts, got):
        want, mask = encoder.encode([text])
        assert features.shape == (int(mask.sum()), want.shape[-1])
        torch.testing.assert_close(features.float(), want[0][mask[0]].to(torch.bfloat16).float(), rtol=0, atol=0.02)


def loader_caption(loader: Loader, key: str) -> str:
    """The stored dense caption of a sample (the scene shards' meta.json), found by key."""
    from training.loader import raw_samples
    from training.shard_format import read_sample

    for bucket in loader.buckets.values():
        for path in bucket.shards:
            for raw in raw_samples(path):
                if raw["__key__"] == key:
                    return read_sample(raw)["meta"]["captions"]["dense"]
    raise KeyError(key)


def test_a_saved_position_resumes_the_same_cuts(shards):
    cfg = config()
    s = open_shard_set(shards, cfg)
    first = Loader(s, cfg)
    for _ in range(3):
        saved = first.next_batch().position
    want = [first.next_batch() for _ in range(3)]
    resumed = Loader(s, cfg, state=saved)
    for w in want:
        got = resumed.next_batch()
        assert got.variants == w.variants and torch.equal(got.text, w.text)


def test_a_mix_without_a_random_cut_loads_no_encoder_and_validates_on_its_base(shards):
    cfg = config(captions={"dense": 0.5, "short": 0.5})
    assert Loader(open_shard_set(shards, cfg), cfg).cut is None
    cfg = config(holdout=0.25)
    val = holdout_batches(open_shard_set(shards, cfg), cfg, samples=20, batch_size=4)
    assert val and all(v == "dense" for b in val for v in b.variants)  # the random mix's base, uncut
    cfg = TrainConfig(data={"captions": {"dense@random": 1.0}, "holdout": 0.25}, val={"captions": "short"})
    val = holdout_batches(open_shard_set(shards, cfg), cfg, samples=20, batch_size=4)
    assert all(v == "short" for b in val for v in b.variants)
