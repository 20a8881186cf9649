import math
import pickle

import numpy as np
import pytest
import torch

from curation.config import ModelFiltersConfig
from curation.manifest import REJECT_REASONS
from curation.model_filters import (
    HEADS,
    MODEL_CHECKS,
    AestheticHead,
    ClipScorer,
    ProbeHead,
    load_head,
    model_reason,
    scores_at,
)
from curation.tiny_models import TINY_CLIP_CONFIG, write_tiny_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (90, 120), (200, 50), (33, 77)]]


TEXTS = ["a red circle", "", "two blue squares", "   "]


def test_checks_follow_manifest_order():
    i = REJECT_REASONS.index(MODEL_CHECKS[0])
    assert REJECT_REASONS[i : i + len(MODEL_CHECKS)] == MODEL_CHECKS


def test_tiny_clip_loaded_by_path_scores_in_range(tiny, images):
    scorer = ClipScorer(ModelFiltersConfig(**tiny, batch_size=3))  # 4 images: two batches
    assert scorer.enabled
    out = scorer(images, TEXTS)
    emb = out["embedding"]
    assert emb.shape == (4, TINY_CLIP_CONFIG["embed_dim"]) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cs = out["clip_score"]
    assert np.isnan(cs[[1, 3]]).all() and (np.abs(cs[[0, 2]]) <= 1).all()
    for name in ("nsfw", "watermark"):
        assert out[name].shape == (4,) and ((out[name] >= 0) & (out[name] <= 1)).all()
    assert out["aesthetic"].shape == (4,) and np.isfinite(out["aesthetic"]).all()
    empty = scorer([], [])
    assert empty["embedding"].shape == (0, 32) and empty["nsfw"].shape == (0,)
    # Batching does not change a row's scores.
    one_batch = ClipScorer(ModelFiltersConfig(**tiny, batch_size=64))(images, TEXTS)
    for k in ("embedding", "aesthetic", "nsfw", "watermark"):
        np.testing.assert_allclose(out[k], one_batch[k], atol=1e-5)


def test_heads_without_weights_are_skipped(tiny, images):
    cfg = ModelFiltersConfig(clip_model=tiny["clip_model"], clip_weights=tiny["clip_weights"])
    out = ClipScorer(cfg)(images[:2], TEXTS[:2])
    assert out["embedding"].shape == (2, 32) and all(out[h] is None for h in HEADS)
    row = scores_at(out, 1)
    assert row == {"clip_score": None, "aesthetic": None, "nsfw": None, "watermark": None}


def test_disabled_when_no_clip_model():
    scorer = ClipScorer(ModelFiltersConfig())
    assert not scorer.enabled
    assert all(v is None for v in scorer([np.zeros((8, 8, 3), np.uint8)], ["x"]).values())


def test_missing_paths_fail_clearly(tiny, tmp_path, images):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="CLIP model config not found: .*nope.json"):
        ClipScorer(ModelFiltersConfig(clip_model=missing, clip_weights=tiny["clip_weights"]))(images[:1], ["a"])
    bad_weights = ModelFiltersConfig(clip_model=tiny["clip_model"], clip_weights=str(tmp_path / "w.safetensors"))
    with pytest.raises(FileNotFoundError, match="CLIP weights not found: .*w.safetensors"):
        ClipScorer(bad_weights)(images[:1], ["a"])
    bad_head = ModelFiltersConfig(**(tiny | {"nsfw_head": str(tmp_path / "nsfw.pth")}))
    with pytest.raises(FileNotFoundError, match="head weights not found: .*nsfw.pth"):
        ClipScorer(bad_head)(images[:1], ["a"])
    with pytest.raises(ValueError, match="clip_weights is not set"):
        ClipScorer(ModelFiltersConfig(clip_model=tiny["clip_model"]))(images[:1], ["a"])


def test_scorer_pickles_without_its_model(tiny, images):
    scorer = ClipScorer(ModelFiltersConfig(**tiny))
    scorer(images[:1], ["a"])
    clone = pickle.loads(pickle.dumps(scorer))
    assert len(pickle.dumps(scorer)) < 10_000 and clone._loaded is None
    np.testing.assert_allclose(clone(images[:1], ["a"])["embedding"], scorer(images[:1], ["a"])["embedding"])


def test_heads_load_pth_state_dicts_and_check_width(tmp_path):
    torch.save(AestheticHead(32).state_dict(), tmp_path / "aesthetic.pth")  # the LAION predictor's file layout
    assert isinstance(load_head("aesthetic", str(tmp_path / "aesthetic.pth"), dim=32), AestheticHead)
    torch.save(ProbeHead((16, 8, 1)).state_dict(), tmp_path / "nsfw.pth")
    head = load_head("nsfw", str(tmp_path / "nsfw.pth"))
    assert head(torch.zeros(3, 16)).shape == (3,)
    with pytest.raises(ValueError, match="takes 16-d embeddings but the CLIP model gives 32-d"):
        load_head("nsfw", str(tmp_path / "nsfw.pth"), dim=32)


def test_model_reason_order_and_missing_scores():
    cfg = ModelFiltersConfig(min_clip_score=0.2, min_aesthetic=4.5, max_nsfw=0.5, max_watermark=0.5)
    good = {"clip_score": 0.3, "aesthetic": 5.0, "nsfw": 0.1, "watermark": 0.1}
    assert model_reason(good, cfg) is None
    assert model_reason({"clip_score": 0.1, "aesthetic": 1.0, "nsfw": 0.9, "watermark": 0.9}, cfg) == "clip_score"
    assert model_reason(good | {"aesthetic": 4.0, "nsfw": 0.9}, cfg) == "aesthetic"
    assert model_reason(good | {"nsfw": 0.9, "watermark": 0.9}, cfg) == "nsfw"
    assert model_reason(good | {"watermark": 0.51}, cfg) == "watermark"
    assert model_reason({"clip_score": math.nan, "aesthetic": None}, cfg) is None
