"""Sending chat.completions requests with our own retries, shared rate control and fatal-error handling.

    probe_endpoint(cfg)                             # before any work: unreachable, wrong path, wrong key → one line
    client = make_client(cfg)                       # AsyncOpenAI (or AsyncAzureOpenAI) on aiohttp, max_retries=0
    sender = Sender(client, cfg)
    answer = await sender.send(body, key)           # Answer(body | None, error, latency_s, attempts)

The openai client's own retries are off: a 429 must slow *every* request of the worker, not one. So a 429 pauses
all requests until its Retry-After and halves the allowed concurrency, which then grows back by one per window of
successes (AIMD, as TCP). 5xx, timeouts and connection errors back off exponentially with full jitter, per request.
401 and 404 (unknown model) raise `FatalError`: no other request can succeed, so the job stops at once. A refused
connection is a connection error, not a timeout (`connect_failure`), and `probe_endpoint` finds one before any work.
After `sender.stop()` (SIGTERM/SIGINT) nothing more is sent: a request not yet sent raises `NotSent`, a retry is not
made (its Answer says so) and backoffs are cut short; requests already sent are answered as usual.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import random
import socket
import ssl
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlparse

import openai

try:  # the HTTP library the installed openai SDK is built on (httpx2 in openai 3.x, httpx before)
    from httpx2 import Response as RawResponse
except ImportError:  # pragma: no cover - older SDKs
    from httpx import Response as RawResponse

from captioning.config import CaptionConfig

KEY_HEADER = "X-Lensforge-Key"  # the manifest key, so a server (the local endpoint) can count requests per key
LOCAL_API_KEY = "sk-local"  # any key works on a loopback endpoint
RETRYABLE_STATUS = {408, 409}  # besides 429 and 5xx
PROBE_TIMEOUT_S = 10.0  # per probe request: a live server answers GET /models at once, even when busy


class AuthError(ValueError):
    """401/403: the key is wrong or lacks access. The CLI prints it in one line."""


class ModelNotFound(LookupError):
    """404: the model (or Azure deployment) does not exist on this server."""


class EndpointUnreachable(ConnectionError):
    """The probe got no HTTP answer at all: refused, unknown host, TLS, or nothing within PROBE_TIMEOUT_S."""


class EndpointNotFound(LookupError):
    """The probe's routes all answered 404: the base URL's path is wrong (most often a missing /v1)."""


FatalError = (AuthError, ModelNotFound, EndpointUnreachable, EndpointNotFound)


class NotSent(Exception):
    """The sender was stopped before this request went out: no answer, no row; the next run asks again."""


def is_loopback(url: str | None) -> bool:
    host = urlparse(url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(cfg: CaptionConfig) -> str:
    """The key from the environment variable `cfg.api_key_env`; "sk-local" for a loopback endpoint without one."""
    key = os.environ.get(cfg.api_key_env, "").strip()
    if key:
        return key
    if is_loopback(cfg.base_url):
        return LOCAL_API_KEY
    raise ValueError(f"no API key: set the environment variable {cfg.api_key_env} (caption.api_key_env) for "
                     f"{endpoint_name(cfg)}")


def endpoint_name(cfg: CaptionConfig) -> str:
    return cfg.azure.endpoint if cfg.azure else (cfg.base_url or "api.openai.com")


def make_client(cfg: CaptionConfig, api_key: str) -> openai.AsyncOpenAI:
    # aiohttp transport: measured the cheapest per request in client CPU (~1.6 ms vs ~3 ms for httpx's default).
    common = dict(api_key=api_key, max_retries=0, timeout=cfg.timeout_s, http_client=openai.DefaultAioHttpClient())
    if cfg.azure is not None:
        return openai.AsyncAzureOpenAI(azure_endpoint=cfg.azure.endpoint, api_version=cfg.azure.api_version,
                                       azure_deployment=cfg.azure.deployment, **common)
    return openai.AsyncOpenAI(base_url=cfg.base_url, **common)


def connect_failure(err: BaseException) -> str | None:
    """Why no connection could be made ("connection refused", "cannot resolve the host: …"), read from err's cause
    chain; None when the failure was not one (a real timeout). The aiohttp transport turns every failed connect into
    a ConnectTimeout, so the SDK raises APITimeoutError for a refused connection too: only the chain tells."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    oserrors = [e for e in chain if isinstance(e, OSError) and not isinstance(e, TimeoutError)]
    for e in oserrors:  # the most specific first: aiohttp's ClientConnectorError wraps the OSError it met
        if isinstance(e, ConnectionRefusedError) or e.errno == errno.ECONNREFUSED:
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host: {e.strerror or e}"
        if isinstance(e, ssl.SSLError):
            return f"TLS failed: {e.reason or e}"
    coded = [e for e in oserrors if e.errno and e.errno > 0]
    return os.strerror(coded[-1].errno).lower() if coded else None


