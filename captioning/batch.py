"""`lensforge caption --batch-api`: the OpenAI Batch API, half the price of the online path, results within 24 h.

    run_batch("data", cfg)                       # submit, poll, merge; rerun the same command after a kill
    write_batch_input("data", cfg, "jsonl/")     # offline: vllm run-batch -i jsonl/batch-00000.jsonl -o out.jsonl
    read_batch_output("out.jsonl", "data", cfg)  # ... and merge what it wrote

Pending work is the online path's, one manifest part at a time (`plan.part_pending`: kept keys × variants not yet
ok): a first pass over the parts sizes the progress bar, then each part's requests are built when the queue
reaches it and written to JSONL files within both of the API's limits (`cfg.batch`: 50,000 lines, ~200 MB; a
file may hold several parts' requests, and a part's may span files), each uploaded (purpose "batch") and run as
one batch; at most `max_in_flight` batches run at once (OpenAI also caps the tokens enqueued per model).
Finished batches are merged into DATA/captions/part-batch-<batch id>.parquet through `request.parse_response` at
batch prices. Requests that got no answer (expired, cancelled, failed batch, 5xx lines) are resubmitted until
their `max_attempts`-th submission (`run_batch`'s MAX_ATTEMPTS, not caption.max_attempts), and only then get
error rows; answers that failed a check (rows written, they were paid for) are re-asked while the request's
attempt number ≤ `cfg.retry_failed_checks`, as online. A batch refused for the enqueued-token limit while others
run is resubmitted once room is free, with fewer at once.
With `max_cost_usd`, every request reserves its worst-case cost before it is written to a file; the run stops
submitting when the budget cannot cover the next one (batches already running are paid for and merged).

Resumable: the batches in flight, with their custom_ids, live in DATA/captions/_batches/state.json (written
atomically after every change). A rerun re-attaches to them instead of resubmitting; a batch whose creation was
interrupted is found again by its input file id. Keys already ok are never requested again. The state only holds
what is in flight; finished batches are appended to _batches/finished.jsonl. One run per DATA at a time.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, deque
from pathlib import Path

import openai

from captioning.batch_files import (ENDPOINT, JSON_TAG, MB, InputFile, InputWriter, Outcomes, outcomes,
                                    parse_custom_id, read_jsonl, requests_for)
from captioning.client import resolve_api_key
from captioning.config import CaptionConfig
from captioning.ledger import Ledger, price_for, prior_spend
from captioning.pipeline import replay_journals
from captioning.plan import part_pending
from captioning.presets import Preset, resolve_variants
from captioning.request import request_model, variant_groups
from captioning.schema import captions_dir
from captioning.schema import write_part as write_rows
from common.atomic import write_json
from common.progress import progress_bar
from curation.manifest import manifest_parts

TERMINAL = ("completed", "failed", "expired", "cancelled")
UPLOAD_TIMEOUT_S = 900.0
FIRST_POLL_S = 0.5  # small batches (a local endpoint, vLLM) finish in seconds; OpenAI's take minutes to hours
# A batch that fails validation with this code only waits for room: OpenAI caps the tokens enqueued per model.
QUEUE_FULL = "token_limit_exceeded"
MAX_ATTEMPTS = 3  # submissions of one request that got no answer (expired / failed batch / 5xx line)
MAX_IN_FLIGHT = 8  # batches running at once
STATE_VERSION = 1


def batches_dir(data: str | Path) -> Path:
    return captions_dir(data) / "_batches"


class BatchState:
    """DATA/captions/_batches/state.json: {"batches": {batch_id: entry}, "submitting": {input_file_id: entry},
    "offline": {custom_id: variants}}; an entry holds `requests` (custom_id → variants), `created_at` and
    `reserved_usd`. Saved atomically on every change."""

    def __init__(self, data: str | Path):
        self.path = batches_dir(data) / "state.json"
        raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        if raw and raw.get("version") != STATE_VERSION:
            raise ValueError(f"{self.path}: unknown state version {raw.get('version')!r}")
        self.batches: dict[str, dict] = raw.get("batches", {})
        self.submitting: dict[str, dict] = raw.get("submitting", {})
        self.offline: dict[str, list[str]] = raw.get("offline", {})

    def save(self) -> None:
        write_json(self.path, {"version": STATE_VERSION, "batches": self.batches, "submitting": self.submitting,
                               "offline": self.offline}, fsync=True)  # batch ids: money

    def log_finished(self, record: dict) -> None:
        with open(self.path.with_name("finished.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def make_batch_client(cfg: CaptionConfig) -> openai.OpenAI:
    """A synchronous client for files and batches (a few calls a minute: the SDK's own retries are fine here)."""
    api_key = resolve_api_key(cfg)
    if cfg.azure is not None:
        return openai.AzureOpenAI(azure_endpoint=cfg.azure.endpoint, api_version=cfg.azure.api_version,
                                  api_key=api_key, max_retries=5, timeout=cfg.timeout_s)
    return openai.OpenAI(base_url=cfg.base_url, api_key=api_key, max_retries=5, timeout=cfg.timeout_s)


def write_part(data: str | Path, name: str, rows: list[dict]) -> Path | None:
    """Rows → DATA/captions/part-<name>.parquet, atomically (schema.write_part); None when no rows."""
    if not rows:
        return None
    return write_rows(captions_dir(data) / f"part-{name}.parquet", rows)


def busy_variants(state: BatchState) -> dict[str, set[str]]:
    """key → the variants that online batches in flight (or being created) already ask for."""
    busy: dict[str, set[str]] = {}
    for entry in [*state.batches.values(), *state.submitting.values()]:
        for cid, variants in entry["requests"].items():
            busy.setdefault(parse_custom_id(cid)[0], set()).update(variants)
    return busy


def pending_items(data: Path, part: str | Path, presets: dict[str, Preset], model: str,
                  busy: dict[str, set[str]]) -> list[dict]:
    """One manifest part's items to request now: its pending work minus the variants that batches in flight
    already ask for (`busy`, from `busy_variants`), each with `attempt` 1. (Files written for an offline engine do
    not count: they may never come back.)"""
    queue = []
    for item in part_pending(data, part, presets, model):
        variants = [v for v in item["variants"] if v not in busy.get(item["key"], ())]
        if variants:
            queue.append(item | {"variants": variants, "attempt": 1})
    return queue


class BatchRun:
    """One `run_batch` call: a queue of pending work, the batches in flight, and what came back."""

    def __init__(self, data: Path, cfg: CaptionConfig, client: openai.OpenAI, max_attempts: int,
                 max_in_flight: int, poll_s: float, progress: bool):
        self.data, self.cfg, self.client = data, cfg, client
        self.max_attempts, self.max_in_flight, self.poll_s = max_attempts, max_in_flight, poll_s
        self.presets: dict[str, Preset] = resolve_variants(cfg.variants, cfg.prompt_file)
        self.state = BatchState(data)
        replay_journals(data)  # an interrupted online run's answers are spent money: in parts before prior_spend
        self.ledger = Ledger(cfg.max_cost_usd, prior_spend(data))  # the budget is the whole job's, as online
        self.price = price_for(cfg.model or "", cfg, batch=True)
        self.writer = InputWriter(batches_dir(data) / "input", f"input-{int(time.time())}",
                                  cfg.batch.max_requests_per_file, int(cfg.batch.max_file_mb * MB))
        self.model = request_model(cfg)
        self.parts: deque[Path] = deque()  # manifest parts not yet queued
        self.busy: dict[str, set[str]] = {}  # key → variants in flight when the run started (busy_variants)
        self.queue: deque[dict] = deque()  # pending-work items, each with `attempt`: a part's at a time, + retries
        # Only keys with a request in flight: key → its pending-work item (shard, member, alt text), for a retry,
        # and how many of its requests are in flight. Bounded by the batches in flight, as state.json is.
        self.items: dict[str, dict] = {}
        self.refs: Counter = Counter()
        self.stopped: str | None = None
        self.summary = {"batches": [], "outcomes": Counter(), "cost_usd": 0.0, "image_errors": 0}
        self.bar = progress_bar(total=0, desc="caption (batch)", unit="req", dynamic_ncols=True,
                                disable=not progress)
        self.done_requests = 0

    # --- the queue ---------------------------------------------------------------------------------------

    def plan(self) -> None:
        """The parts to queue, and a first pass over them for the bar's total: pending work minus what the
        batches in flight already ask for (their keys' items are kept, for a retry)."""
        self.busy = busy_variants(self.state)
        self.refs = Counter(parse_custom_id(cid)[0] for e in self.state.batches.values() for cid in e["requests"])
        self.parts = deque(manifest_parts(self.data))
        total = sum(len(e["requests"]) for e in self.state.batches.values())
        for part in self.parts:
            for item in part_pending(self.data, part, self.presets, self.model):
                if item["key"] in self.refs:
                    self.items[item["key"]] = item
                total += self._n_requests([v for v in item["variants"] if v not in self.busy.get(item["key"], ())])
        self.bar.total = total
        self.bar.refresh()

    def queue_part(self) -> None:
        """The next part's pending work (as of the run's start: `busy` is the first snapshot) into the queue."""
        self.queue.extend(pending_items(self.data, self.parts.popleft(), self.presets, self.model, self.busy))

    def hold(self, item: dict) -> None:
        """A request of `item` went into a batch file: keep its item until every such request has come back."""
        self.items[item["key"]] = item
        self.refs[item["key"]] += 1

    def release(self, requests: dict[str, list[str]]) -> None:
        """A batch finished (after its retries were queued): forget the items of keys with nothing left in
        flight."""
        for cid in requests:
            key = parse_custom_id(cid)[0]
            self.refs[key] -= 1
            if self.refs[key] <= 0:
                del self.refs[key]
                self.items.pop(key, None)

    def _n_requests(self, variants: list[str]) -> int:
        return len(variant_groups(variants, self.cfg))

    def requeue(self, key: str, variants: list[str], attempt: int) -> None:
        if key in self.items:  # else no longer pending (ok meanwhile, or gone from the manifest)
            self.queue.append(self.items[key] | {"variants": variants, "attempt": attempt})
            self.bar.total += self._n_requests(variants)

    def _image_errors(self, rows: list[dict]) -> None:
        self.summary["image_errors"] += len(rows)
        self.bar.total -= self._n_requests([r["variant"] for r in rows])
        self._count(rows)
        write_part(self.data, f"batch-noimage-{time.time_ns()}", rows)

    # --- submitting --------------------------------------------------------------------------------------

    def fill(self) -> None:
        """Write, upload and start batches from the queue (refilled a part at a time) while fewer than
        `max_in_flight` run. A file not yet full stays open for the next call (its requests are only pending work
        until submitted), unless the queue and the parts are empty or the budget stopped the run."""
        while not self.stopped and len(self.state.batches) < self.max_in_flight:
            while len(self.queue) < self.cfg.chunk_size and self.parts:
                self.queue_part()
            if not self.queue:
                break
            chunk = [self.queue.popleft() for _ in range(min(self.cfg.chunk_size, len(self.queue)))]
            by_key = {item["key"]: item for item in chunk}
            for request in requests_for(self.data, chunk, self.presets, self.cfg, self._image_errors,
                                        self.price if self.cfg.max_cost_usd is not None else None):
                if not self.ledger.reserve(request.reserve_usd):
                    self.stopped = "budget"  # the rest of the chunk stays pending for the next run
                    break
                self.hold(by_key[parse_custom_id(request.cid)[0]])
                closed = self.writer.add(request)
                if closed is not None:
                    self.submit(closed)
        if (not (self.queue or self.parts) or self.stopped) and self.writer.current is not None:
            self.submit(self.writer.close())

    def submit(self, infile: InputFile) -> None:
        """Upload one input file and create its batch; persisted before and after creation."""
        with open(infile.path, "rb") as f:  # up to ~200 MB: more time than a chat request
            uploaded = self.client.files.create(file=(infile.path.name, f), purpose="batch",
                                                timeout=max(UPLOAD_TIMEOUT_S, self.cfg.timeout_s))
        entry = {"requests": infile.requests, "created_at": time.time(), "reserved_usd": infile.reserved_usd}
        self.state.submitting[uploaded.id] = entry
        self.state.save()
        batch = self.client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                           completion_window=self.cfg.batch.completion_window,
                                           metadata={"lensforge": "caption"})
        self.state.batches[batch.id] = entry | {"input_file_id": uploaded.id}
        del self.state.submitting[uploaded.id]
        self.state.save()
        infile.path.unlink(missing_ok=True)

    def reattach_submitting(self) -> None:
        """Batches whose creation a kill interrupted: find them by input file id, else forget the upload."""
        if not self.state.submitting:
            return
        oldest = min(e["created_at"] for e in self.state.submitting.values()) - 600
        for batch in self.client.batches.list(limit=100):
            if batch.input_file_id in self.state.submitting:
                entry = self.state.submitting.pop(batch.input_file_id)
                self.state.batches[batch.id] = entry | {"input_file_id": batch.input_file_id}
            if not self.state.submitting or batch.created_at < oldest:
                break
        for file_id in self.state.submitting:  # never created: the keys are pending again (plan() runs next)
            self._delete_file(file_id)
        self.state.submitting.clear()
        self.state.save()

    # --- polling and merging -----------------------------------------------------------------------------

    def poll(self) -> int:
        """Check every batch in flight once; merge the finished ones. Returns how many finished."""
        finished, running = 0, 0
        for batch_id in list(self.state.batches):
            try:
                batch = self.client.batches.retrieve(batch_id)
            except openai.NotFoundError:  # the server forgot it (e.g. a restarted local endpoint)
                self.finish(batch_id, None)
                finished += 1
                continue
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError):
                continue  # after the SDK's own retries: a batch runs for hours, try again at the next poll
            if batch.status in TERMINAL:
                self.finish(batch_id, batch)
                finished += 1
            elif batch.request_counts is not None:
                running += batch.request_counts.completed + batch.request_counts.failed
        self.bar.n = self.done_requests + running
        self.bar.set_postfix_str(f"{len(self.state.batches)} batch(es) running, ${self.ledger.spent:.4f}",
                                 refresh=False)
        self.bar.refresh()
        return finished

    def _records(self, batch) -> list[dict]:
        records = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                records.extend(read_jsonl(self.client.files.content(file_id).content))
        return records

    def finish(self, batch_id: str, batch) -> None:
        """Merge a finished batch into part-batch-<id>.parquet, queue what is worth asking again, forget it."""
        entry = self.state.batches[batch_id]
        result = outcomes(entry["requests"], self._records(batch) if batch else [], self.cfg, self.presets)
        why = self._batch_failure(batch)
        # Enqueued-token limit with other batches still running: wait for them, run fewer at once, same attempt.
        queue_full = bool(why) and QUEUE_FULL in why and len(self.state.batches) > 1
        if queue_full:
            self.max_in_flight = len(self.state.batches) - 1
        rows = list(result.rows)
        for f in result.failures:
            if why and f.message.startswith("no result"):
                f.message = why
            if queue_full and not self.stopped:
                self.requeue(f.key, f.variants, f.attempt)
            elif f.retryable and f.attempt < self.max_attempts and not self.stopped:
                self.requeue(f.key, f.variants, f.attempt + 1)
            else:
                rows += self._rows_of(f)
        for key, variants, attempt in result.retry_checks:
            if attempt <= self.cfg.retry_failed_checks and not self.stopped:
                self.requeue(key, variants, attempt + 1)
        self.release(entry["requests"])  # after the retries: those are queued with their items
        write_part(self.data, f"batch-{batch_id}", rows)
        spent = sum(r["cost_usd"] or 0.0 for r in rows)
        self.ledger.settle(entry.get("reserved_usd", 0.0), spent)
        self._count(rows)
        self.summary["cost_usd"] += spent
        info = {"id": batch_id, "status": batch.status if batch else "lost", "requests": len(entry["requests"]),
                "answered": len(entry["requests"]) - len(result.failures), "rows": len(rows),
                "ok": result.ok, "cost_usd": spent}
        self.summary["batches"].append(info)
        del self.state.batches[batch_id]
        self.state.save()
        self.state.log_finished(info | {"finished_at": time.time()})
        self.done_requests += len(entry["requests"])
        self._delete_file(entry["input_file_id"])

    def _rows_of(self, failure) -> list[dict]:
        return Outcomes(failures=[failure]).failure_rows(self.cfg, self.presets)

    @staticmethod
    def _batch_failure(batch) -> str | None:
        if batch is None:
            return "batch not found on the server"
        if batch.status == "failed" and batch.errors and batch.errors.data:
            e = batch.errors.data[0]
            return f"batch failed: {e.code}: {e.message}"[:300]
        return None

    def _count(self, rows: list[dict]) -> None:
        for r in rows:
            self.summary["outcomes"][(r["variant"], r["status"])] += 1

    def _delete_file(self, file_id: str) -> None:
        """Best effort: an uploaded input (images, ~100 KB a request) counts against the project's storage."""
        try:
            self.client.files.delete(file_id)
        except openai.APIError:
            pass

    # --- the loop ----------------------------------------------------------------------------------------

    def run(self) -> dict:
        for stale in self.writer.folder.glob("input-*"):  # input files a killed run never submitted
            stale.unlink()
        try:
            self.reattach_submitting()
            self.plan()
            idle = 0  # polls in a row that finished nothing: the wait doubles from FIRST_POLL_S up to poll_s
            while self.queue or self.parts or self.writer.current or self.state.batches:
                if len(self.state.batches) < self.max_in_flight:
                    self.fill()
                idle = 0 if self.poll() else idle + 1
                if idle and self.state.batches:
                    time.sleep(min(self.poll_s, FIRST_POLL_S * 2 ** (idle - 1)))
                if self.stopped:
                    self.queue.clear()
                    self.parts.clear()
        finally:
            self.bar.close()
            leftover = self.writer.close()  # never submitted (an error or a kill): pending work for the next run
            if leftover is not None:
                leftover.path.unlink(missing_ok=True)
        return self.summary | {"outcomes": dict(self.summary["outcomes"]), "stopped": self.stopped}


