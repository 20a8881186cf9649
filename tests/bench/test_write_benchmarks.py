"""BENCHMARKS.md from fake rows: one table with ratios and goals, the machine, the date and the commands."""

import json

from bench.report import ENV, emit, row
from bench.write_benchmarks import KEEP_MARKER, goal_cell, kept_tail, machine, render_markdown

RUNS = [{"stage": "caption", "command": ".venv/bin/python -m bench.caption", "seconds": 12.0, "returncode": 0},
        {"stage": "train", "command": ".venv/bin/python -m bench.train", "seconds": 3.0, "returncode": 1}]
INFO = {"cpu": "AMD EPYC 7B13", "cores": 2, "ram_gib": 23.4, "gpu": "none", "torch": "2.14.1", "python": "3.11.7",
        "os": "Linux", "load": (1.5, 2.0)}


def test_rows_go_to_the_env_file_only(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    emit([row("x", "y", 1.0, "s")])  # no file named: nothing happens
    path = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(path))
    emit([row("caption", "req/s", 293.8, "req/s", peer=320, peer_name="ceiling", goal=">= 0.8")])
    emit([row("model", "step", float("nan"), "s")])
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert abs(first["ratio"] - 293.8 / 320) < 1e-9 and first["goal"] == ">= 0.8"
    assert second["value"] is None and second["ratio"] is None  # NaN is no figure, and stays valid JSON


def test_table_has_ratios_goals_machine_and_commands():
    rows = [row("caption", "requests/s at 64 in flight", 293.8, "req/s", peer=320, peer_name="ceiling 64 / 0.2 s",
                goal=">= 0.8"),
            row("model", "train step", 1.34, "s", peer=1.19, peer_name="SD3", goal="<= 1.0"),
            row("train", "data-wait fraction", 2.5, "%", goal="<= 5", goal_of="value"),
            row("curate", "pixel filters | dedup", 117.0, "images/s per core")]
    text = render_markdown(rows, RUNS, INFO, "python -m bench.write_benchmarks", "2025-01-01 00:00 UTC")
    lines = text.splitlines()
    assert "| stage | figure | lensforge | peer or limit | ratio | goal |" in lines
    assert ("| caption | requests/s at 64 in flight | 293.8 req/s | ceiling 64 / 0.2 s 320.0 req/s | 0.92× "
            "| ≥ 0.8× — met |") in lines
    assert any(line.startswith("| model | train step |") and "1.13×" in line and "**not met**" in line
               for line in lines)
    assert any("data-wait" in line and "≤ 5 % — met" in line for line in lines)
    assert any("pixel filters \\| dedup" in line and line.endswith("| — | — |  |") for line in lines)
    assert "AMD EPYC 7B13, 2 cores, 23.4 GiB RAM, GPU: none; torch 2.14.1" in text and "2025-01-01" in text
    assert "`python -m bench.write_benchmarks`" in text and "train: `.venv/bin/python -m bench.train`" in text
    assert "failed with exit code 1" in text and "smoke run" not in text
    assert "smoke run" in render_markdown(rows, RUNS, INFO, "c", "d", quick=True)


def test_goal_without_a_number_to_compare():
    assert goal_cell(row("x", "y", 1.0, "s", goal=">= 0.9")) == "≥ 0.9×"  # no peer, no ratio
    assert goal_cell(row("x", "y", 1.0, "s", goal="as fast as possible")) == "as fast as possible"


def test_machine_names_this_machine():
    info = machine()
    assert info["cores"] and info["cpu"] and info["torch"] and info["gpu"]


def test_hand_run_sections_survive_a_rewrite():
    old = "# Benchmarks\n\n| old table |\n\n" + KEEP_MARKER + "\n\n## Data stages at scale\n\nfigures\n"
    assert kept_tail(old).lstrip().startswith(KEEP_MARKER) and kept_tail(old).endswith("figures\n")
    assert "old table" not in kept_tail(old) and kept_tail("# Benchmarks\n| t |\n") == ""

