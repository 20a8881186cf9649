"""Run the endpoint: in a background thread for tests and benchmarks, or blocking for the CLI.

    handle, base_url = start_endpoint(latency_s=0.2, api_key="sk-test")   # base_url: http://127.0.0.1:PORT/v1
    client = OpenAI(base_url=base_url, api_key="sk-test")
    handle.set_faults(script=["429", "ok"]); handle.stats(); handle.reset()
    handle.stop()                                                        # or: with handle: ...

    serve(port=8001, rate_429=0.05)    # `lensforge serve-captioner`: until Ctrl-C
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time

from aiohttp import web

from captioning.endpoint.app import STATE, make_app
from captioning.endpoint.faults import Faults

BACKLOG = 1024  # hundreds of clients connect at once in the benchmark; the default backlog would drop some
SHUTDOWN_GRACE_S = 1.0  # stop() waits this long for in-flight requests (a "timeout" fault sleeps 30 s)


def check_loopback(host: str, force: bool = False) -> None:
    """Refuse a non-loopback address unless forced: the endpoint has fault and reset routes that anyone who can
    reach it could use, and an API key is optional."""
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        raise ValueError(f"cannot resolve host {host!r}") from None
    if not address.is_loopback and not force:
        raise ValueError(f"refusing to serve on {host} ({address}): not a loopback address; the captioning endpoint "
                         "is a test double with open fault and reset routes (--allow-non-loopback to force)")


class EndpointHandle:
    """A running endpoint in a daemon thread with its own event loop."""

    def __init__(self, app: web.Application, host: str, port: int):
        self.app, self.host = app, host
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=SHUTDOWN_GRACE_S)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(host, port), name="caption-endpoint", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        self.port = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{self.port}/v1"

    def _main(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port, backlog=BACKLOG)
            self._loop.run_until_complete(site.start())
        except BaseException as err:  # noqa: BLE001 - handed to the starting thread, which raises it
            self._error = err
            try:
                self._loop.run_until_complete(self._runner.cleanup())
            finally:
                self._loop.close()
                self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (in-flight requests get SHUTDOWN_GRACE_S), cancel running batches, free the port."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def stats(self) -> dict:
        """What GET /_lensforge/stats answers."""
        return self.app[STATE].stats.snapshot()

    def set_faults(self, **changes) -> Faults:
        """What POST /_lensforge/faults does: merge these settings into the active ones."""
        return self.app[STATE].injector.update(changes)

    def reset(self) -> Faults:
        """What POST /_lensforge/reset does: clear the stats, back to the starting fault settings."""
        self.app[STATE].stats.clear()
        return self.app[STATE].injector.reset()

    def __enter__(self) -> EndpointHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_endpoint(host: str = "127.0.0.1", port: int = 0, *, allow_non_loopback: bool = False,
                   **options) -> tuple[EndpointHandle, str]:
    """Start the endpoint in a daemon thread; returns (handle, base_url). `port=0` picks a free port.

    options: api_key, models, state_dir, workers, world (see app.make_app) and every `Faults` field: latency_s,
    latency_jitter_s, rate_429, rate_500, rate_timeout, rate_malformed, rate_refusal, rate_truncate, rate_empty,
    retry_after_s, timeout_sleep_s, script, seed, batch_fail_rate, batch_status, batch_delay_s.
    """
    check_loopback(host, allow_non_loopback)
    handle = EndpointHandle(make_app(**options), host, port)
    return handle, handle.base_url


def serve(host: str = "127.0.0.1", port: int = 8001, *, allow_non_loopback: bool = False, **options) -> None:
    """Serve until interrupted (the CLI). The API key, if any, is never printed."""
    handle, base_url = start_endpoint(host, port, allow_non_loopback=allow_non_loopback, **options)
    state = handle.app[STATE]
    auth = "Bearer key required" if state.api_key else "no key required"
    print(f"lensforge captioning endpoint (synthetic scenes only) at {base_url}; models: "
          f"{', '.join(sorted(state.models))}; {auth}; Ctrl-C stops", flush=True)
    try:
        while handle.running:
            time.sleep(0.5)
    finally:
        handle.stop()