def fatal_error(err: openai.APIStatusError, cfg: CaptionConfig, api_key: str | None) -> Exception | None:
    """401/403 → AuthError, 404 → ModelNotFound (a chat request's 404 once the probe found the route), else None."""
    message = redact(getattr(err, "message", str(err)), api_key).splitlines()[0][:200]
    if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return AuthError(f"{err.status_code} from {endpoint_name(cfg)}: the API key was rejected: {message} "
                         f"(check ${cfg.api_key_env})")
    if isinstance(err, openai.NotFoundError):
        model = cfg.azure.deployment if cfg.azure else cfg.model
        return ModelNotFound(f"model {model!r} not found at {endpoint_name(cfg)} (404 at {request_url(err)}): "
                             f"{message}")
    return None


def request_url(err: openai.APIError) -> str:
    """The URL a failed request went to, without its query (Azure's api-version)."""
    request = getattr(err, "request", None)
    return str(request.url).partition("?")[0] if request is not None else "?"


def probe_endpoint(cfg: CaptionConfig, batch: bool = False, api_key: str | None = None) -> None:
    """One cheap look at the endpoint before any work (`lensforge caption`, not its dry run): raises
    EndpointUnreachable, EndpointNotFound or AuthError with a one-line message; returns on any other answer (5xx
    and 429 included: the server is there, and the run's retries deal with those).

    GET /models first: free, and answered by OpenAI, Azure, vLLM, SGLang, Ollama and LiteLLM. Some
    OpenAI-compatible servers do not serve it, so its 404 alone proves nothing: then the route the job needs is
    tried too, and only a 404 there as well is fatal. For chat that is POST /chat/completions with an empty body,
    which a live route rejects (400/422) before it runs any model, so the probe costs nothing; for the Batch API,
    GET /batches. No retries: a connection error or a timeout here would fail every request the same way."""
    return asyncio.run(_probe(cfg, batch, api_key or resolve_api_key(cfg)))


async def _probe(cfg: CaptionConfig, batch: bool, api_key: str) -> None:
    timeout = min(cfg.timeout_s, PROBE_TIMEOUT_S)
    options = {"timeout": timeout}
    missing = []
    async with make_client(cfg, api_key) as client:
        for path in ("/models", "/batches" if batch else "/chat/completions"):
            try:
                if path == "/chat/completions":
                    await client.post(path, body={}, cast_to=RawResponse, options=options)
                else:
                    await client.get(path, cast_to=RawResponse, options=options)
                return
            except openai.APIConnectionError as err:  # APITimeoutError is one
                why = connect_failure(err) or f"no answer within {timeout:g} s"
                raise EndpointUnreachable(f"caption: cannot connect to {endpoint_name(cfg)} ({why})") from None
            except openai.NotFoundError as err:
                missing.append(request_url(err))
            except openai.APIStatusError as err:
                fatal = fatal_error(err, cfg, api_key)
                if fatal is not None:
                    raise fatal from None
                return
    raise EndpointNotFound(f"caption: the endpoint answered 404 at {' and at '.join(missing)}: {path_hint(cfg)}")


def path_hint(cfg: CaptionConfig) -> str:
    if cfg.azure is not None:
        return "check caption.azure.endpoint (https://<resource>.openai.azure.com, no path)"
    base = (cfg.base_url or "https://api.openai.com/v1").rstrip("/")
    if not urlparse(base).path.endswith("/v1"):
        return f"is --base-url missing /v1 ({base}/v1)?"
    return "check the path of --base-url"


