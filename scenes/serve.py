"""A threaded static HTTP server for a rendered scene folder, playing the web (loopback only by default).

    lensforge serve-web data/web --port 8000
    server, base_url = start_server("data/web")   # tests: a free port, served from a daemon thread
    ...; server.shutdown(); server.server_close()

`DIR/_serve.json` (re-read whenever it changes) maps URL paths to per-path behaviour, applied in this order:
    {"/images/000001.jpg": {"redirect": "http://127.0.0.1:8000/images/000002.jpg"}}   -> 302 to that URL
    {"/images/000003.jpg": {"status": 503}}                                          -> that status, short body
    {"/images/000004.jpg": {"headers": {"X-Robots-Tag": "noai"}}}                     -> extra/replaced headers
    {"/images/000005.jpg": {"dribble_bytes_per_s": 1}}                                -> body sent that slowly
    {"/images/000006.jpg": {"send_bytes": 100}}                                       -> 100 bytes, then closed
    {"/images/000007.jpg": {"chunked": true}}                                         -> chunked transfer coding
`send_bytes` keeps the whole body's Content-Length (a server that dies mid-body); with `chunked` as well, the bytes
sent go out as chunks and the last (zero-length) chunk never does. Unknown paths get 404. `_serve.json` itself is not
served.
"""

from __future__ import annotations

import ipaddress
import json
import mimetypes
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SIDECAR = "_serve.json"
DRIBBLE_CHUNK = 1  # bytes per write when dribbling


class SceneServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # img2dataset opens many connections at once; the default backlog (5) drops them

    def __init__(self, address: tuple[str, int], root: Path):
        self.root = root.resolve()
        self._rules: dict[str, dict] = {}
        self._rules_stamp: int | None = None
        self._rules_lock = threading.Lock()
        self.stopping = threading.Event()  # lets dribbling handlers give up on shutdown
        super().__init__(address, Handler)

    @property
    def rules(self) -> dict[str, dict]:
        """`_serve.json`, re-read when it changes: the server starts before the dataset is rendered into its
        folder (the URLs need its port)."""
        sidecar = self.root / SIDECAR
        stamp = sidecar.stat().st_mtime_ns if sidecar.is_file() else None
        with self._rules_lock:
            if stamp != self._rules_stamp:
                self._rules = json.loads(sidecar.read_text()) if stamp is not None else {}
                self._rules_stamp = stamp
            return self._rules

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


class Handler(BaseHTTPRequestHandler):
    server: SceneServer
    server_version = "lensforge-scenes/1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: thousands of requests per run
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._respond(send_body=True)

    def _file(self, path: str) -> Path | None:
        """The file under the root that a URL path names, or None (missing, a folder, outside the root, sidecar)."""
        candidate = (self.server.root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.server.root) or candidate.name == SIDECAR or not candidate.is_file():
            return None
        return candidate

    def _respond(self, send_body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rule = self.server.rules.get(path, {})
        if "redirect" in rule:
            self.send_response(302)
            self.send_header("Location", rule["redirect"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        file = self._file(path)
        status = int(rule.get("status", 200 if file else 404))
        if file is None or status != 200:
            body = f"{status} {self.responses.get(status, ('',))[0]}\n".encode()
        else:
            body = file.read_bytes()
        chunked = bool(rule.get("chunked"))
        headers = {"Content-Type": "text/plain" if file is None or status != 200 else
                   (mimetypes.guess_type(file.name)[0] or "application/octet-stream"),
                   **({"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(len(body))})}
        headers.update(rule.get("headers", {}))
        if chunked:  # HTTP/1.1's coding (RFC 9112 §7.1), on a connection that still closes after this response
            self.protocol_version = "HTTP/1.1"
            headers["Connection"] = "close"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if send_body:
            sent = body[: int(rule["send_bytes"])] if "send_bytes" in rule else body  # a server that dies early
            self._send_body(sent, float(rule.get("dribble_bytes_per_s", 0)), chunked, last_chunk=sent == body)

    def _send_body(self, body: bytes, rate: float, chunked: bool = False, last_chunk: bool = True) -> None:
        step = DRIBBLE_CHUNK if rate > 0 else max(1, len(body))  # dribbling: a slow server, for timeout tests
        try:
            for start in range(0, len(body), step):
                if rate > 0 and self.server.stopping.wait(step / rate):
                    return
                piece = body[start:start + step]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                self.wfile.flush()
            if chunked and last_chunk:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout): nothing left to do


def check_loopback(host: str, force: bool = False) -> None:
    """Refuse hosts that are not loopback: the scene web carries deliberate faults and bombs."""
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        raise ValueError(f"cannot resolve host {host!r}") from None
    if not address.is_loopback and not force:
        raise ValueError(
            f"refusing to serve on {host} ({address}): not a loopback address; the scene web serves decompression "
            "bombs and broken files, so it listens on 127.0.0.1 unless forced (--allow-non-loopback)"
        )


def make_server(directory: Path | str, host: str = "127.0.0.1", port: int = 0, force: bool = False) -> SceneServer:
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder to serve: {root}")
    check_loopback(host, force)
    return SceneServer((host, port), root)


def start_server(directory: Path | str, host: str = "127.0.0.1", port: int = 0,
                 force: bool = False) -> tuple[SceneServer, str]:
    """Serve `directory` from a daemon thread; returns the server (call .shutdown(), .server_close()) and its URL."""
    server = make_server(directory, host, port, force)
    threading.Thread(target=server.serve_forever, name="scene-server", daemon=True).start()
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}"


def serve_forever(directory: Path | str, host: str = "127.0.0.1", port: int = 8000, force: bool = False) -> None:
    """Serve until interrupted (the CLI)."""
    server = make_server(directory, host, port, force)
    print(f"serving {Path(directory).resolve()} at http://{host}:{server.server_address[1]} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
