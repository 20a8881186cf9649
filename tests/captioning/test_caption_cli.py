"""`lensforge caption` as a user runs it, against the local endpoint over loopback: the whole job, kill and resume,
the budget stop, the dry run, user errors, Ray workers, and the API key never written under DATA."""

import signal
import time
from pathlib import Path

import pytest
import yaml

from captioning.schema import read_captions
from captioning.tokens import image_tokens, text_tokens
from pipelines import cli
from tests.captioning.caption_runs import assert_each_ok_once, caption_args, ok_rows, start_caption


@pytest.fixture
def lensforge():
    return cli.main


args = caption_args


def assert_secret_nowhere(data: Path, secret: str):
    for path in data.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_whole_job_then_rerun_sends_nothing(lensforge, cap_endpoint, cap_data, kept_keys, capsys, cap_secret):
    handle, base_url = cap_endpoint
    assert lensforge(args(cap_data, base_url, "--variants", "dense,short", "--concurrency", "4")) == 0
    assert_each_ok_once(cap_data, kept_keys, ["dense", "short"])
    rows = read_captions(cap_data).to_pandas()
    assert rows["prompt_id"].str.match(r"^(dense|short)@[0-9a-f]{8}$").all()
    assert (rows["cost_usd"] > 0).all() and (rows["latency_s"] > 0).all() and rows["created_at"].notna().all()
    assert handle.stats()["requests"] == 2 * len(kept_keys)
    saved = yaml.safe_load((cap_data / "config.caption.yaml").read_text())["caption"]  # not among the parts
    assert saved["model"] == "gpt-4.1-mini" and saved["variants"] == ["dense", "short"]
    out = capsys.readouterr()
    assert "dense: ok 10" in out.out and "words/caption" in out.out and cap_secret not in out.out + out.err
    handle.reset()
    assert lensforge(args(cap_data, base_url, "--variants", "dense,short")) == 0
    assert handle.stats()["requests"] == 0
    assert_secret_nowhere(cap_data, cap_secret)


def test_a_new_captioner_captions_anew_beside_the_old_rows(lensforge, cap_endpoint, cap_data, kept_keys, capsys):
    handle, base_url = cap_endpoint
    assert lensforge(args(cap_data, base_url, "--variants", "short")) == 0
    handle.reset()
    assert lensforge(args(cap_data, base_url, "--variants", "short", "--dry-run", model="gpt-4.1")) == 0
    assert f"{len(kept_keys)} images pending" in capsys.readouterr().out
    assert lensforge(args(cap_data, base_url, "--variants", "short", model="gpt-4.1")) == 0
    assert handle.stats()["requests"] == len(kept_keys)
    ok = ok_rows(cap_data)
    for model in ("gpt-4.1-mini", "gpt-4.1"):  # both captioners' rows, each key once
        assert sorted(ok.loc[ok["model"] == model, "key"]) == sorted(kept_keys), model
    assert ok["served_model"].notna().all()
    handle.reset()
    assert lensforge(args(cap_data, base_url, "--variants", "short")) == 0  # the first captioner: nothing left
    assert handle.stats()["requests"] == 0


def test_json_mode_and_alt_hint(lensforge, cap_endpoint, cap_data, kept_keys, tmp_path):
    handle, base_url = cap_endpoint
    config = tmp_path / "lensforge.yaml"
    config.write_text(yaml.safe_dump({"caption": {"json_mode": True, "alt_hint": True}}))
    assert lensforge(args(cap_data, base_url, "--variants", "medium,tags", "--config", str(config))) == 0
    assert_each_ok_once(cap_data, kept_keys, ["medium", "tags"])
    assert handle.stats()["requests"] == len(kept_keys)  # one request per key for both variants


def test_kill_and_resume_never_asks_twice(cap_endpoint, cap_data, kept_keys, tmp_path):
    handle, base_url = cap_endpoint
    handle.set_faults(latency_s=0.4)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"caption": {"flush_rows": 1, "flush_s": 0.2}}))
    variants = ["dense", "short"]
    proc = start_caption(cap_data, base_url, "--variants", ",".join(variants), "--concurrency", "2",
                          "--config", str(config))
    deadline = time.monotonic() + 60
    while len(ok_rows(cap_data)) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = set(zip(*ok_rows(cap_data)[["key", "variant"]].to_numpy().T))
    assert 4 <= len(done) < len(kept_keys) * 2
    handle.reset()  # stats from here on: the rerun's requests only
    proc = start_caption(cap_data, base_url, "--variants", ",".join(variants), "--config", str(config))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    by_key = handle.stats()["by_key"]
    for key in kept_keys:  # no faults: each pair not ok at the kill is asked exactly once, the others never
        assert by_key.get(key, 0) == sum((key, v) not in done for v in variants), key
    assert_each_ok_once(cap_data, kept_keys, variants)


