"""The Batch API path against the local endpoint, over real loopback HTTP through the real openai client:
a partially failed batch, an expired one, resume after a kill, the JSONL limits and the offline JSONL round trip."""

from __future__ import annotations

import io
import json
import random
import tarfile

import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captioning.batch import BatchState, read_batch_output, run_batch, write_batch_input
from captioning.batch_files import InputWriter, Request, custom_id, parse_custom_id, read_jsonl, request_line
from captioning.config import CaptionConfig
from captioning.endpoint import start_endpoint
from captioning.ledger import cost_usd, price_for
from captioning.schema import captions_dir, latest_captions, read_captions
from curation.manifest import MANIFEST_SCHEMA, make_key, manifest_dir
from scenes import random_scene, render
from tests.captioning.manifests import write_parted_manifest

MODEL = "gpt-4.1-mini"
POLL_S = 0.05


def make_data(root, n: int, missing: bool = False, rows_per_part: int | None = None):
    """DATA with n kept scene images in one webdataset-style tar (and, with `missing`, a kept row whose member is
    not in the tar); the manifest in one part, or in parts of `rows_per_part` rows."""
    rng = random.Random(0)
    (root / "download").mkdir(parents=True)
    rows = []
    with tarfile.open(root / "download" / "00000.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            render(random_scene(rng, word_prob=0.0), size=128).save(buf, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{make_key(i)}.jpg")
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            rows.append({"key": make_key(i), "status": "ok", "keep": True, "shard": "00000.tar",
                         "member": info.name, "alt_text": "shapes"})
    if missing:
        rows.append({"key": make_key(n), "status": "ok", "keep": True, "shard": "00000.tar", "member": "gone.jpg"})
    if rows_per_part is not None:
        write_parted_manifest(rows, root, rows_per_part)
        return root
    manifest_dir(root).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest_dir(root) / "part-00000.parquet")
    return root


@pytest.fixture
def endpoint():
    handle, base_url = start_endpoint(seed=7)
    yield handle, base_url
    handle.stop()


def config(base_url: str, **kw) -> CaptionConfig:
    return CaptionConfig(base_url=base_url, model=MODEL, variants=kw.pop("variants", ["short", "tags"]), **kw)


def ok_pairs(data) -> set[tuple[str, str]]:
    latest = latest_captions(data).to_pylist()
    return {(r["key"], r["variant"]) for r in latest if r["status"] == "ok"}


def all_batches(base_url) -> list:
    return list(openai.OpenAI(base_url=base_url, api_key="sk-local").batches.list(limit=100))


def test_round_trip_with_partial_failures(tmp_path, endpoint):
    handle, base_url = endpoint
    handle.set_faults(batch_fail_rate=0.3)
    data = make_data(tmp_path, 12, missing=True, rows_per_part=5)  # 3 manifest parts, queued one at a time
    cfg = config(base_url, batch={"max_requests_per_file": 10})  # 24 requests: 3 files a round
    summary = run_batch(data, cfg, poll_s=POLL_S, max_attempts=6, progress=False)

    assert ok_pairs(data) == {(make_key(i), v) for i in range(12) for v in ("short", "tags")}
    assert summary["image_errors"] == 2  # the missing member: an error row per variant, nothing sent
    noimage = pq.read_table(next(captions_dir(data).glob("part-batch-noimage-*.parquet"))).to_pylist()
    assert {(r["key"], r["status"]) for r in noimage} == {(make_key(12), "error")}
    assert "gone.jpg" in noimage[0]["error"]
    batches = summary["batches"]
    requests, answered = sum(b["requests"] for b in batches), sum(b["answered"] for b in batches)
    assert answered == 24  # every request answered exactly once: ok pairs were never asked again
    assert requests > 24 and len(batches) > 3  # ... and the failed lines went out again, alone
    assert all(b["requests"] <= 10 for b in batches)
    rows = [r for r in read_captions(data).to_pylist() if r["key"] != make_key(12)]
    assert len(rows) == 24 and all(r["status"] == "ok" for r in rows)  # failed lines leave no rows once answered
    assert sorted(p.name for p in captions_dir(data).glob("part-batch-b*.parquet")) == sorted(
        f"part-batch-{b['id']}.parquet" for b in batches if b["rows"])
    price = price_for(MODEL, batch=True)  # half the standard price
    for r in rows:
        assert r["cost_usd"] == pytest.approx(cost_usd(price, r["prompt_tokens"], r["completion_tokens"]))
        assert r["cost_usd"] > 0
    assert BatchState(data).batches == {}  # nothing left in flight
    assert len(all_batches(base_url)) == len(batches)


