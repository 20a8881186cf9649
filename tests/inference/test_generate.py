import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from inference.checkpoint import CheckpointSpec, save_random_checkpoint
from inference.config import get_preset
from inference.generate import ASPECTS, MAX_AREA, Pipeline, parse_size, size_for_aspect, validate_size
from pipelines import cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    spec = CheckpointSpec(model=get_preset("tiny").model_copy(update={"depth": 2}), codec="pixel",
                          text_encoder="minilm")
    save_random_checkpoint(run / "checkpoints" / "step_00000001", spec, seed=1)
    save_random_checkpoint(run / "checkpoints" / "step_00000002", spec, seed=2)
    return run


@pytest.fixture
def lensforge(monkeypatch):
    """`lensforge ...` with this issue's commands registered (cli.py's COMMAND_MODULES is the lead's)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["models", "generate"])
    return cli.main


def test_aspect_sizes_are_the_releases_tables_at_1024_and_1440():
    # the Lens pipeline's RESOLUTION_BUCKETS, written there as (height, width)
    released = {1024: {"1:2": (1472, 736), "9:16": (1376, 768), "2:3": (1248, 832), "3:4": (1152, 864),
                       "1:1": (1024, 1024), "4:3": (864, 1152), "3:2": (832, 1248), "16:9": (768, 1376),
                       "2:1": (736, 1472)},
                1440: {"1:2": (2080, 1040), "9:16": (1936, 1088), "2:3": (1760, 1168), "3:4": (1616, 1216),
                       "1:1": (1440, 1440), "4:3": (1216, 1616), "3:2": (1168, 1760), "16:9": (1088, 1936),
                       "2:1": (1040, 2080)}}
    for base, table in released.items():
        for aspect, (height, width) in table.items():
            assert size_for_aspect(aspect, base) == (width, height), (base, aspect)
            assert validate_size(width, height) == (width, height)  # 2080 × 1040 included
    assert size_for_aspect("1:1", 32) == (32, 32)  # other bases: nearest area, sides ÷ 16
    for aspect, (rw, rh) in ASPECTS.items():
        w, h = size_for_aspect(aspect, 256)
        assert w % 16 == 0 and h % 16 == 0 and abs(w * h / 256**2 - 1) < 0.1 and abs(w / h - rw / rh) < 0.1
    assert parse_size("1024x768") == (1024, 768) and MAX_AREA == 2080 * 1040
    for bad, match in ("1000x1000", "multiples of 16"), ("2096x1040", "cap"), ("big", "WIDTHxHEIGHT"):
        with pytest.raises(ValueError, match=match):
            parse_size(bad)
    with pytest.raises(ValueError, match="aspect"):
        size_for_aspect("5:1", 1024)
    with pytest.raises(ValueError, match="base size"):
        size_for_aspect("1:1", 4000)


def test_generate_cli_from_a_random_checkpoint(run_dir, tmp_path, lensforge, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle top left\n\nbig blue square\n")
    out = tmp_path / "out"
    code = lensforge(["generate", "a green triangle", "--prompts", str(prompts), "--run", str(run_dir),
                      "--out", str(out), "--n", "2", "--steps", "3", "--cfg", "4", "--seed", "7",
                      "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_00.png", "000_01.png", "000_grid.png", "001_00.png", "001_01.png", "001_grid.png",
                     "002_00.png", "002_01.png", "002_grid.png", "generate.json"]
    settings = json.loads((out / "generate.json").read_text())
    assert settings["checkpoint"][0].endswith("step_00000002/ema.safetensors") and settings["kind"] == "lensforge"
    assert (settings["width"], settings["height"], settings["steps"], settings["cfg"]) == (32, 32, 3, 4.0)
    assert [r["seed"] for r in settings["images"]] == [7, 8] * 3
    assert settings["images"][2]["prompt"] == "a red circle top left"
    from PIL import Image

    assert Image.open(out / "001_grid.png").size == (64, 32)

    # the same seed and prompt give the same image, whatever the batch
    again = tmp_path / "again"
    assert lensforge(["generate", "a red circle top left", "--checkpoint", str(run_dir / "checkpoints" /
                      "step_00000002"), "--out", str(again), "--n", "1", "--steps", "3", "--cfg", "4",
                      "--seed", "7", "--aspect", "1:1"]) == 0
    a, b = (np.asarray(Image.open(p), dtype=int) for p in (out / "001_00.png", again / "000_00.png"))
    assert np.abs(a - b).max() <= 1


def test_cli_errors_are_one_line_and_exit_2(run_dir, tmp_path, lensforge, capsys):
    cases = [
        (["generate", "x", "--run", str(tmp_path), "--out", str(tmp_path / "o")], "no checkpoints"),
        (["generate", "x", "--run", str(run_dir), "--out", str(tmp_path / "o"), "--size", "33x32"], "multiples"),
        (["generate", "x", "--run", str(run_dir), "--out", str(tmp_path / "o"), "--size", "2048x2048"], "cap"),
        (["generate", "x", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "not found"),
        (["generate", "x", "--run", str(run_dir), "--out", str(tmp_path / "o"), "--aspect", "7:3"], "aspect"),
        (["generate", "--run", str(run_dir), "--out", str(tmp_path / "o")], "PROMPT"),
        (["generate", "x", "--run", str(run_dir), "--out", str(tmp_path / "o"), "--prompts", "nope.txt"],
         "prompts file"),
        (["generate", "x", "--run", str(run_dir), "--out", str(tmp_path / "o"), "--steps", "0"], "steps"),
        (["generate", "x", "--run", str(run_dir), "--out", str(tmp_path / "o"), "--rewrite"], "rewrite"),
    ]
    for argv, match in cases:
        assert lensforge(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lensforge: error:") and match in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):  # argparse: --run and --checkpoint are exclusive, one is required
        lensforge(["generate", "x", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_models_lists_presets_with_parameter_counts(lensforge, capsys):
    assert lensforge(["models"]) == 0
    out = capsys.readouterr().out
    assert "lens-3.8b" in out and "4,104,225,152" in out and "tiny" in out and "minilm" in out


def test_pipeline_refuses_a_mismatched_text_encoder(run_dir, minilm):
    from inference.checkpoint import load_model, resolve_checkpoint
    from inference.codecs import load_codec

    weights, spec = resolve_checkpoint(run=run_dir)
    model = load_model(weights, spec)
    minilm_one_layer = type(minilm).__new__(type(minilm))
    minilm_one_layer.__dict__.update(minilm.__dict__, layers=(5,))
    with pytest.raises(ValueError, match="model wants 2 × 384"):
        Pipeline(model, load_codec("pixel"), minilm_one_layer)
    with pytest.raises(ValueError, match="channels"):
        Pipeline(model, load_codec("pixel:2"), minilm)


class _Chat(BaseHTTPRequestHandler):
    def do_POST(self):  # an OpenAI-compatible chat completion that upper-cases the user prompt
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = "DENSE: " + body["messages"][-1]["content"].upper()
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_prompt_rewriting_through_an_openai_compatible_endpoint(run_dir, tmp_path, lensforge):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        out = tmp_path / "rw"
        assert lensforge(["generate", "a red circle", "--run", str(run_dir), "--out", str(out), "--n", "1",
                          "--steps", "1", "--rewrite", "--rewrite-base-url", url, "--rewrite-model", "m"]) == 0
    finally:
        server.shutdown()
    record = json.loads((out / "generate.json").read_text())["images"][0]
    assert record == {"file": "000_00.png", "prompt": "a red circle", "model_prompt": "DENSE: A RED CIRCLE",
                      "seed": 0}


def test_batches_do_not_change_images(run_dir):
    from inference.checkpoint import resolve_checkpoint

    pipe = Pipeline.load(*resolve_checkpoint(run=run_dir))
    prompts = ["a red circle", "", "big green triangle on the right"]
    one = pipe.latents(prompts, 32, 32, steps=2, cfg=3.0, seeds=[1, 2, 3])
    parts = [pipe.latents(prompts[i:i + 1], 32, 32, steps=2, cfg=3.0, seeds=[i + 1]) for i in range(3)]
    assert torch.allclose(one, torch.cat(parts), atol=1e-4)


def test_lens_layout_end_to_end_with_tiny_flux2_vae_and_gpt_oss(tiny_vae, tiny_gpt_oss, tmp_path, lensforge):
    """The Lens path at toy size: FLUX.2 VAE latents, patch 2 over 32 channels, GPT-OSS layers 5/11/17/23."""
    cfg = get_preset("tiny").model_copy(update={"name": "lens-toy", "depth": 2, "in_channels": 32, "patch": 2,
                                                "text_dim": 32, "text_layers": 4, "base_size": 64})
    spec = CheckpointSpec(model=cfg, codec=f"flux2:{tiny_vae}", text_encoder=f"gpt-oss:{tiny_gpt_oss}")
    step = save_random_checkpoint(tmp_path / "step_00000001", spec)
    out = tmp_path / "out"
    assert lensforge(["generate", "a red circle", "--checkpoint", str(step), "--out", str(out), "--n", "2",
                      "--steps", "2", "--aspect", "1:2"]) == 0
    settings = json.loads((out / "generate.json").read_text())
    assert (settings["width"], settings["height"]) == (48, 96)  # 1:2 at 64² area, sides ÷ 16
    from PIL import Image

    assert Image.open(out / "000_00.png").size == (settings["width"], settings["height"])


def copy_step(run_dir, tmp_path):
    """A run of its own holding a copy of `run_dir`'s latest step (to cut or delete files in)."""
    import shutil

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", step)
    return tmp_path / "run", step


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("lensforge: error:") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("name, extra", [("ema.safetensors", []), ("model.safetensors", ["--no-ema"])])
def test_a_truncated_checkpoint_is_one_line_naming_the_file(run_dir, tmp_path, lensforge, capsys, name, extra):
    run, step = copy_step(run_dir, tmp_path)
    weights = step / name
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a copy cut short
    assert lensforge(["generate", "x", "--run", str(run), "--out", str(tmp_path / "o"), "--steps", "1", *extra]) == 2
    assert f"{weights} is truncated or not a safetensors file" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_no_ema_refuses_a_step_without_model_weights(run_dir, tmp_path, lensforge, capsys):
    run, step = copy_step(run_dir, tmp_path)
    (step / "model.safetensors").unlink()
    assert lensforge(["generate", "x", "--run", str(run), "--out", str(tmp_path / "o"), "--no-ema"]) == 2
    err = one_error_line(capsys)
    assert f"{step} has no model.safetensors, only ema.safetensors" in err and not (tmp_path / "o").exists()