def run_batch(data: str | Path, cfg: CaptionConfig, client: openai.OpenAI | None = None, *,
              max_attempts: int = MAX_ATTEMPTS, max_in_flight: int = MAX_IN_FLIGHT, poll_s: float | None = None,
              progress: bool = True) -> dict:
    """Caption DATA's pending work through the Batch API until nothing is left or in flight; rerun after a kill to
    re-attach. `client`: a synchronous openai.OpenAI (default: from cfg). `poll_s` defaults to cfg.batch.poll_s.
    Returns {"batches": [per batch: id, status, requests, answered, rows, ok, cost_usd], "outcomes": {(variant,
    status): rows}, "cost_usd", "image_errors", "stopped": None or "budget"} and prints a one-line summary."""
    run = BatchRun(Path(data), cfg, client or make_batch_client(cfg), max_attempts, max_in_flight,
                   cfg.batch.poll_s if poll_s is None else poll_s, progress)
    summary = run.run()
    if progress:
        counts = Counter()
        for (_, status), n in summary["outcomes"].items():
            counts[status] += n
        print(f"caption (batch): {len(summary['batches'])} batch(es), "
              + ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
              + f", ${summary['cost_usd']:.4f} at batch prices" + (" (stopped: budget)" if run.stopped else ""))
    return summary


