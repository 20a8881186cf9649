import json

import pytest
import torch
from safetensors.torch import save_file

from inference.checkpoint import (
    CheckpointSpec,
    latest_step_dir,
    load_model,
    read_spec,
    resolve_checkpoint,
    save_checkpoint,
    save_random_checkpoint,
    save_weights,
)
from inference.config import get_preset
from inference.mmdit import MMDiT

SPEC = CheckpointSpec(model=get_preset("tiny").model_copy(update={"depth": 1}), codec="pixel", text_encoder="minilm")


def test_round_trip_with_the_config_travelling_with_the_weights(tmp_path):
    step = save_random_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000005", SPEC, seed=3)
    assert sorted(p.name for p in step.iterdir()) == ["ema.safetensors", "model.safetensors", "model_config.json"]
    assert json.loads((step / "model_config.json").read_text())["model"]["name"] == "tiny"
    weights, spec = resolve_checkpoint(run=tmp_path / "run")
    assert weights.name == "ema.safetensors" and spec == SPEC
    assert resolve_checkpoint(checkpoint=step, prefer_ema=False)[0].name == "model.safetensors"
    (step / "model_config.json").unlink()  # the safetensors metadata alone suffices
    model = load_model(weights, read_spec(weights))
    torch.manual_seed(3)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), MMDiT(SPEC.model).parameters()))
    x, t, text = torch.randn(1, 48, 8, 8), torch.rand(1), torch.randn(1, 3, 768)
    assert model(x, t, text).abs().sum() > 0  # perturbed: not the adaLN-zero all-zero output


def test_latest_step_wins(tmp_path):
    model = MMDiT(SPEC.model)
    for step in 9, 10, 100:
        save_checkpoint(tmp_path / "checkpoints" / f"step_{step:08d}", model, SPEC)
    (tmp_path / "checkpoints" / "step_00000200.tmp").mkdir()  # half-written: not a step
    assert latest_step_dir(tmp_path).name == "step_00000100"
    assert resolve_checkpoint(run=tmp_path)[0].name == "model.safetensors"  # no EMA there


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tmp_path):
    state = MMDiT(SPEC.model).state_dict()
    state.pop("proj_out.bias")
    state["extra.weight"] = torch.zeros(2)
    state["img_in.weight"] = torch.zeros(3, 3)
    path = save_weights(tmp_path / "model.safetensors", state, SPEC)
    with pytest.raises(ValueError) as err:
        load_model(path, SPEC)
    message = str(err.value)
    assert "\n" not in message
    assert "1 missing: proj_out.bias" in message and "1 unexpected: extra.weight" in message
    assert "img_in.weight (3, 3)≠(128, 48)" in message


def test_unusable_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        resolve_checkpoint(run=tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint(checkpoint=tmp_path / "nope")
    (tmp_path / "model.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="only .safetensors"):
        resolve_checkpoint(checkpoint=tmp_path / "model.pt")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no model config"):
        resolve_checkpoint(checkpoint=tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_checkpoint()


def test_step_directories_have_one_owner(tmp_path):
    from inference.checkpoint import step_dir_name, step_of

    assert step_dir_name(42) == "step_00000042" and step_of(tmp_path / "step_00000042") == 42
    for bad in "step_42", "step_00000042.tmp", ".tmp-step_00000042":
        with pytest.raises(ValueError, match="step_XXXXXXXX"):
            step_of(tmp_path / bad)


def test_a_checkpoint_from_before_the_released_architecture_is_refused_by_name(tmp_path):
    path = save_weights(tmp_path / "model.safetensors", {"blocks.0.img.qkv.weight": torch.zeros(3, 3)}, SPEC)
    with pytest.raises(ValueError, match="before the released Lens architecture"):
        load_model(path, SPEC)


def test_no_ema_refuses_a_step_that_holds_only_the_ema_weights(tmp_path):
    from inference.checkpoint import describe_denoiser

    step = save_random_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", SPEC)
    assert describe_denoiser(step, prefer_ema=False).files == (step / "model.safetensors",)
    (step / "model.safetensors").unlink()
    assert describe_denoiser(step).files == (step / "ema.safetensors",)  # EMA preferred, and there
    for call in (lambda: describe_denoiser(tmp_path / "run", prefer_ema=False),
                 lambda: resolve_checkpoint(checkpoint=step, prefer_ema=False)):
        with pytest.raises(FileNotFoundError, match=r"has no model.safetensors, only ema.safetensors"):
            call()


def test_describing_a_step_reads_its_header_once(tmp_path, monkeypatch):
    from inference import checkpoint

    step = save_random_checkpoint(tmp_path / "step_00000001", SPEC)
    calls = []
    real = checkpoint.read_header
    monkeypatch.setattr(checkpoint, "read_header", lambda path: calls.append(path) or real(path))
    assert checkpoint.describe_denoiser(step).spec == SPEC
    assert calls == [step / "ema.safetensors"]


def test_a_truncated_weights_file_is_refused_from_its_header(tmp_path):
    from inference.weights_io import read_header

    step = save_random_checkpoint(tmp_path / "step_00000001", SPEC)
    weights = step / "ema.safetensors"
    raw = weights.read_bytes()
    for cut in 0, 5, 100, len(raw) - 1:
        weights.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=f"{weights} is truncated or not a safetensors file"):
            read_header(weights)
