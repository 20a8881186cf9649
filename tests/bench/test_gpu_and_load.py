"""bench/gpu.py and bench/load.py run end to end on tiny sizes (a CPU), so that the prepared GPU script and the
full-size load benchmark do not rot between the sessions that have the hardware and the time for them."""

import json
import math

import pytest
import torch

from bench import gpu, load
from bench.report import ENV


def test_gpu_script_on_a_cpu_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    for extra in [], ["--offload"]:
        assert gpu.main(["--small", "--device", "cpu", "--size", "32", "--steps", "1", "--repeats", "1", *extra]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["offload"] for r in results] == [False, True] and all(r["sample_and_decode_s"] > 0 for r in results)
    figures = [json.loads(line)["figure"] for line in rows.read_text().splitlines()]
    assert len(figures) == 3 and "all resident" in figures[0] and "--offload" in figures[2]


def test_gpu_script_times_a_distilled_students_four_steps_without_cfg(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    assert gpu.main(["--small", "--device", "cpu", "--size", "32", "--steps", "4", "--cfg", "1", "--repeats", "1"]) == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert (result["steps"], result["cfg"]) == (4, 1.0) and result["sample_and_decode_s"] > 0
    memory, timing = [json.loads(line) for line in rows.read_text().splitlines()]
    assert "4 steps without CFG" in memory["figure"]
    assert "no CFG (a distilled student)" in timing["figure"] and timing["peer"] == gpu.TURBO_H100_SECONDS


def test_training_rows_on_a_cpu_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    for mode in "lora", "full":
        assert gpu.main(["--small", "--device", "cpu", "--size", "32", "--repeats", "1", "--batch", "2",
                         "--train", mode]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    lora, full = results
    # LoRA trains the adapters only: r · (in + out) per target, a fraction of the full model's parameters.
    assert 0 < lora["trainable"] < full["trainable"] / 2 and lora["image_tokens"] == 4 and lora["text_tokens"] == 100
    assert all(math.isfinite(r["loss"]) and r["step_s"] > 0 for r in results)
    found = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["figure"] for r in found] == [
        f"{kind}train step, {label}, 32², batch 2" for label in ("LoRA r 64, bf16 base",
                                                                  "full fine-tune, fp32 master + AdamW")
        for kind in ("", "peak GPU memory, ", "MFU, ")]
    assert all(r["value"] is not None and r["value"] > 0 for r in found)  # None = not finite (bench/report.py)


def test_a_step_out_of_memory_reports_that_it_does_not_fit(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    tried = []

    def out_of_memory(mode, cfg, model_cfg, device, batch, *rest):
        tried.append(batch)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu, "measure_training", out_of_memory)
    assert gpu.main(["--small", "--device", "cpu", "--size", "1024", "--train", "full"]) == 0
    assert tried == [6, 1]  # the config's micro-batch at 1024², then 1
    (found,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert "does not fit on one GPU" in found["figure"] and found["value"] is None
    assert "out of memory at batch 6, 1" in found["note"] and "FSDP2 over 8 GPUs" in found["note"]


def test_memory_arithmetic_of_lens():
    from inference.config import get_preset
    from pipelines.config import load_section

    model, lora = get_preset("lens-3.8b"), load_section("train", str(gpu.CONFIGS / "lens-lora.yaml"), []).lora
    total, block, adapters = gpu.param_counts(model, lora)
    assert total == 4_104_225_152 and adapters == 160_432_128  # 48 blocks × 18 · 64 · (D + M/3) per block
    one = gpu.memory_arithmetic(model, "full", 1, 1024, 1)
    assert one["states"] == pytest.approx(20 * total / 2**30) and one["total"] > 80  # not on an 80 GB GPU
    eight = gpu.memory_arithmetic(model, "full", 8, 1024, 6)
    assert eight["states"] == pytest.approx(one["states"] / 8) and eight["total"] < 24
    # Activations scale with the batch's tokens; LoRA keeps the bf16 base (2 B a parameter) on every GPU.
    assert gpu.memory_arithmetic(model, "full", 8, 1024, 12)["activations"] == pytest.approx(2 * eight["activations"])
    lora_1024 = gpu.memory_arithmetic(model, "lora", 8, 1024, 6, lora)
    assert lora_1024["weights"] == pytest.approx(2 * total / 2**30)
    assert lora_1024["states"] == pytest.approx(20 * adapters / 2**30)
    table = gpu.arithmetic_table(model, lora)
    assert table.count("\n") == len(gpu.ARITHMETIC_CASES) + 1 and "| full, FSDP2 | 8 | 1024² | 6 |" in table


def test_load_benchmark_on_a_small_release(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    assert load.main(["--preset", "tiny", "--repeats", "1", "--dir", str(tmp_path), "--shard-size", "2MB"]) == 0
    out = capsys.readouterr().out
    assert "2,565,168 parameters" in out and "shard(s)" in out
    peak, seconds, copying = (json.loads(line) for line in rows.read_text().splitlines())
    assert peak["goal"] == "<= 1.15" and peak["value"] > 0 and seconds["peer"] > 0 and copying["peer"] > 0