# --- offline engines (vllm run-batch) -----------------------------------------------------------------------


def write_batch_input(data: str | Path, cfg: CaptionConfig, out_dir: str | Path, *, max_requests: int | None = None,
                      max_bytes: int | None = None) -> list[Path]:
    """`lensforge caption ... --batch-api --batch-offline-dir DIR`: write the pending work as Batch API input
    files DIR/batch-NNNNN.jsonl (within `max_requests` lines / `max_bytes` bytes each; cfg.batch by default) and
    return them, for an offline engine that reads OpenAI's batch format:

        vllm run-batch -i DIR/batch-00000.jsonl -o out-00000.jsonl --model M

    then merge each output with `read_batch_output`. Keys in online batches in flight are left out. The
    custom_id → variants map goes into DATA/captions/_batches/state.json ("offline"), so outputs can be merged
    from anywhere; writing again (before merging) writes the same requests. Unreadable images get error rows now.
    Sends nothing, spends nothing. Built one manifest part at a time; a file may hold several parts' requests."""
    data, out_dir = Path(data), Path(out_dir)
    presets = resolve_variants(cfg.variants, cfg.prompt_file)
    parts = manifest_parts(data)
    replay_journals(data)  # an interrupted online run's answers count as done
    state = BatchState(data)
    busy, model = busy_variants(state), request_model(cfg)
    writer = InputWriter(out_dir, "batch", max_requests or cfg.batch.max_requests_per_file,
                         max_bytes or int(cfg.batch.max_file_mb * MB))
    image_errors: list[dict] = []
    files = []
    for part in parts:
        for request in requests_for(data, pending_items(data, part, presets, model, busy), presets, cfg,
                                    image_errors.extend):
            closed = writer.add(request)
            if closed is not None:
                files.append(closed)
    closed = writer.close()
    files += [closed] if closed is not None else []
    for f in files:
        state.offline.update(f.requests)
    state.save()
    write_part(data, f"batch-noimage-{time.time_ns()}", image_errors)
    return [f.path for f in files]


