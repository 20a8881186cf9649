"""bench/scale.py on a few hundred rows, so the script does not rot between real measurements: the synthetic
state is in the real formats (the stages read it through lensforge's own code) and each stage reports sane counts."""

import json

from bench import scale
from bench.report import ENV


def test_small_sizes_measure_every_post_download_stage(tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    results = scale.main(["--sizes", "300", "--stages", "dedup,caption,precompute", "--out", str(tmp_path)])
    for n in (300,):
        dedup, caption, pre = (results[s][n]["result"] for s in ("dedup", "caption", "precompute"))
        assert dedup["rows"] == n and 0.8 * n < dedup["kept"] < 0.9 * n  # 10 % rejected, ~2 % duplicates
        assert caption["pending"] == dedup["kept"] // 2  # every other kept key is captioned already
        assert pre["candidates"] == dedup["kept"] - caption["pending"] and pre["errors"] == 0
        assert all(results[s][n]["rss_mb"] > 50 and results[s][n]["seconds"] > 0 for s in results)
    emitted = [json.loads(line) for line in rows.read_text().splitlines()]
    assert {r["figure"] for r in emitted} >= {"dedup driver peak RSS at 300 rows", "caption µs per row at 300 rows"}
