"""`lensforge caption` as the tests run it: the command line, a subprocess of it, and what its rows must show."""

import subprocess
import sys
from pathlib import Path

import pandas as pd

from captioning.schema import read_captions

REPO = Path(__file__).resolve().parents[2]


def caption_args(data, base_url, *extra, model="gpt-4.1-mini") -> list[str]:
    return ["caption", "--data", str(data), "--base-url", base_url, "--model", model, *extra]


def start_caption(data, base_url, *extra, model="gpt-4.1-mini") -> subprocess.Popen:
    """`python -m pipelines.cli caption ...` in its own process (stdout and stderr together), to kill or signal."""
    cmd = [sys.executable, "-m", "pipelines.cli", *caption_args(data, base_url, *extra, model=model)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ok_rows(data) -> pd.DataFrame:
    rows = read_captions(data).to_pandas()
    return rows[rows["status"] == "ok"]


def assert_each_ok_once(data, keys, variants):
    ok = ok_rows(data)
    assert sorted(zip(ok["key"], ok["variant"])) == sorted((k, v) for k in keys for v in variants)
