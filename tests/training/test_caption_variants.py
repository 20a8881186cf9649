"""`<variant>@<words>`: a caption variant cut to its first N words (training/caption_variants.py), read by
precompute's plan from the base variant's stored caption and stored in the shards under its own name."""

import pytest
import torch

from training.caption_variants import split_variant, truncate_words, truncated, variant_text
from training.precompute_config import PrecomputeConfig
from training.precompute_plan import caption_column, read_candidates
from training.shard_format import pack_sample, read_sample

DENSE = "Two objects on a plain white background. A large red circle in the top left."


def test_names_split_into_base_and_word_count():
    assert split_variant("dense") == ("dense", None)
    assert split_variant("dense@15") == ("dense", 15)
    assert split_variant("alt@2") == ("alt", 2)
    assert truncated("dense", 15) == "dense@15"
    for bad in ("dense@0", "dense@015", "@5", "dense@", "dense@x", "dense@5@6", "a b", ""):
        with pytest.raises(ValueError, match="NAME@WORDS"):
            split_variant(bad)


def test_truncation_cuts_at_a_word_boundary_and_leaves_short_captions_alone():
    assert truncate_words(DENSE, 4) == "Two objects on a"
    assert truncate_words(DENSE, 9) == "Two objects on a plain white background. A large"
    assert truncate_words("a  red\ncircle", 2) == "a red"
    assert truncate_words(DENSE, 1000) == DENSE  # unchanged, whitespace and all
    assert truncate_words("", 3) == ""
    assert variant_text(DENSE, "dense@2") == "Two objects"
    assert variant_text(DENSE, "dense") == DENSE
    assert variant_text(None, "dense@2") is None  # a missing caption stays missing


def test_precompute_config_refuses_a_malformed_variant():
    assert PrecomputeConfig(variants=["dense", "dense@5"]).variants == ["dense", "dense@5"]
    with pytest.raises(ValueError, match="dense@0"):
        PrecomputeConfig(variants=["dense", "dense@0"])


def test_plan_reads_truncated_variants_from_their_base(tmp_path, data_builder):
    data = data_builder(tmp_path / "data", [(32, 32)] * 6, variants=("dense",), uncaptioned={2})
    rows, skipped = read_candidates(data, ["dense", "dense@3", "alt", "alt@1"])
    assert len(rows) == 5 and skipped == {"dense: not captioned by scene-parser (dense@test)": 1}  # none for dense@3
    for values in rows.to_dict("records"):
        dense, cut = values[caption_column("dense")], values[caption_column("dense@3")]
        assert cut == " ".join(dense.split()[:3]) and len(dense.split()) > 3
        assert values[caption_column("alt@1")] == " ".join(values[caption_column("alt")].split()[:1])
    # Only a truncated variant asked for: its base is read all the same.
    alone, _ = read_candidates(data, ["dense@3"])
    assert alone[caption_column("dense@3")].tolist() == rows[caption_column("dense@3")].tolist()


def test_a_truncated_variant_round_trips_through_the_shard_format():
    feats = {"dense": torch.randn(7, 8), "dense@3": torch.randn(3, 8)}
    sample = read_sample(pack_sample("k0", torch.zeros(3, 4, 4), {"key": "k0"}, text=feats))
    assert set(sample["text"]) == {"dense", "dense@3"}
    assert sample["text"]["dense@3"].shape == (3, 8)