def test_expired_batch_resubmits_missing_keys_only(tmp_path, endpoint):
    handle, base_url = endpoint
    handle.set_faults(batch_status="expired")  # each batch runs the first half of its lines only
    data = make_data(tmp_path, 8)
    cfg = config(base_url, json_mode=True)  # one request per key for both variants: tag "json"
    summary = run_batch(data, cfg, poll_s=POLL_S, max_attempts=2, progress=False)

    first, second = summary["batches"]
    assert (first["status"], first["requests"], first["answered"]) == ("expired", 8, 4)
    assert (second["requests"], second["answered"]) == (4, 2)  # the 4 keys that never ran, nothing else
    latest = latest_captions(data).to_pylist()
    gave_up = {r["key"] for r in latest if r["status"] == "error"}
    assert len(gave_up) == 2 and all("batch_expired" in r["error"] for r in latest if r["status"] == "error")
    assert len(ok_pairs(data)) == 6 * 2

    handle.set_faults(batch_status=None)
    summary = run_batch(data, cfg, poll_s=POLL_S, progress=False)  # the next run asks for the 2 keys only
    assert [(b["requests"], b["ok"]) for b in summary["batches"]] == [(2, 4)]
    assert ok_pairs(data) == {(make_key(i), v) for i in range(8) for v in ("short", "tags")}


def test_failed_batch_bounded_attempts_and_budget(tmp_path, endpoint):
    handle, base_url = endpoint
    handle.set_faults(batch_status="failed")  # validation fails: no output at all
    data = make_data(tmp_path, 3)
    summary = run_batch(data, config(base_url, variants=["short"]), poll_s=POLL_S, max_attempts=2, progress=False)
    assert [(b["status"], b["requests"], b["answered"]) for b in summary["batches"]] == [("failed", 3, 0)] * 2
    rows = read_captions(data).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "error" and r["error"].startswith("batch failed: ") for r in rows)

    handle.set_faults(batch_status=None)
    summary = run_batch(data, config(base_url, variants=["short"], max_cost_usd=1e-9), poll_s=POLL_S,
                        progress=False)
    assert summary["stopped"] == "budget" and summary["batches"] == []  # nothing sent past the budget
    assert len(read_captions(data)) == 3


def test_resume_after_kill_reattaches(tmp_path, endpoint, monkeypatch):
    handle, base_url = endpoint
    handle.set_faults(batch_delay_s=0.3)
    data = make_data(tmp_path, 6)
    cfg = config(base_url, variants=["short"])
    client = openai.OpenAI(base_url=base_url, api_key="sk-local")

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(client.batches, "retrieve", killed)  # "killed" at the first poll, after submitting
    with pytest.raises(KeyboardInterrupt):
        run_batch(data, cfg, client=client, poll_s=POLL_S, progress=False)
    state = BatchState(data)
    (batch_id,) = state.batches
    assert sorted(parse_custom_id(c)[0] for c in state.batches[batch_id]["requests"]) == [make_key(i)
                                                                                      for i in range(6)]

    summary = run_batch(data, cfg, poll_s=POLL_S, progress=False)  # the same command again
    assert [b["id"] for b in summary["batches"]] == [batch_id]
    assert len(all_batches(base_url)) == 1  # re-attached, nothing resubmitted
    assert len(ok_pairs(data)) == 6 and BatchState(data).batches == {}


def test_a_reattached_batch_retries_its_keys_from_any_part(tmp_path, endpoint, monkeypatch):
    """Killed after submitting one batch over 3 manifest parts, with lines failing: the rerun re-attaches and
    resubmits the failed lines, whose items (shard, member) the first pass over the parts kept."""
    handle, base_url = endpoint
    handle.set_faults(batch_fail_rate=0.5, batch_delay_s=0.2)
    data = make_data(tmp_path, 9, rows_per_part=3)
    cfg = config(base_url, variants=["short"])
    client = openai.OpenAI(base_url=base_url, api_key="sk-local")

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(client.batches, "retrieve", killed)
    with pytest.raises(KeyboardInterrupt):
        run_batch(data, cfg, client=client, poll_s=POLL_S, progress=False)
    (batch_id,) = BatchState(data).batches

    summary = run_batch(data, cfg, poll_s=POLL_S, max_attempts=10, progress=False)
    first, *retries = summary["batches"]
    assert first["id"] == batch_id and first["requests"] == 9 and first["answered"] < 9 and retries
    assert sum(b["answered"] for b in summary["batches"]) == 9  # only the failed lines went out again
    assert ok_pairs(data) == {(make_key(i), "short") for i in range(9)}
    assert BatchState(data).batches == {}


def test_offline_files_over_parts_keep_both_limits(tmp_path, endpoint):
    """write_batch_input part by part: every request once, every file within the line and the byte limit."""
    _, base_url = endpoint
    data = make_data(tmp_path / "data", 11, rows_per_part=4)
    cfg = config(base_url)  # short and tags: 22 requests
    sizes = []
    for f in write_batch_input(data, cfg, tmp_path / "probe"):
        sizes += [len(line) for line in f.read_bytes().splitlines(keepends=True)]
    max_bytes = int(max(sizes) * 2.5)  # the byte limit binds before the line limit on some files
    files = write_batch_input(data, cfg, tmp_path / "jsonl", max_requests=3, max_bytes=max_bytes)
    lines = [list(read_jsonl(f)) for f in files]
    assert all(len(x) <= 3 for x in lines) and all(f.stat().st_size <= max_bytes for f in files)
    assert any(len(x) < 3 for x in lines[:-1])  # ... where it did
    cids = [line["custom_id"] for x in lines for line in x]
    assert sorted(cids) == sorted(custom_id(make_key(i), v, 1) for i in range(11) for v in ("short", "tags"))


