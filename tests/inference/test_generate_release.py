"""`lensforge generate` from a Lens release root, its transformer/ folder and a single file; noise; offload."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from inference.flow import initial_noise
from inference.generate import Pipeline
from pipelines import cli
from tests.inference.tiny_release import save_tiny_release

DATE = "2025-08-05"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return save_tiny_release(tmp_path_factory.mktemp("lens") / "Lens", seed=4)


def generate(tmp_path, name, *extra) -> tuple[np.ndarray, dict]:
    out = tmp_path / name
    argv = ["generate", "a big red circle on the left", "--out", str(out), "--size", "64x64", "--steps", "2",
            "--n", "1", "--cfg", "4", "--seed", "3", "--date", DATE, *extra]
    assert cli.main(argv) == 0
    return np.asarray(Image.open(out / "000_00.png")), json.loads((out / "generate.json").read_text())


def test_a_release_root_generates_end_to_end_with_its_vae_text_encoder_and_date(release, tmp_path):
    image, settings = generate(tmp_path, "root", "--checkpoint", str(release))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert settings["kind"] == "release" and settings["codec"] == f"flux2:{release / 'vae'}"
    text = settings["text_encoder"]
    assert text["layers"] == [1, 4, 9, 23] and text["template"]["date"] == DATE and text["template"]["offset"] == 97
    assert settings["noise"] == "tokens" and settings["dtype"] == "torch.float32"
    again, _ = generate(tmp_path, "again", "--checkpoint", str(release))
    assert np.array_equal(image, again)  # a seed is an image
    other_date, _ = generate(tmp_path, "date", "--checkpoint", str(release), "--date", "2026-01-02")
    assert not np.array_equal(image, other_date)  # the chat's date line reaches the features


def test_a_bare_transformer_and_a_single_file_need_a_codec_and_give_the_same_image(release, tmp_path, capsys):
    image, _ = generate(tmp_path, "root", "--checkpoint", str(release))
    bare = tmp_path / "bare" / "transformer"
    shutil.copytree(release / "transformer", bare)
    assert cli.main(["generate", "x", "--checkpoint", str(bare), "--out", str(tmp_path / "no")]) == 2
    assert "names no codec or text encoder" in capsys.readouterr().err
    given = ["--codec", f"flux2:{release / 'vae'}", "--text-encoder", f"gpt-oss:{release}"]
    from_bare, _ = generate(tmp_path, "bare-out", "--checkpoint", str(bare), *given)
    assert cli.main(["export", str(release), "--out", str(tmp_path / "single"), "--format", "single-file",
                     "--prefix", "model.diffusion_model."]) == 0
    single = next((tmp_path / "single").glob("*.safetensors"))
    from_single, settings = generate(tmp_path, "single-out", "--checkpoint", str(single))
    assert settings["kind"] == "lensforge"  # our export carries the spec: codec and text encoder known
    assert np.array_equal(image, from_bare) and np.array_equal(image, from_single)


def test_release_latents_with_bf16_weights(tmp_path):
    root = save_tiny_release(tmp_path / "bf16", dtype=torch.bfloat16)
    pipe = Pipeline.from_path(root, date=DATE)
    assert pipe.dtype == torch.bfloat16 and pipe.autocast is None
    z = pipe.latents(["a red circle"], 64, 64, steps=2, cfg=4.0, seeds=[0])
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()


def test_token_layout_noise_is_the_lens_pipelines_draw():
    # the Lens pipeline: randn((1, h·w, C·p²), generator=Generator().manual_seed(seed), dtype), unpacked to the latent
    for dtype in torch.float32, torch.bfloat16:
        noise = initial_noise((2, 32, 6, 4), [5, 9], layout="tokens", patch=2, dtype=dtype)
        tokens = torch.randn((1, 3 * 2, 128), generator=torch.Generator().manual_seed(9), dtype=dtype)
        unpacked = tokens.reshape(1, 3, 2, 32, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 32, 6, 4)
        assert noise.dtype == dtype and torch.equal(noise[1:], unpacked)
    assert not torch.equal(initial_noise((1, 32, 6, 4), [5], layout="tokens", patch=2),
                           initial_noise((1, 32, 6, 4), [5], layout="latent"))
    with pytest.raises(ValueError, match="noise layout"):
        initial_noise((1, 4, 2, 2), [0], layout="pixels")


def test_offload_moves_each_model_to_the_device_only_for_its_part():
    moves = []

    class Stub(torch.nn.Module):
        def to(self, device):
            moves.append(str(device))
            return self

    pipe = Pipeline.__new__(Pipeline)
    pipe.offload, pipe.device = True, torch.device("cuda:0")  # no GPU needed: the stub records the moves
    with pipe.visit(Stub()):
        moves.append("work")
    with pipe.visit(Stub(), torch.device("cpu")):  # a text encoder kept on the CPU never moves
        moves.append("cpu work")
    pipe.offload = False
    with pipe.visit(Stub()):
        moves.append("resident")
    assert moves == ["cuda:0", "work", "cpu", "cpu work", "resident"]


def test_a_release_whose_scheduler_is_not_lenss_is_refused_by_field(release, tmp_path):
    root = tmp_path / "other"
    shutil.copytree(release, root)
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "use_dynamic_shifting": False}))
    with pytest.raises(ValueError, match="use_dynamic_shifting=False"):
        Pipeline.from_path(root)