class RateController:
    """A semaphore whose size adapts (AIMD) and which every request waits on while a 429 pause lasts."""

    def __init__(self, max_concurrency: int):
        self.max = max_concurrency
        self.limit = float(max_concurrency)
        self.in_flight = 0
        self.paused_until = 0.0
        self._last_cut = 0.0
        self._cond = asyncio.Condition()
        self._stopped = asyncio.Event()

    async def acquire(self) -> None:
        """A slot to send in; raises NotSent once stopped."""
        async with self._cond:
            while True:
                if self._stopped.is_set():
                    raise NotSent
                wait = self.paused_until - time.monotonic()
                if wait > 0:
                    try:  # woken early only by another pause; re-check either way
                        await asyncio.wait_for(self._cond.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                elif self.in_flight < int(self.limit):
                    self.in_flight += 1
                    return
                else:
                    await self._cond.wait()

    async def release(self) -> None:
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def stop(self) -> None:
        """From the event loop's thread: every waiting and later `acquire` raises NotSent, `sleep` returns."""
        if not self._stopped.is_set():
            self._stopped.set()
            self._waking = asyncio.get_running_loop().create_task(self.release_waiters())  # held: not GC'd

    async def release_waiters(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def sleep(self, seconds: float) -> None:
        """A backoff, cut short by `stop`."""
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def on_success(self) -> None:
        self.limit = min(self.max, self.limit + 1.0 / self.limit)  # +1 per `limit` successes

    def on_rate_limit(self, retry_after_s: float) -> None:
        now = time.monotonic()
        self.paused_until = max(self.paused_until, now + retry_after_s)
        # One cut per burst: the requests already in flight when the server started refusing all see a 429 too.
        if now - self._last_cut > retry_after_s:
            self.limit = max(1.0, self.limit / 2)
            self._last_cut = now


def retry_after_s(err: openai.APIStatusError) -> float | None:
    """Seconds from the response's retry-after-ms / Retry-After header (seconds or an HTTP date)."""
    headers = err.response.headers if err.response is not None else {}
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


@dataclass
class Answer:
    body: dict | None  # the parsed response body; None when no usable answer came back
    error: str | None  # why not
    latency_s: float  # of the last attempt
    attempts: int


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "sk-***") if secret and len(secret) > 4 else text


class Sender:
    def __init__(self, client: openai.AsyncOpenAI, cfg: CaptionConfig, api_key: str | None = None):
        self.client, self.cfg, self._key = client, cfg, api_key
        self.rate = RateController(cfg.concurrency)
        self.counts = {"429": 0, "5xx": 0, "timeout": 0, "connection": 0}

    def stop(self) -> None:
        self.rate.stop()

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempt - 1)))

    async def _post(self, body: dict, key: str) -> dict | str:
        """One attempt: the parsed body, or a string saying why the 200 body was unusable."""
        # client.post (the SDK's documented way to call any route) sends the body as is: chat.completions.create
        # would first walk it through the SDK's TypedDict transform, measured at ~45 % of the client's CPU per
        # request. The response comes back raw, so no pydantic objects are built either.
        raw = await self.client.post("/chat/completions", body=body, cast_to=RawResponse,
                                     options={"headers": {KEY_HEADER: key}, "timeout": self.cfg.timeout_s})
        try:
            parsed = json.loads(raw.content)
        except (ValueError, UnicodeDecodeError) as err:
            return f"malformed response body: {err}"[:200]
        return parsed if isinstance(parsed, dict) else "malformed response body: not a JSON object"

    async def send(self, body: dict, key: str) -> Answer:
        """Up to `max_attempts` tries; raises AuthError / ModelNotFound, or NotSent when stopped before the first
        try; otherwise always returns an Answer."""
        error, latency = "not sent", 0.0
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                await self.rate.acquire()
            except NotSent:
                if attempt == 1:
                    raise
                return Answer(None, f"stopped before retrying: {error}"[:300], latency, attempt - 1)
            started = time.monotonic()
            wait = None
            try:
                result = await self._post(body, key)
                latency = time.monotonic() - started
                self.rate.on_success()
                if isinstance(result, str):
                    return Answer(None, result, latency, attempt)
                return Answer(result, None, latency, attempt)
            except openai.RateLimitError as err:
                self.counts["429"] += 1
                error = "429 rate limited"
                self.rate.on_rate_limit(retry_after_s(err) or self.backoff(attempt))
            except openai.APIStatusError as err:
                fatal = fatal_error(err, self.cfg, self._key)
                if fatal is not None:
                    raise fatal from None
                error = f"{err.status_code}: {redact(err.message, self._key)}"[:300]
                if err.status_code < 500 and err.status_code not in RETRYABLE_STATUS:
                    return Answer(None, error, time.monotonic() - started, attempt)  # 400s: this request is bad
                self.counts["5xx"] += 1
                wait = self.backoff(attempt)
            except openai.APIConnectionError as err:  # APITimeoutError included, refused connections among them
                failure = connect_failure(err)
                if isinstance(err, openai.APITimeoutError) and failure is None:
                    self.counts["timeout"] += 1
                    error = f"timeout after {self.cfg.timeout_s:g} s"
                else:
                    self.counts["connection"] += 1
                    error = f"connection error: {failure or err.__cause__ or err}"[:300]
                wait = self.backoff(attempt)
            finally:
                await self.rate.release()
            if wait is not None and attempt < self.cfg.max_attempts:
                await self.rate.sleep(wait)
        return Answer(None, f"gave up after {self.cfg.max_attempts} attempts: {error}", latency, self.cfg.max_attempts)
