"""Tiny models written to disk and loaded back by path, as real weights are: no hub, no network
(tests/inference/tiny_models.py builds them)."""

from __future__ import annotations

import os

import pytest

from tests.inference.tiny_models import IDENTITY_97, save_tiny_gpt_oss, save_tiny_lens_release, save_tiny_vae

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory):
    """A plain GPT-OSS directory: random 24-layer model, tokenizer with a harmony chat template whose chat before
    the prompt is not Lens's 97 tokens (86)."""
    return save_tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss"))


@pytest.fixture(scope="session")
def tiny_gpt_oss_97(tmp_path_factory):
    """The same weights, with a chat template whose chat before the prompt is exactly Lens's 97 tokens."""
    return save_tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss_97"), IDENTITY_97)


@pytest.fixture(scope="session")
def tiny_lens_release(tmp_path_factory, tiny_vae):
    """A Lens release root (model_index.json, text_encoder/, tokenizer/, transformer/, vae/), layers 1, 4, 9, 23."""
    return save_tiny_lens_release(tmp_path_factory.mktemp("lens") / "lens", vae=tiny_vae)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("flux2_vae"))


@pytest.fixture(scope="session")
def minilm():
    from inference.text import load_text_encoder

    return load_text_encoder("minilm")
