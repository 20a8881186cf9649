"""bench/gpu.py and bench/load.py run end to end on tiny sizes (a CPU), so that the prepared GPU script and the
full-size load benchmark do not rot between the sessions that have the hardware and the time for them."""

import json

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


def test_load_benchmark_on_a_small_release(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    assert load.main(["--preset", "tiny", "--repeats", "1", "--dir", str(tmp_path), "--shard-size", "2MB"]) == 0
    out = capsys.readouterr().out
    assert "2,565,168 parameters" in out and "shard(s)" in out
    peak, seconds, copying = (json.loads(line) for line in rows.read_text().splitlines())
    assert peak["goal"] == "<= 1.15" and peak["value"] > 0 and seconds["peer"] > 0 and copying["peer"] > 0
