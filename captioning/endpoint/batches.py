"""The endpoint's Files and Batch API: OpenAI's semantics, run in the background in seconds (it is a test double).

    store = Store(Path("state"))                 # files/<id> + files/<id>.json, batches/<id>.json
    batches = BatchRunner(store, injector, models, run_blocking)
    await batches.create({"input_file_id": ..., "endpoint": "/v1/chat/completions", "completion_window": "24h"})

A batch goes validating → in_progress → finalizing → completed. Every input line is answered by the same code as
`POST /v1/chat/completions` (describe_request), without the chat faults; `Faults.batch_fail_rate` sends a
fraction of the lines to the error file as 500s, `batch_status` forces the final status ("failed" fails
validation; "expired" and "cancelled" process the first half of the lines only), `batch_delay_s` keeps it
in_progress that long first. Output and error files are OpenAI's JSONL: one line per request,
    {"id": "batch_req_…", "custom_id": …, "response": {"status_code": 200, "request_id": …, "body": {…}},
     "error": null}
and, for the lines an expired batch never ran, {"id", "custom_id", "response": null,
"error": {"code": "batch_expired", "message": …}} in the error file (OpenAI's behaviour). A file is only created when
it has lines: a batch whose every line failed has `output_file_id` null. Batches are persisted, and a restarted
server picks up the unfinished ones.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from captioning.endpoint.describe_request import RequestError, caption, completion_body, read_request
from captioning.endpoint.faults import FaultInjector
from common.atomic import write_json

BATCH_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
LINES_AT_ONCE = 32  # lines handed to the thread pool together; cancellation is checked between such chunks
TERMINAL = ("completed", "failed", "expired", "cancelled")
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."

RunBlocking = Callable[..., Awaitable]  # run_blocking(fn, *args) -> await fn(*args) in the worker pool


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _not_found(kind: str, object_id: str) -> RequestError:
    return RequestError(404, f"No such {kind} object: {object_id}", param="id")


class Store:
    """Files and batch objects under one folder, so that a restarted server still has them."""

    def __init__(self, root: Path):
        self.files_dir, self.batches_dir = root / "files", root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self.files = {p.stem: json.loads(p.read_text()) for p in self.files_dir.glob("*.json")}
        self.batches = {p.stem: json.loads(p.read_text()) for p in self.batches_dir.glob("*.json")}

    def add_file(self, data: bytes, filename: str, purpose: str) -> dict:
        file_id = _new_id("file-")
        (self.files_dir / file_id).write_bytes(data)
        obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
               "expires_at": None}
        self._write(self.files_dir / f"{file_id}.json", obj)
        self.files[file_id] = obj
        return obj

    def file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise _not_found("File", file_id)
        return self.files[file_id]

    def content(self, file_id: str) -> bytes:
        self.file(file_id)
        return (self.files_dir / file_id).read_bytes()

    def delete_file(self, file_id: str) -> dict:
        self.file(file_id)
        del self.files[file_id]
        (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)
        (self.files_dir / file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def save_batch(self, batch: dict) -> None:
        self.batches[batch["id"]] = batch
        self._write(self.batches_dir / f"{batch['id']}.json", batch)

    def batch(self, batch_id: str) -> dict:
        if batch_id not in self.batches:
            raise _not_found("Batch", batch_id)
        return self.batches[batch_id]

    @staticmethod
    def _write(path: Path, obj: dict) -> None:
        write_json(path, obj)  # a crash never leaves half an object


def page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page over `items` (newest first)."""
    ids = [item["id"] for item in items]
    start = ids.index(after) + 1 if after in ids else 0
    data = items[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(items)}