def test_non_finite_guidance_and_lora_scales_are_refused(run_dir, tmp_path, lensforge, capsys):
    out = tmp_path / "o"
    for bad in "nan", "inf", "-1":
        assert lensforge(["generate", "x", "--run", str(run_dir), "--out", str(out), "--cfg", bad]) == 2
        assert f"--cfg {float(bad)}: must be a finite number ≥ 0" in one_error_line(capsys)
    assert lensforge(["generate", "x", "--run", str(run_dir), "--out", str(out), "--lora", "a.safetensors:nan"]) == 2
    assert "--lora a.safetensors:nan: the scale of a.safetensors must be a finite number" in one_error_line(capsys)
    assert not out.exists()
    from inference.checkpoint import resolve_checkpoint

    pipe = Pipeline.load(*resolve_checkpoint(run=run_dir))  # the Python API refuses it too, before encoding
    with pytest.raises(ValueError, match=r"guidance scale \(cfg\) nan"):
        pipe.generate(["x"], 32, 32, steps=1, cfg=float("nan"))


def test_sampling_shows_progress_and_warns_when_the_cpu_will_be_slow(run_dir, tmp_path, lensforge, capsys,
                                                                      monkeypatch):
    from pipelines.commands import generate as command

    argv = ["generate", "x", "--run", str(run_dir), "--out", str(tmp_path / "o"), "--n", "3", "--batch-size", "2",
            "--steps", "2", "--device", "cpu"]
    assert lensforge(argv) == 0
    err = capsys.readouterr().err  # not a terminal: plain progress lines (common/progress.py)
    assert "generate: 4/4 (100 %)" in err and "warning" not in err  # 2 batches × 2 steps; tiny at 32²: fast
    monkeypatch.setattr(command, "CPU_FLOPS", 1e5)  # a CPU slow enough that even this step takes long
    assert lensforge(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("generate: warning: 32x32 on the CPU takes about ")
    assert "s a sampling step" in warnings[0] and "--device cuda" in warnings[0]
