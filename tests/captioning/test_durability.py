"""Captioning durability: an answer that reached lensforge is on disk before a kill can lose it (journal, then
parts), SIGTERM / SIGINT drain and say so in one line, unreadable images end as error rows instead of a hang, and
replay skips torn lines and never duplicates a row.

The kill test runs the real CLI (`python -m pipelines.cli caption`) against the local endpoint, with latency so that
requests are in flight, SIGKILLs it at seeded random moments and compares the endpoint's own count of answered
requests (GET /_lensforge/stats "answered") with the rows on disk: after each kill the gap may grow by at most the
requests in flight (≤ concurrency), and a clean finish adds nothing to it."""

import io
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from datetime import datetime, timezone

import pandas as pd
import pytest
import yaml

from captioning.journal import Journal, journal_dir, replay, unreplayed_rows
from captioning.presets import PRESETS
from captioning.schema import read_captions
from curation.manifest import read_manifest
from curation.pipeline import write_manifest
from pipelines import cli
from tests.captioning.caption_runs import REPO, assert_each_ok_once, caption_args, start_caption

CONCURRENCY = 4
VARIANTS = ["dense", "short"]
STOP_LINE = re.compile(r"caption: stopped by (SIGTERM|SIGINT): (\d+) answer row\(s\) of this run saved in \S+, "
                       r"(\d+) request\(s\) in flight abandoned \(drain_s [\d.]+\); rerun the same command to finish "
                       r"what is left")


def start(data, base_url, *extra) -> subprocess.Popen:
    return start_caption(data, base_url, "--variants", ",".join(VARIANTS), "--concurrency", str(CONCURRENCY), *extra)


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"caption exited early ({proc.returncode}): {proc.communicate()[0][-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def wait_idle(handle) -> dict:
    """The endpoint's stats once nothing is in flight there (a killed client's requests are cancelled)."""
    wait_for(lambda: handle.stats()["in_flight"] == 0, 15)
    return handle.stats()


def disk_rows(data) -> pd.DataFrame:
    """Every row on disk: the parts, plus what journals hold that no part does yet."""
    journaled, _ = unreplayed_rows(data)
    parts = read_captions(data).to_pandas()
    return pd.concat([parts, pd.DataFrame(journaled, columns=parts.columns)], ignore_index=True)


def kept(data) -> list[str]:
    manifest = read_manifest(data, columns=["key", "keep"]).to_pandas()
    return sorted(manifest.loc[manifest["keep"], "key"])


def test_sigkill_at_random_moments_loses_only_what_was_in_flight(cap_endpoint, cap_large_data, capsys):
    handle, base_url = cap_endpoint
    handle.set_faults(latency_s=0.4, latency_jitter_s=0.6, rate_refusal=0.05, seed=3)  # refusals: re-asked
    rng = random.Random(14)
    gap, log = 0, []
    for run in range(4):
        sent = handle.stats()["requests"]
        proc = start(cap_large_data, base_url)
        wait_for(lambda: handle.stats()["requests"] > sent, 30, proc)  # counted from its first request
        time.sleep(rng.uniform(1, 4))
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        in_flight = handle.stats()["in_flight"]
        proc.kill()
        out = proc.communicate(timeout=10)[0]
        if run:  # the journal that the previous kill left was replayed first, its torn lines counted
            assert "caption: replayed " in out, out[-2000:]
        stats = wait_idle(handle)
        rows = disk_rows(cap_large_data)
        lost = stats["answered"] - len(rows)
        log.append({"answered": stats["answered"], "on_disk": len(rows), "in_flight_at_kill": in_flight,
                    "lost_this_kill": lost - gap})
        assert 0 <= lost - gap <= CONCURRENCY, log
        gap = lost
    proc = start(cap_large_data, base_url)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    stats = wait_idle(handle)
    rows = read_captions(cap_large_data).to_pandas()
    assert not list(journal_dir(cap_large_data).glob("*.jsonl"))  # all compacted into parts
    assert stats["answered"] - len(rows) == gap  # a clean finish loses nothing
    # Per key: answers the endpoint gave that no row holds are the in-flight ones only; nothing else asked twice.
    per_key = Counter(stats["answered_by_key"])
    per_key.subtract(Counter(rows["key"]))
    assert min(per_key.values()) >= 0 and sum(per_key.values()) == gap <= 4 * CONCURRENCY
    assert_each_ok_once(cap_large_data, kept(cap_large_data), VARIANTS)
    with capsys.disabled():
        print(f"\nkills (answered by the endpoint vs rows on disk): {log}")


def stop_with_sigterm(proc, handle, data, timeout: float) -> tuple[dict, pd.DataFrame, re.Match]:
    """SIGTERM `proc`, check it exits 143 with the one stop line and nothing abandoned; (endpoint stats once idle,
    the rows on disk, the stop line's match)."""
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    line = STOP_LINE.fullmatch(out.strip().splitlines()[-1])
    assert line and line[1] == "SIGTERM" and line[3] == "0", out[-2000:]
    return wait_idle(handle), read_captions(data).to_pandas(), line