class BatchRunner:
    """Creates, runs and cancels batches. Every method runs on the server's event loop (no locks needed); the
    captioning itself goes to the worker pool through `run_blocking`."""

    def __init__(self, store: Store, injector: FaultInjector, models: frozenset[str], run_blocking: RunBlocking,
                 world: str = "basic"):
        self.store, self.injector, self.models, self.run_blocking = store, injector, models, run_blocking
        self.world = world  # the scene world lines are captioned in (describe_request)
        self.attempts: Counter[str] = Counter()  # custom_id -> lines run so far (the failure draw's attempt)
        self.tasks: set[asyncio.Task] = set()

    def resume(self) -> None:
        """Restart the batches a previous server left unfinished."""
        for batch in self.store.batches.values():
            if batch["status"] not in TERMINAL:
                self._start(batch["id"])

    async def create(self, body: object) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
            raise RequestError(400, "input_file_id is required", param="input_file_id")
        if body.get("endpoint") != BATCH_ENDPOINT:
            raise RequestError(400, f"the lensforge endpoint only batches {BATCH_ENDPOINT}", param="endpoint")
        if body.get("completion_window") != COMPLETION_WINDOW:
            raise RequestError(400, f"completion_window must be {COMPLETION_WINDOW!r}", param="completion_window")
        input_file = self.store.file(body["input_file_id"])
        if input_file["purpose"] != "batch":
            raise RequestError(400, f"file {input_file['id']} was not uploaded with purpose 'batch'",
                               param="input_file_id")
        now = int(time.time())
        batch = {
            "id": _new_id("batch_"), "object": "batch", "endpoint": BATCH_ENDPOINT, "errors": None,
            "input_file_id": input_file["id"], "completion_window": COMPLETION_WINDOW, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
        }
        self.store.save_batch(batch)
        self._start(batch["id"])
        return batch

    async def cancel(self, batch_id: str) -> dict:
        batch = self.store.batch(batch_id)
        if batch["status"] in TERMINAL:
            raise RequestError(400, f"cannot cancel a batch with status {batch['status']!r}")
        if batch["status"] != "cancelling":
            self._set(batch, "cancelling")
        return batch

    def listing(self, after: str | None, limit: int) -> dict:
        batches = sorted(self.store.batches.values(), key=lambda b: b["created_at"], reverse=True)
        return page(batches, after, limit)

    def _start(self, batch_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _set(self, batch: dict, status: str, **fields) -> None:
        batch.update(status=status, **{f"{status}_at": int(time.time())}, **fields)
        self.store.save_batch(batch)

    async def _run(self, batch_id: str) -> None:
        batch = self.store.batch(batch_id)
        try:
            await self._process(batch)
        except Exception as err:  # a bug or a full disk: fail the batch rather than leave it in_progress forever
            message = f"internal error: {type(err).__name__}: {err}"
            self._set(batch, "failed", errors={"object": "list", "data": [
                {"code": "server_error", "message": message, "param": None, "line": None}]})

    async def _process(self, batch: dict) -> None:
        batch_id = batch["id"]
        lines, errors = await self.run_blocking(self._validate, batch)  # up to 200 MB of JSON: off the loop
        forced = self.injector.faults.batch_status
        if forced == "failed" and not errors:
            errors = [{"code": "forced_failure", "message": "batch failed (the endpoint's batch_status fault)",
                       "param": None, "line": None}]
        if errors:
            self._set(batch, "failed", errors={"object": "list", "data": errors})
            return
        batch["request_counts"]["total"] = len(lines)
        if batch["status"] != "cancelling":
            self._set(batch, "in_progress")
        delay_until = time.monotonic() + self.injector.faults.batch_delay_s
        while time.monotonic() < delay_until and batch["status"] != "cancelling":
            await asyncio.sleep(min(0.05, delay_until - time.monotonic()))
        run_until = math.ceil(len(lines) / 2) if forced in ("expired", "cancelled") else len(lines)
        outputs, failures = [], []
        for start in range(0, run_until, LINES_AT_ONCE):
            if batch["status"] == "cancelling":
                break
            chunk = lines[start:min(start + LINES_AT_ONCE, run_until)]
            draws = []
            for custom_id, _ in chunk:
                draws.append(self.injector.batch_line_fails(custom_id, self.attempts[custom_id]))
                self.attempts[custom_id] += 1
            results = await asyncio.gather(*(self.run_blocking(answer_line, custom_id, body, self.models, fail,
                                                               self.world)
                                             for (custom_id, body), fail in zip(chunk, draws)))
            for ok, record in results:
                (outputs if ok else failures).append(record)
            batch["request_counts"].update(completed=len(outputs), failed=len(failures))
            self.store.save_batch(batch)
        done = len(outputs) + len(failures)
        final = "cancelled" if batch["status"] == "cancelling" or forced == "cancelled" else forced or "completed"
        if final == "expired":
            failures += [{"id": _new_id("batch_req_"), "custom_id": custom_id, "response": None,
                          "error": {"code": "batch_expired", "message": EXPIRED_MESSAGE}}
                         for custom_id, _ in lines[done:]]
            batch["request_counts"]["failed"] = len(failures)
        if final == "completed":
            self._set(batch, "finalizing")
        output_id = self._write_file(batch_id, "output", outputs)
        error_id = self._write_file(batch_id, "error", failures)
        self._set(batch, final, output_file_id=output_id, error_file_id=error_id)

    def _write_file(self, batch_id: str, kind: str, records: list[dict]) -> str | None:
        if not records:
            return None
        data = "".join(json.dumps(record) + "\n" for record in records).encode()
        return self.store.add_file(data, f"{batch_id}_{kind}.jsonl", "batch_output")["id"]

    def _validate(self, batch: dict) -> tuple[list[tuple[str, dict]], list[dict]]:
        """The input file's (custom_id, body) lines, or OpenAI-style validation errors."""
        try:
            text = self.store.content(batch["input_file_id"]).decode("utf-8")
        except (RequestError, UnicodeDecodeError) as err:
            return [], [{"code": "invalid_file", "message": str(err), "param": None, "line": None}]
        lines, errors, seen = [], [], set()

        def error(code: str, message: str, number: int, param: str | None = None) -> None:
            errors.append({"code": code, "message": message, "param": param, "line": number})

        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                error("invalid_json_line", "this line is not valid JSON", number)
                continue
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                error("missing_required_parameter", "custom_id is required", number, "custom_id")
            elif line["custom_id"] in seen:
                error("duplicate_custom_id", f"custom_id {line['custom_id']!r} appears twice", number, "custom_id")
            elif line.get("method") != "POST":
                error("invalid_method", "method must be POST", number, "method")
            elif line.get("url") != batch["endpoint"]:
                error("invalid_url", f"url must be {batch['endpoint']}", number, "url")
            elif not isinstance(line.get("body"), dict):
                error("missing_required_parameter", "body is required", number, "body")
            else:
                seen.add(line["custom_id"])
                lines.append((line["custom_id"], line["body"]))
        if not lines and not errors:
            error("empty_file", "the input file has no requests", 0)
        return lines, errors


def answer_line(custom_id: str, body: dict, models: frozenset[str], fail: bool,
                world: str = "basic") -> tuple[bool, dict]:
    """(ok, output-or-error record) for one batch line; blocking (decode + parse)."""
    request_id = _new_id("req_")
    try:
        if fail:
            raise RequestError(500, "The server had an error while processing your request. Sorry about that!",
                               type_="server_error")
        request = read_request(body, models)
        content, prompt_tokens = caption(request, world)
        response = {"status_code": 200, "request_id": request_id,
                    "body": completion_body(request, content, prompt_tokens)}
        return True, {"id": _new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": None}
    except RequestError as err:
        response = {"status_code": err.status, "request_id": request_id, "body": err.body()}
        return False, {"id": _new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": None}
