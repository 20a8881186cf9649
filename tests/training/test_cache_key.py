"""The shards' cache key from the configs alone: the codec's and text encoder's keys equal what the loaded models
say, the chat date and offset are in it for gpt-oss, training compares what it decides (any date), and the
precompute probe's check names a loaded model that disagrees."""

import pytest

from inference.checkpoint import file_fingerprint
from inference.codecs import load_codec
from inference.text import load_text_encoder, weights_path
from training.cache_key import (
    codec_key,
    encoder_mismatches,
    encoders_record,
    loaded_mismatches,
    table_for,
    text_key,
    training_key,
)
from training.precompute_config import PrecomputeConfig
from training.train_config import TrainConfig


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from tests.inference.tiny_models import save_tiny_lens_release

    return save_tiny_lens_release(tmp_path_factory.mktemp("lens") / "lens")


def test_codec_keys_are_the_loaded_codecs_identities_with_fingerprints(release):
    assert codec_key("pixel") == {**load_codec("pixel").identity(), "weights": None}
    vae = release / "vae"
    key = codec_key(f"flux2:{vae}")
    assert key == {**load_codec(f"flux2:{vae}").identity(), "weights": file_fingerprint(vae)}
    assert (key["channels"], key["factor"], key["batch_norm_eps"]) == (32, 8, 1e-4)
    cfg = PrecomputeConfig(codec=f"flux2:{vae}", buckets={"base_sides": [64], "ratios": ["1:1", "2:1"]})
    assert table_for(cfg).multiple == 16  # FLUX.2's /8 times the 2×2 patchify
    with pytest.raises(FileNotFoundError, match="FLUX.2 VAE directory not found"):
        codec_key(f"flux2:{release / 'none'}")


def test_text_keys_hold_the_chat_and_fingerprint_the_weights_and_a_separate_tokenizer(release):
    spec = f"gpt-oss:{release}"
    key = text_key(spec, "2025-08-05")
    assert key == {**load_text_encoder(spec, date="2025-08-05").identity(),
                   "weights": file_fingerprint(release / "text_encoder"),
                   "tokenizer": file_fingerprint(release / "tokenizer")}
    assert key["layers"] == [1, 4, 9, 23] and key["template"]["date"] == "2025-08-05"
    assert key["template"]["offset"] == 97
    assert text_key("minilm", "2025-08-05") == text_key("minilm", None)  # no chat, no date
    assert text_key("minilm", None)["tokenizer"] is None
    assert text_key("minilm", None)["weights"] == file_fingerprint(weights_path("minilm"))


def test_the_record_follows_the_config_and_its_date(release):
    cfg = PrecomputeConfig(codec=f"flux2:{release / 'vae'}", text_encoder=f"gpt-oss:{release}",
                           buckets={"base_sides": [64], "ratios": ["1:1"]})
    record = encoders_record(cfg)
    assert record["text"]["template"]["date"] == "2025-08-05"  # the fixed default: reruns keep the set id
    assert record["text"]["variants"] == ["dense"] and "mode" not in record["text"]
    later = encoders_record(cfg.model_copy(update={"text_date": "2026-01-01"}))
    assert later["text"]["template"]["date"] == "2026-01-01" and later["codec"] == record["codec"]
    with pytest.raises(ValueError, match="not YYYY-MM-DD"):
        PrecomputeConfig(text_date="tomorrow")


def test_training_takes_any_date_and_names_what_differs(release):
    pre = PrecomputeConfig(codec=f"flux2:{release / 'vae'}", text_encoder=f"gpt-oss:{release}",
                           buckets={"base_sides": [64], "ratios": ["1:1"]}, text_date="2030-01-01")
    record = encoders_record(pre)
    cfg = TrainConfig(codec=pre.codec, text_encoder=pre.text_encoder,
                      model={"in_channels": 32, "patch": 2, "text_dim": 32, "text_layers": 4})
    model = cfg.model_config_resolved()
    assert "date" not in training_key(cfg)["text"]["template"]
    assert encoder_mismatches(record, cfg, model) == []
    pinned = cfg.model_copy(update={"encoders": {"text": {"template": {"date": "2025-08-05"}}}})
    assert encoder_mismatches(record, pinned, model) == [
        "text.template.date: '2030-01-01' in the shards, '2025-08-05' expected"]
    other = cfg.model_copy(update={"text_encoder": f"gpt-oss:{release}@1,4,9,22"})
    assert encoder_mismatches(record, other, model)[0].startswith("text.layers: [1, 4, 9, 23] in the shards")
    small = cfg.model_copy(update={"model": {"in_channels": 48, "text_dim": 32, "text_layers": 4}})
    assert encoder_mismatches(record, small, small.model_config_resolved()) == [
        f"latents of 32 channels (flux2:{release / 'vae'}), model 'tiny' wants 48"]


def test_the_probe_check_names_a_loaded_model_that_disagrees(release):
    cfg = PrecomputeConfig(codec=f"flux2:{release / 'vae'}", text_encoder=f"gpt-oss:{release}",
                           buckets={"base_sides": [64], "ratios": ["1:1"]})
    record = encoders_record(cfg)
    codec = load_codec(cfg.codec)
    text = load_text_encoder(cfg.text_encoder, date=cfg.text_date)
    probe = {"codec": codec.identity(), "text": text.identity(), "multiple": codec.multiple}
    assert loaded_mismatches(record, probe) == []
    wrong = {**probe, "text": {**probe["text"], "dim": 64}, "multiple": 32}
    assert loaded_mismatches(record, wrong) == [
        "text.dim: 64 loaded, 32 from the config files",
        "bucket sides are multiples of 16, the loaded codec needs multiples of 32"]