def test_sigterm_drains_the_requests_in_flight_and_saves_them(cap_endpoint, cap_large_data):
    handle, base_url = cap_endpoint
    handle.set_faults(latency_s=1.0)
    proc = start(cap_large_data, base_url)
    wait_for(lambda: handle.stats()["answered"] >= 6, 30, proc)
    sent = handle.stats()["requests"]
    stats, rows, line = stop_with_sigterm(proc, handle, cap_large_data, 60)
    assert stats["answered"] == len(rows) == int(line[2])  # every answer, the drained ones too, is in a part
    assert stats["requests"] == stats["answered"] and not list(journal_dir(cap_large_data).glob("*.jsonl"))
    assert stats["requests"] <= sent + CONCURRENCY  # nothing new after the signal (bar the moment it took)
    assert len(rows) < 2 * len(kept(cap_large_data))
    done = set(zip(rows.loc[rows["status"] == "ok", "key"], rows.loc[rows["status"] == "ok", "variant"]))
    handle.reset()
    proc = start(cap_large_data, base_url)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-2000:]
    keys = kept(cap_large_data)
    assert handle.stats()["requests"] == 2 * len(keys) - len(done)  # the rest, each asked once
    assert_each_ok_once(cap_large_data, keys, VARIANTS)


@pytest.mark.parametrize("drain_s, signals", [(0.2, 1), (30.0, 2)], ids=["drain-ends", "second-sigint"])
def test_sigint_abandons_what_is_still_in_flight_after_the_drain(cap_endpoint, cap_large_data, tmp_path, drain_s,
                                                                 signals):
    handle, base_url = cap_endpoint
    handle.set_faults(latency_s=3.0)  # longer than the drain (or the gap to the second Ctrl-C)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"caption": {"drain_s": drain_s}}))
    proc = start(cap_large_data, base_url, "--config", str(config))
    wait_for(lambda: handle.stats()["in_flight"] == CONCURRENCY, 30, proc)
    started = time.monotonic()
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    out = proc.communicate(timeout=30)[0]
    assert time.monotonic() - started < 2.5  # not the 3 s the answers would take
    assert proc.returncode == 128 + signal.SIGINT, out[-2000:]
    line = STOP_LINE.fullmatch(out.strip().splitlines()[-1])
    assert line and line[1] == "SIGINT" and int(line[3]) == CONCURRENCY, out[-2000:]
    stats = wait_idle(handle)
    assert stats["answered"] == len(read_captions(cap_large_data)) == int(line[2]) == 0


def test_unreadable_images_give_error_rows_and_the_run_finishes(cap_endpoint, cap_data, kept_keys):
    handle, base_url = cap_endpoint
    download = cap_data / "download"
    with tarfile.open(download / "00001.tar", "w") as tar:  # a member whose bytes are no image
        info = tarfile.TarInfo("junk.jpg")
        info.size = 64
        tar.addfile(info, io.BytesIO(os.urandom(64)))
    (download / "00002.tar").write_bytes(b"not a tar at all" * 64)  # a damaged shard
    manifest = read_manifest(cap_data).to_pandas()
    bad = dict(zip(kept_keys[:4], [("99999.tar", "x.jpg"), ("00000.tar", "gone.jpg"), ("00001.tar", "junk.jpg"),
                                   ("00002.tar", "y.jpg")]))
    for key, (shard, member) in bad.items():
        manifest.loc[manifest["key"] == key, ["shard", "member"]] = [shard, member]
    write_manifest(manifest, cap_data)
    cmd = [sys.executable, "-m", "pipelines.cli", *caption_args(cap_data, base_url, "--concurrency", "1")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)  # a hang fails here
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = read_captions(cap_data).to_pandas().set_index("key")
    for key in bad:
        assert rows.at[key, "status"] == "error" and rows.at[key, "error"].startswith("unreadable_image: "), key
    assert (rows.loc[kept_keys[4:], "status"] == "ok").all()
    assert not set(bad) & set(handle.stats()["by_key"])  # nothing sent for them


def caption_row(key: str, variant: str = "dense") -> dict:
    return {"key": key, "variant": variant, "text": f"A caption of {key}.", "model": "gpt-4.1-mini",
            "prompt_id": PRESETS[variant].prompt_id, "prompt_tokens": 100, "completion_tokens": 20, "cost_usd": 0.0001,
            "latency_s": 0.5, "status": "ok", "error": None, "created_at": datetime.now(timezone.utc)}