def read_batch_output(path: str | Path, data: str | Path, cfg: CaptionConfig) -> dict:
    """`lensforge caption ... --batch-api --batch-offline-results FILE`: merge a Batch API output (or error) JSONL
    file, e.g. from `vllm run-batch`, into DATA/captions/part-batch-offline-<content hash>.parquet (merging the
    same file again rewrites the same part). Requests written by `write_batch_input` map to their variants
    through the state; an unknown per-variant custom_id maps to its variant, an unknown "json" one is skipped.
    Every record gives rows: captions after the checks, or errors (asked again by the next run). Costs at batch
    prices of cfg.model. Returns {"part", "records", "rows", "ok", "failed", "skipped", "cost_usd"}."""
    path, data = Path(path), Path(data)
    presets = resolve_variants(cfg.variants, cfg.prompt_file)
    state = BatchState(data)
    records = list(read_jsonl(path))
    requests, skipped = {}, 0
    for record in records:
        cid = record.get("custom_id") or ""
        variants = state.offline.get(cid)
        if variants is None:
            try:
                tag = parse_custom_id(cid)[1]
            except ValueError:
                tag = JSON_TAG
            variants = [tag] if tag in presets else None
        if variants is None:
            skipped += 1
        else:
            requests[cid] = variants
    result = outcomes(requests, records, cfg, presets)
    rows = result.rows + result.failure_rows(cfg, presets)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha1").hexdigest()[:12]
    part = write_part(data, f"batch-offline-{digest}", rows)
    for cid in requests:
        state.offline.pop(cid, None)
    state.save()
    return {"part": part, "records": len(records), "rows": len(rows), "ok": result.ok,
            "failed": len(result.failures), "skipped": skipped, "cost_usd": sum(r["cost_usd"] or 0.0 for r in rows)}