def test_budget_stops_cleanly_and_a_higher_budget_continues(lensforge, cap_endpoint, cap_data, kept_keys, capsys):
    handle, base_url = cap_endpoint
    budget = 0.0015  # ~6 dense captions of a 256² image with gpt-4.1-mini, reserved at ~3× their real cost
    assert lensforge(args(cap_data, base_url, "--max-cost-usd", str(budget), "--concurrency", "8")) == 0
    out = capsys.readouterr().out
    assert "stopped before the budget would be exceeded" in out
    rows = read_captions(cap_data).to_pandas()
    assert 0 < rows["cost_usd"].sum() <= budget and 0 < len(ok_rows(cap_data)) < len(kept_keys)
    first = set(ok_rows(cap_data)["key"])
    handle.reset()
    assert lensforge(args(cap_data, base_url, "--max-cost-usd", str(budget))) == 0  # same budget: spent already
    assert handle.stats()["requests"] <= 1
    assert lensforge(args(cap_data, base_url, "--max-cost-usd", "1")) == 0
    assert_each_ok_once(cap_data, kept_keys, ["dense"])
    assert not first & set(handle.stats()["by_key"])


def test_dry_run_estimates_by_the_tile_rule_and_sends_nothing(lensforge, cap_endpoint, cap_data, kept_keys, capsys):
    from captioning.config import CaptionConfig
    from captioning.pipeline import caption
    from captioning.presets import PRESETS

    handle, base_url = cap_endpoint
    assert lensforge(args(cap_data, base_url, "--variants", "dense,short", "--dry-run")) == 0
    assert "nothing was sent" in capsys.readouterr().out
    assert handle.stats()["requests"] == 0 and not list((cap_data / "captions").glob("part-*"))
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1", variants=["dense", "short"])
    est = caption(cap_data, cfg, dry=True)
    for v in ("dense", "short"):  # 256² renders: one 512-px tile at detail auto
        p = PRESETS[v]
        per_request = image_tokens(256, 256, "auto") + text_tokens(p.system) + text_tokens(p.instruction) + 8
        assert est["variants"][v]["prompt_tokens"] == per_request * len(kept_keys)
    caption(cap_data, cfg)
    rows = read_captions(cap_data).to_pandas()
    assert rows["prompt_tokens"].sum() == pytest.approx(est["total"]["prompt_tokens"], rel=0.03)


def test_user_errors_are_one_line(lensforge, cap_endpoint, cap_data, tmp_path, capsys, monkeypatch, cap_secret):
    handle, base_url = cap_endpoint
    assert lensforge(args(tmp_path / "empty", base_url)) == 2
    assert "no manifest" in capsys.readouterr().err
    assert lensforge(args(cap_data, base_url, "--variants", "dense,fancy")) == 2
    assert "unknown caption preset 'fancy'" in capsys.readouterr().err
    assert lensforge(args(cap_data, base_url, model="gpt-9")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("lensforge: error: model 'gpt-9' not found at http://127.0.0.1")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert lensforge(args(cap_data, "https://api.example.com/v1")) == 2
    assert "no API key: set the environment variable OPENAI_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    assert lensforge(args(cap_data, base_url)) == 2
    assert "401" in capsys.readouterr().err and handle.stats()["requests"] <= 64
    assert_secret_nowhere(cap_data, cap_secret)


def test_ray_workers_share_one_budget(lensforge, cap_endpoint, cap_data, kept_keys, cap_secret):
    import ray

    handle, base_url = cap_endpoint
    try:
        budget = 0.0015
        assert lensforge(args(cap_data, base_url, "--workers", "2", "--max-cost-usd", str(budget))) == 0
        assert 0 < read_captions(cap_data).to_pandas()["cost_usd"].sum() <= budget
        assert lensforge(args(cap_data, base_url, "--workers", "2", "--variants", "dense,short")) == 0
    finally:
        ray.shutdown()
    assert_each_ok_once(cap_data, kept_keys, ["dense", "short"])
    workers = {p.name.split("-")[3] for p in (cap_data / "captions").glob("part-*.parquet")}
    assert workers == {"000", "001"}
    assert_secret_nowhere(cap_data, cap_secret)