def test_kill_between_upload_and_state_finds_batch_by_file(tmp_path, endpoint, monkeypatch):
    _, base_url = endpoint
    data = make_data(tmp_path, 3)
    cfg = config(base_url, variants=["short"])
    client = openai.OpenAI(base_url=base_url, api_key="sk-local")
    create = client.batches.create

    def create_then_die(**kw):
        create(**kw)
        raise KeyboardInterrupt  # the batch exists on the server; the state does not know its id yet

    monkeypatch.setattr(client.batches, "create", create_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_batch(data, cfg, client=client, poll_s=POLL_S, progress=False)
    assert len(BatchState(data).submitting) == 1 and not BatchState(data).batches

    summary = run_batch(data, cfg, poll_s=POLL_S, progress=False)
    assert len(summary["batches"]) == 1 and len(all_batches(base_url)) == 1
    assert len(ok_pairs(data)) == 3


def _request(i: int, size: int = 0) -> Request:
    cid = custom_id(make_key(i), "short", 1)
    return Request(cid, ["short"], request_line(cid, {"model": MODEL, "pad": "x" * size}))


def test_jsonl_limits(tmp_path):
    writer = InputWriter(tmp_path / "a", "in", max_requests=3, max_bytes=10**6)
    closed = [f for f in (writer.add(_request(i)) for i in range(7)) if f] + [writer.close()]
    assert [len(f.requests) for f in closed] == [3, 3, 1]
    assert [p.name for p in sorted((tmp_path / "a").iterdir())] == ["in-00000.jsonl", "in-00001.jsonl",
                                                                     "in-00002.jsonl"]
    lines = list(read_jsonl(closed[0].path))
    assert lines[0] == {"custom_id": f"{make_key(0)}|short|1", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": MODEL, "pad": ""}}

    one = len(_request(0, 1000).line)
    writer = InputWriter(tmp_path / "b", "in", max_requests=100, max_bytes=2 * one + 10)
    closed = [f for f in (writer.add(_request(i, 1000)) for i in range(5)) if f] + [writer.close()]
    assert [len(f.requests) for f in closed] == [2, 2, 1]
    assert all(f.path.stat().st_size == f.bytes <= 2 * one + 10 for f in closed)
    with pytest.raises(ValueError, match="over the batch file limit"):
        writer.add(_request(9, 10_000))

    writer = InputWriter(tmp_path / "c", "in", max_requests=100, max_bytes=10**6)
    assert writer.add(_request(0)) is None and writer.add(_request(0)) is not None  # a duplicate custom_id
    assert parse_custom_id("0000000001|json|3") == ("0000000001", "json", 3)


def test_offline_jsonl_round_trip(tmp_path, endpoint):
    """write_batch_input → an offline engine (here: each line POSTed to the endpoint, vLLM's output format) →
    read_batch_output, in json_mode, with one line failing."""
    _, base_url = endpoint
    data = make_data(tmp_path / "data", 5)
    cfg = config(base_url, json_mode=True)
    files = write_batch_input(data, cfg, tmp_path / "jsonl", max_requests=2)
    assert [len(list(read_jsonl(f))) for f in files] == [2, 2, 1]
    assert write_batch_input(data, cfg, tmp_path / "again") != []  # nothing merged yet: the same requests

    client = openai.OpenAI(base_url=base_url, api_key="sk-local")
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        for n, line in enumerate(line for path in files for line in read_jsonl(path)):
            if n == 1:  # the engine failed this one
                response = {"status_code": 500, "request_id": "r", "body": {"error": {"message": "engine died"}}}
            else:
                body = client.chat.completions.with_raw_response.create(**line["body"])
                response = {"status_code": 200, "request_id": "r", "body": json.loads(body.content)}
            f.write(json.dumps({"id": f"vllm-{n}", "custom_id": line["custom_id"], "response": response,
                                "error": None}) + "\n")

    result = read_batch_output(out, data, cfg)
    assert (result["records"], result["ok"], result["failed"], result["skipped"]) == (5, 8, 1, 0)
    assert result["part"].name.startswith("part-batch-offline-")
    assert len(ok_pairs(data)) == 8  # 4 keys × 2 variants; the failed key has error rows
    assert BatchState(data).offline == {}
    (files,) = [write_batch_input(data, cfg, tmp_path / "left")]
    assert [parse_custom_id(line["custom_id"])[0] for line in read_jsonl(files[0])] == [make_key(1)]
