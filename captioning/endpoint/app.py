"""The endpoint's aiohttp application: OpenAI's routes, the fault injection, and the /_lensforge control routes.

    app = make_app(api_key="sk-test", latency_s=0.2)   # then run it (server.start_endpoint / server.serve)
    app = make_app(world="rich")                         # images parsed and described in the rich scene world

Routes (under /v1 a Bearer key is required when api_key is set):
    GET  /v1/models, /v1/models/{id}
    POST /v1/chat/completions                     captions the first image (describe_request); faults applied
    POST /v1/files  GET /v1/files[/{id}[/content]]  DELETE /v1/files/{id}
    POST /v1/batches  GET /v1/batches[/{id}]  POST /v1/batches/{id}/cancel
    GET  /_lensforge/stats   GET|POST /_lensforge/faults   POST /_lensforge/reset    (no key needed)

Stats count chat-completion requests only: {"requests", "by_outcome" (ok, 429, 500, timeout, malformed, refusal,
truncate, empty, 401, and 400/404 for bad requests), "by_key" (X-Lensforge-Key header), "answered" and
"answered_by_key" (requests answered 200, i.e. what a real API bills, counted as the response is handed to aiohttp
to send), "in_flight", "in_flight_max"}. Batch lines are not counted there (they are in the batch's request_counts).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from captioning.endpoint.batches import BatchRunner, Store, page
from captioning.endpoint.describe_request import (
    RequestError, apply_outcome, caption, completion_body, error_body, read_request,
)
from captioning.endpoint.faults import FaultInjector, Faults
from scenes.scene import WORLDS

DEFAULT_MODELS = ("gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "lensforge-scenes")
KEY_HEADER = "X-Lensforge-Key"  # the manifest key a client sends along; counted in /_lensforge/stats
MAX_BODY_BYTES = 200 * 2**20  # OpenAI's limit for a batch input file; data-URL images are far smaller
MALFORMED_BODY = '{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [{"index": 0, "mess'
SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"


class Stats:
    """Request counts for tests; thread-safe (the loop writes, test threads read)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.in_flight = 0
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self.requests, self.by_outcome, self.by_key = 0, Counter(), Counter()
            self.answered, self.answered_by_key = 0, Counter()
            self.in_flight_max = self.in_flight

    def begin(self, key: str | None) -> None:
        with self._lock:
            self.requests += 1
            if key:
                self.by_key[key] += 1
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)

    def end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def answer(self, key: str | None) -> None:
        with self._lock:
            self.answered += 1
            if key:
                self.answered_by_key[key] += 1

    def outcome(self, name: str) -> None:
        with self._lock:
            self.by_outcome[name] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "by_outcome": dict(self.by_outcome), "by_key": dict(self.by_key),
                    "answered": self.answered, "answered_by_key": dict(self.answered_by_key),
                    "in_flight": self.in_flight, "in_flight_max": self.in_flight_max}


@dataclass
class EndpointState:
    models: frozenset[str]
    api_key: str | None
    injector: FaultInjector
    pool: ThreadPoolExecutor
    store: Store
    world: str = "basic"  # the scene world images are parsed and described in
    batches: BatchRunner = field(init=False)
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.batches = BatchRunner(self.store, self.injector, self.models, self.run_blocking, self.world)

    async def run_blocking(self, fn, *args):
        """fn(*args) in the worker pool: decoding and parsing an image is CPU work that must not stall the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        return hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.api_key}")


STATE = web.AppKey("lensforge_endpoint", EndpointState)


def error_response(status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None,
                   param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, type_, code, param), status=status, headers=headers)


@web.middleware
async def middleware(request: web.Request, handler) -> web.StreamResponse:
    """Auth, OpenAI-style errors, request ids and the chat route's stats."""
    state = request.app[STATE]
    chat = request.path == "/v1/chat/completions"
    if chat:
        state.stats.begin(request.headers.get(KEY_HEADER))
    try:
        if request.path.startswith("/v1/") and not state.authorized(request):
            if chat:
                state.stats.outcome("401")
            response = error_response(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        else:
            response = await handler(request)
            if chat and response.status == 200:
                state.stats.answer(request.headers.get(KEY_HEADER))
    except RequestError as err:
        if chat:
            state.stats.outcome(str(err.status))
        response = web.json_response(err.body(), status=err.status)
    except web.HTTPException as err:  # unknown route or method: OpenAI-style JSON, not aiohttp's text page
        if err.status < 400:
            raise
        response = error_response(err.status, f"{err.reason}: {request.method} {request.path}",
                                  "invalid_request_error")
    finally:
        if chat:
            state.stats.end()
    response.headers.setdefault("x-request-id", f"req_{uuid.uuid4().hex[:24]}")
    return response


async def _json(request: web.Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not valid JSON") from None


async def chat_completions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    chat = read_request(await _json(request), state.models)
    injector = state.injector
    outcome = injector.next_outcome()
    delay = injector.latency() + (injector.faults.timeout_sleep_s if outcome == "timeout" else 0.0)
    if outcome in ("401", "429", "500", "timeout"):  # counted now: a timed-out client cancels this handler
        state.stats.outcome(outcome)
    if delay:
        await asyncio.sleep(delay)
    if outcome == "401":
        return error_response(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    if outcome == "429":
        retry_after = injector.faults.retry_after_s
        return error_response(429, f"Rate limit reached for {chat.model}. Please try again in {retry_after:g}s.",
                              "requests", "rate_limit_exceeded", headers={"Retry-After": f"{retry_after:g}"})
    if outcome == "500":
        return error_response(500, SERVER_ERROR, "server_error")
    content, prompt_tokens = await state.run_blocking(caption, chat, state.world)
    if outcome != "timeout":
        state.stats.outcome(outcome)
    if outcome == "malformed":
        return web.Response(text=MALFORMED_BODY, content_type="application/json")
    content, finish_reason = apply_outcome(content, outcome)
    return web.json_response(completion_body(chat, content, prompt_tokens, finish_reason))


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "lensforge"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(m) for m in sorted(request.app[STATE].models)]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in request.app[STATE].models:
        raise RequestError(404, f"The model `{name}` does not exist", code="model_not_found", param="model")
    return web.json_response(_model(name))


async def upload_file(request: web.Request) -> web.Response:
    form = await request.post()
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(purpose, str) or not purpose:
        raise RequestError(400, "purpose is required", param="purpose")
    if not isinstance(upload, web.FileField):
        raise RequestError(400, "file is required (multipart/form-data)", param="file")
    return web.json_response(request.app[STATE].store.add_file(upload.file.read(), upload.filename, purpose))


async def list_files(request: web.Request) -> web.Response:
    purpose = request.query.get("purpose")
    files = [f for f in request.app[STATE].store.files.values() if purpose in (None, f["purpose"])]
    files.sort(key=lambda f: f["created_at"], reverse=True)
    return web.json_response(page(files, request.query.get("after"), _limit(request, 10_000)))


async def get_file(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].store.file(request.match_info["id"]))


async def file_content(request: web.Request) -> web.Response:
    data = request.app[STATE].store.content(request.match_info["id"])
    return web.Response(body=data, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].store.delete_file(request.match_info["id"]))