def test_torn_last_line_is_ignored_on_replay_and_the_rest_counts_as_done(cap_endpoint, cap_data, kept_keys,
                                                                        capsys):
    handle, base_url = cap_endpoint
    journal = Journal(cap_data, "20250101T000000000-dead00", 0, flush_rows=100)
    journal.append([caption_row(k) for k in kept_keys[:3]])
    segment = journal_dir(cap_data) / f"{journal.name}.jsonl"
    os.close(journal.fd)  # killed: no compaction; and the next write was cut mid-line
    with open(segment, "ab") as f:
        f.write(b'{"seq":3,"key":"' + kept_keys[3].encode() + b'","variant":"den')
    assert cli.main(caption_args(cap_data, base_url)) == 0
    out = capsys.readouterr().out
    assert "replayed 3 answer row(s) from 1 journal segment(s)" in out and "; 1 torn line(s) ignored" in out
    assert not set(kept_keys[:3]) & set(handle.stats()["by_key"])  # journaled rows count as done
    assert handle.stats()["by_key"].get(kept_keys[3]) == 1  # the torn one is asked again
    assert_each_ok_once(cap_data, kept_keys, ["dense"])
    assert not segment.exists()


def test_replay_after_a_crash_between_part_and_unlink_duplicates_nothing(cap_data, kept_keys):
    journal = Journal(cap_data, "20250101T000000000-beef00", 1, flush_rows=100)
    journal.append([caption_row(k) for k in kept_keys[:2]])
    journal.append([caption_row(kept_keys[2])])
    segment = journal_dir(cap_data) / f"{journal.name}.jsonl"
    kept_copy = segment.read_bytes()
    part = journal.compact()  # part written, segment dropped ...
    segment.write_bytes(kept_copy)  # ... as if the crash came between the two
    assert unreplayed_rows(cap_data) == ([], 0)
    report = replay(cap_data)
    assert (report.segments, report.rows, report.torn) == (1, 0, 0) and not segment.exists()
    rows = read_captions(cap_data).to_pandas()
    assert sorted(rows["key"]) == kept_keys[:3] and part.exists()
    assert rows["created_at"].notna().all() and (rows["cost_usd"] == 0.0001).all()
    assert replay(cap_data).message(cap_data) is None  # nothing left


@pytest.mark.slow  # starts a local Ray cluster in the subprocess (~10-20 s)
def test_sigterm_is_forwarded_to_ray_workers_which_drain(cap_endpoint, cap_large_data):
    handle, base_url = cap_endpoint
    handle.set_faults(latency_s=1.0)
    proc = start(cap_large_data, base_url, "--workers", "2")
    wait_for(lambda: handle.stats()["answered"] >= 6, 120, proc)
    stats, rows, line = stop_with_sigterm(proc, handle, cap_large_data, 90)
    assert stats["answered"] == len(rows) == int(line[2]) < 2 * len(kept(cap_large_data))
    assert {p.name.split("-")[3] for p in (cap_large_data / "captions").glob("part-*.parquet")} == {"000", "001"}


def test_batch_api_run_replays_an_online_journal_first(cap_endpoint, cap_data, kept_keys):
    from captioning.batch import run_batch
    from captioning.config import CaptionConfig

    handle, base_url = cap_endpoint
    journal = Journal(cap_data, "20250101T000000000-cafe00", 0, flush_rows=100)
    journal.append([caption_row(k) for k in kept_keys[:3]])
    os.close(journal.fd)  # an online run killed before its first part
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini", variants=["dense"])
    run_batch(cap_data, cfg, poll_s=0.05, progress=False)
    assert_each_ok_once(cap_data, kept_keys, ["dense"])  # the journaled three not asked again
    rows = read_captions(cap_data).to_pandas().set_index("key")
    assert (rows.loc[kept_keys[:3], "text"] == [f"A caption of {k}." for k in kept_keys[:3]]).all()


def test_parquet_readers_skip_the_journal_and_half_written_parts(cap_data, kept_keys):
    import pyarrow.dataset as ds

    journal = Journal(cap_data, "20250101T000000000-f00d00", 0, flush_rows=100)
    journal.append([caption_row(k) for k in kept_keys[:2]])
    journal.compact()
    journal.append([caption_row(kept_keys[2])])  # open segment in _journal/
    (cap_data / "captions" / ".part-half.parquet.tmp").write_bytes(b"PAR1 cut short")
    assert ds.dataset(cap_data / "captions", format="parquet").count_rows() == 2  # Ray Data: see schema.py
    assert len(pd.read_parquet(cap_data / "captions")) == 2 == len(read_captions(cap_data))
    assert [r["key"] for r in unreplayed_rows(cap_data)[0]] == [kept_keys[2]]
    journal.close()


def test_a_journal_line_written_before_served_model_still_replays():
    from captioning.journal import decode, encode

    line = encode(7, caption_row("k"))  # a row as older versions journaled it: no served_model
    assert b"served_model" in line and decode(line.replace(b',"served_model":null', b""))[1]["served_model"] is None
    assert decode(line.replace(b',"served_model":null', b""))[0] == 7
