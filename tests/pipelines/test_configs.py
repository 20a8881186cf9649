"""Every YAML in configs/ loads every section it has through the stage's typed config."""

from pathlib import Path

import pytest

from pipelines.config import load_section, read_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "lens-800m-style.yaml", "vllm-captioner.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_section_validates(path):
    sections = read_yaml(path)
    assert sections, f"{path.name} has no sections"
    for section in sections:
        load_section(section, str(path), [])


def test_lens_config_is_lens():
    path = next(p for p in CONFIGS if p.name == "lens-800m-style.yaml")
    pre = load_section("precompute", str(path), [])
    train = load_section("train", str(path), [])
    caption = load_section("caption", str(path), [])
    assert len(pre.buckets.base_sides) * len(pre.buckets.ratios) == 27
    assert (pre.codec, pre.text_encoder) == (train.codec, train.text_encoder)  # else training refuses the shards
    assert train.preset == "lens-3.8b" and train.parallel.strategy == "fsdp" and train.precision == "bf16"
    assert (train.optim.lr, train.optim.betas, train.optim.grad_clip) == (2e-4, (0.9, 0.999), 1.0)
    assert caption.model == "gpt-4.1" and caption.batch_api