def _limit(request: web.Request, default: int) -> int:
    try:
        return max(1, int(request.query.get("limit", default)))
    except ValueError:
        raise RequestError(400, "limit must be an integer", param="limit") from None


async def create_batch(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STATE].batches.create(await _json(request)))


async def get_batch(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].store.batch(request.match_info["id"]))


async def cancel_batch(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STATE].batches.cancel(request.match_info["id"]))


async def list_batches(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(state.batches.listing(request.query.get("after"), min(_limit(request, 20), 100)))


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats.snapshot())


async def faults(request: web.Request) -> web.Response:
    injector = request.app[STATE].injector
    if request.method == "GET":
        return web.json_response(injector.faults.model_dump())
    changes = await _json(request)
    if not isinstance(changes, dict):
        raise RequestError(400, "send a JSON object of fault settings")
    try:
        return web.json_response(injector.update(changes).model_dump())
    except ValidationError as err:
        raise RequestError(400, f"bad fault settings: {err.errors(include_url=False)}") from None


async def reset(request: web.Request) -> web.Response:
    """Clear the stats and put the faults back to the settings the server started with."""
    state = request.app[STATE]
    state.stats.clear()
    return web.json_response({"stats": state.stats.snapshot(), "faults": state.injector.reset().model_dump()})


def make_app(*, api_key: str | None = None, models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
             state_dir: str | Path | None = None, workers: int | None = None, world: str = "basic",
             **fault_options) -> web.Application:
    """The endpoint as an aiohttp app. `fault_options` are `Faults` fields; `state_dir` keeps files and batches
    across restarts (default: a temporary folder removed on shutdown); `workers` sizes the captioning pool;
    `world` is the scene world (scenes/scene.py WORLDS) images are parsed and described in."""
    if world not in WORLDS:
        raise ValueError(f"unknown scene world {world!r}; known: {', '.join(WORLDS)}")
    injector = FaultInjector(Faults(**fault_options))
    temporary = state_dir is None
    root = Path(tempfile.mkdtemp(prefix="lensforge-endpoint-") if temporary else state_dir)
    pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1), thread_name_prefix="caption")
    state = EndpointState(frozenset(models), api_key, injector, pool, Store(root), world)
    app = web.Application(middlewares=[middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = state

    async def on_startup(_: web.Application) -> None:
        state.batches.resume()

    async def on_cleanup(_: web.Application) -> None:
        for task in list(state.batches.tasks):
            task.cancel()
        await asyncio.gather(*state.batches.tasks, return_exceptions=True)
        pool.shutdown(wait=False, cancel_futures=True)
        if temporary:
            shutil.rmtree(root, ignore_errors=True)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.add_routes([
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model}", get_model),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/files", upload_file),
        web.get("/v1/files", list_files),
        web.get("/v1/files/{id}", get_file),
        web.get("/v1/files/{id}/content", file_content),
        web.delete("/v1/files/{id}", delete_file),
        web.post("/v1/batches", create_batch),
        web.get("/v1/batches", list_batches),
        web.get("/v1/batches/{id}", get_batch),
        web.post("/v1/batches/{id}/cancel", cancel_batch),
        web.get("/_lensforge/stats", get_stats),
        web.get("/_lensforge/faults", faults),
        web.post("/_lensforge/faults", faults),
        web.post("/_lensforge/reset", reset),
    ])
    return app

