"""Batch API JSONL: request files within the API's limits, and caption rows from output and error files.

One line per chat.completions request, OpenAI's batch input format, which offline engines read as is
(`vllm run-batch -i in.jsonl -o out.jsonl --model M`):

    {"custom_id": "<key>|<variant or json>|<attempt>", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

The body is `request.build_request`'s; the tag is the variant, or "json" for a json_mode body that asks for several
variants at once. Output and error files hold one record per request,

    {"id": ..., "custom_id": ..., "response": {"status_code": 200, "body": {...}} | null, "error": null | {...}}

and `outcomes` turns them into caption rows (`request.parse_response` at batch prices) plus the requests worth
sending again. Used by captioning/batch.py (online) and by `write_batch_input` / `read_batch_output` there
(offline).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from captioning.client import RETRYABLE_STATUS
from captioning.config import CaptionConfig, Price
from captioning.images import load_images
from captioning.ledger import reservation_usd
from captioning.presets import Preset
from captioning.request import build_request, error_rows, parse_response, variant_groups
from captioning.schema import STATUS_OK
from common.atomic import publish

ENDPOINT = "/v1/chat/completions"
JSON_TAG = "json"
MB = 1_000_000  # the API's "200 MB" is decimal


def custom_id(key: str, tag: str, attempt: int) -> str:
    return f"{key}|{tag}|{attempt}"


def parse_custom_id(cid: str) -> tuple[str, str, int]:
    """(key, tag, attempt) of a custom_id; keys never hold '|' (zero-padded row numbers), tags neither."""
    key, tag, attempt = cid.rsplit("|", 2)
    return key, tag, int(attempt)


def request_line(cid: str, body: dict) -> bytes:
    line = {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}
    return (json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


@dataclass
class Request:
    """One line of a batch input file, with the variants its body asks for."""

    cid: str
    variants: list[str]
    line: bytes
    reserve_usd: float = 0.0  # worst-case cost (ledger.reservation_usd), when a price was given


def requests_for(data: str | Path, items: Iterable[dict], presets: dict[str, Preset], cfg: CaptionConfig,
                 on_error: Callable[[list[dict]], None], price: Price | None = None) -> Iterator[Request]:
    """Requests of pending-work items ({key, alt_text, shard, member, variants}, optionally `attempt`, default 1).
    Images are read and resized `cfg.chunk_size` keys at a time; an unreadable image gives error rows (to
    `on_error`) instead of a request, as in the online path. With `price`, each request carries its worst-case
    cost for the budget."""
    items = iter(items)
    while True:
        chunk = [item for _, item in zip(range(cfg.chunk_size), items)]
        if not chunk:
            return
        images = load_images(data, chunk, cfg)
        for item in chunk:
            image = images[item["key"]]
            if isinstance(image, str):
                on_error(error_rows(item["key"], item["variants"], cfg, image))
                continue
            bodies = build_request(item["key"], image.data_url, item["variants"], presets, cfg, item["alt_text"])
            for group, body in zip(variant_groups(item["variants"], cfg), bodies):
                tag = group[0] if len(group) == 1 else JSON_TAG
                cid = custom_id(item["key"], tag, item.get("attempt", 1))
                reserve = reservation_usd(body, image.width, image.height, price) if price is not None else 0.0
                yield Request(cid, group, request_line(cid, body), reserve)


@dataclass
class InputFile:
    """A finished batch input file: its path and the requests it holds (custom_id → variants)."""

    path: Path
    requests: dict[str, list[str]] = field(default_factory=dict)
    bytes: int = 0
    reserved_usd: float = 0.0


class InputWriter:
    """Appends request lines to `<stem>-NNNNN.jsonl` files in `folder`, starting a new file before one would pass
    `max_requests` lines or `max_bytes` bytes. `add` returns the file it closed, if any."""

    def __init__(self, folder: Path, stem: str, max_requests: int, max_bytes: int):
        self.folder, self.stem = Path(folder), stem
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self._file = None
        self.current: InputFile | None = None

    def add(self, request: Request) -> InputFile | None:
        size = len(request.line)
        if size > self.max_bytes:
            raise ValueError(f"request {request.cid} is {size:,} bytes, over the batch file limit of "
                             f"{self.max_bytes:,}: lower caption.max_side")
        closed = None
        cur = self.current
        if cur is not None and (len(cur.requests) >= self.max_requests or cur.bytes + size > self.max_bytes
                                or request.cid in cur.requests):  # a duplicate custom_id fails the whole batch
            closed = self.close()
        if self.current is None:
            path = self.folder / f"{self.stem}-{self.n:05d}.jsonl"
            self.n += 1
            self._file = open(path.with_name(path.name + ".tmp"), "wb")
            self.current = InputFile(path)
        self._file.write(request.line)
        self.current.requests[request.cid] = request.variants
        self.current.bytes += size
        self.current.reserved_usd += request.reserve_usd
        return closed

    def close(self) -> InputFile | None:
        """Finish the open file (renamed into place, so a file under its final name is always whole)."""
        done, self.current = self.current, None
        if done is not None:
            self._file.close()
            publish(done.path.with_name(done.path.name + ".tmp"), done.path)
        return done


def read_jsonl(source: bytes | str | Path) -> Iterator[dict]:
    """Records of a JSONL file (path) or content (bytes); blank lines skipped."""
    lines = source.splitlines() if isinstance(source, bytes) else open(source, "rb")
    try:
        for raw in lines:
            if raw.strip():
                yield json.loads(raw)
    finally:
        if not isinstance(source, bytes):
            lines.close()


def _failure(record: dict | None) -> tuple[str, bool]:
    """(message, worth retrying) for a record that carries no 200 response; None = the request never ran."""
    if record is None:
        return "no result in the batch's output or error file", True
    error, response = record.get("error"), record.get("response")
    if error:  # OpenAI: {"code": "batch_expired", ...}, the request never ran; vLLM: a message string
        text = f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else str(error)
        return text[:300], True
    status = (response or {}).get("status_code")
    body = (response or {}).get("body") or {}
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    retry = status is None or status >= 500 or status == 429 or status in RETRYABLE_STATUS  # as online
    return f"{status}: {message or body}"[:300], retry


@dataclass
class Failure:
    """A request that got no answer: why, and whether sending it again may help (5xx, expired, never run)."""

    key: str
    variants: list[str]
    attempt: int
    message: str
    retryable: bool


@dataclass
class Outcomes:
    """What one batch's results hold for its requests."""

    rows: list[dict] = field(default_factory=list)  # from answered requests (billed), checks applied
    retry_checks: list[tuple[str, list[str], int]] = field(default_factory=list)  # (key, variants, attempt) answered
    # but failing a check
    failures: list[Failure] = field(default_factory=list)  # unanswered requests: no rows yet

    @property
    def ok(self) -> int:
        return sum(r["status"] == STATUS_OK for r in self.rows)

    def failure_rows(self, cfg: CaptionConfig, presets: dict[str, Preset]) -> list[dict]:
        """Error rows for the failures, written once no further attempt will be made (nothing billed)."""
        return [r for f in self.failures for r in error_rows(f.key, [presets[v] for v in f.variants], cfg,
                                                             f.message)]


def outcomes(requests: dict[str, list[str]], records: Iterable[dict], cfg: CaptionConfig,
             presets: dict[str, Preset]) -> Outcomes:
    """Sort the `requests` (custom_id → variants) by their output/error `records`: a 200 body gives caption rows
    (`parse_response`, batch prices); anything else, or no record at all, a Failure. Records of other
    custom_ids are ignored."""
    by_id = {}
    for record in records:
        if record.get("custom_id") in requests:
            by_id[record["custom_id"]] = record
    out = Outcomes()
    for cid, variants in requests.items():
        key, _, attempt = parse_custom_id(cid)
        record = by_id.get(cid)
        response = (record or {}).get("response") or {}
        if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
            rows = parse_response(response["body"], [presets[v] for v in variants], cfg, key=key, batch=True)
            out.rows.extend(rows)
            failed = [r["variant"] for r in rows if r["status"] != STATUS_OK]
            if failed:
                out.retry_checks.append((key, failed, attempt))
        else:
            message, retry = _failure(record)
            out.failures.append(Failure(key, list(variants), attempt, message, retry))
    return out
