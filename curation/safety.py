"""URL safety before any request: the SSRF guard, and bounds on what one response may cost.

First `iri_to_uri`: a web URL may hold non-ASCII characters or spaces (an IRI); the guard vets, and the downloader
fetches, the URI it stands for. Then two layers, one policy (`UrlGuard`):
- `UrlGuard.static_reason(url)` runs in the tasks that cut the URL list into input shards (input_shards.py), with
  no network: scheme (http/https only), credentials in the URL, hosts that are literal non-public IPs or
  `localhost`. A refused row's URI is blanked, so the downloader never fetches it; it becomes a manifest row with
  reject_reason `unsafe_url` and the guard's reason as its error.
- `guarded_opener(policy)` is installed as urllib's global opener inside every download worker (Ray's
  `worker_process_setup_hook`), so img2dataset's own `urllib.request.urlopen` goes through it. It resolves the host
  inside `connect()` and connects to the address it vetted (no second DNS lookup for a rebinding attacker to
  answer), re-checks every redirect target, and caps each response's body size and total wall time (a server that
  dribbles a byte a second trips the time cap, not just the per-read socket timeout). A body that ends before its
  Content-Length or its last chunk raises `IncompleteBodyError` (RFC 9112 §6.3: such a message is incomplete), so
  the cut bytes never pass for an image. It has no file://, ftp:// or data: handlers and ignores proxy variables.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import idna  # UTS #46 IDNA, what browsers use (the stdlib codec is IDNA 2003); installed with aiohttp's yarl

UNSAFE_PREFIX = "unsafe url: "  # every refusal message starts with this; curate maps it to reject_reason unsafe_url
INCOMPLETE_PREFIX = "incomplete body: "  # a response cut short; curate records it as a failed_download
POLICY_ENV = "LENSFORGE_URL_POLICY"  # the policy travels to Ray workers as JSON in this environment variable
ALLOWED_SCHEMES = ("http", "https")
MAX_REDIRECTS = 5

URI_KEEP = ":/?#[]@!$&'()*+,;=%"  # RFC 3986 reserved characters and "%"; letters, digits and "-._~" are never quoted
_URI_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~" + URI_KEEP)
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a "%" that starts no escape: itself, encoded (%25)


def iri_to_uri(iri: str) -> str:
    """The URI an IRI stands for (RFC 3987 §3.1), as a browser requests it: in the path, query and fragment every
    non-ASCII character percent-encoded as UTF-8, and so is every ASCII one a URI cannot hold (space, controls,
    quotes, angle brackets, braces ...); a non-ASCII host IDNA-encoded. Escapes already there, reserved characters
    and ASCII hosts are left alone, so a URI comes back unchanged (bar surrounding white space).

    Why: http.client sends ASCII only ("'ascii' codec can't encode") and refuses spaces, so `.../画像.jpg` or
    `.../a b.jpg` would fail to download while their percent-encoded forms do; and the guard must vet the host that
    will be connected to (IDNA maps a full-width `ｌｏｃａｌｈｏｓｔ` to `localhost`). What cannot be encoded (a host
    IDNA refuses, a netloc urllib rejects) is left as it is, for `UrlGuard.static_reason` to refuse as malformed."""
    iri = iri.strip()
    if set(iri) <= _URI_CHARS and not _LONE_PERCENT.search(iri):
        return iri
    try:
        parts = urlsplit(iri)
    except ValueError:
        return iri
    netloc = parts.netloc
    if not netloc.isascii():
        userinfo, at, hostport = netloc.rpartition("@")
        host, colon, port = (hostport, "", "") if hostport.startswith("[") else hostport.partition(":")
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            pass
        netloc = quote(userinfo, safe=URI_KEEP) + at + host + colon + port
    path, query, fragment = (quote(_LONE_PERCENT.sub("%25", x), safe=URI_KEEP)
                             for x in (parts.path, parts.query, parts.fragment))
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


class UnsafeURLError(urllib.error.URLError):
    def __init__(self, why: str):
        super().__init__(UNSAFE_PREFIX + why)

    def __str__(self) -> str:  # URLError's str is "<urlopen error ...>"; img2dataset records str(err)
        return str(self.reason)


class IncompleteBodyError(http.client.IncompleteRead):
    """The connection closed before the declared Content-Length (`declared`), or, chunked (`declared` None),
    before the last chunk. An IncompleteRead, so code that catches the standard error catches this one."""

    def __init__(self, received: int, declared: int | None = None):
        super().__init__(b"", None if declared is None else declared - received)  # IncompleteRead: bytes still due
        self.received, self.declared = received, declared

    def __str__(self) -> str:  # img2dataset records str(err) as the row's error
        if self.declared is None:
            return f"{INCOMPLETE_PREFIX}chunked body ended after {self.received} bytes, before its last chunk"
        return f"{INCOMPLETE_PREFIX}{self.received} of {self.declared} bytes"


@dataclass(frozen=True)
class UrlPolicy:
    allow_hosts: tuple[str, ...] = ()  # host names, IPs or CIDRs admitted although non-public
    max_bytes: int = 20 * 2**20
    max_seconds: float = 30.0

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> UrlPolicy:
        raw = json.loads(os.environ.get(POLICY_ENV, "{}"))
        raw["allow_hosts"] = tuple(raw.get("allow_hosts", ()))
        return cls(**raw)


@dataclass
class UrlGuard:
    policy: UrlPolicy
    _names: set[str] = field(init=False)
    _networks: list = field(init=False)

    def __post_init__(self):
        self._names, self._networks = set(), []
        for entry in self.policy.allow_hosts:
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self._names.add(entry.lower().rstrip("."))

    def static_reason(self, url: str) -> str | None:
        """Why `url` (a URI: see `iri_to_uri`) is refused without touching the network, or None."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 — raises ValueError on a malformed port
        except ValueError as err:
            return f"{UNSAFE_PREFIX}malformed URL ({err})"
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            return f"{UNSAFE_PREFIX}scheme {parts.scheme or '(none)'!r} is not http or https"
        if parts.username is not None or parts.password is not None:
            return f"{UNSAFE_PREFIX}credentials in URL"
        if not host:
            return f"{UNSAFE_PREFIX}no host"
        if not host.isascii():  # iri_to_uri encodes every valid internationalized name
            return f"{UNSAFE_PREFIX}malformed URL (host {host!r} is not a valid IDNA name)"
        if host in self._names:
            return None
        try:
            return self.address_reason(host, ipaddress.ip_address(host))
        except ValueError:  # a name, not a literal address: resolved in the worker, at connect time
            local = host == "localhost" or host.endswith(".localhost")
            return f"{UNSAFE_PREFIX}{host} is a local name" if local else None

    def address_reason(self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """Why connecting to `ip` (resolved from `host`) is refused, or None."""
        if host.lower().rstrip(".") in self._names:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if any(ip.version == net.version and ip in net for net in self._networks):
            return None
        if ip.is_global and not ip.is_multicast:
            return None
        kind = next(
            (k for k in ("loopback", "private", "link_local", "multicast", "reserved") if getattr(ip, f"is_{k}")),
            "non-public",
        )
        return f"{UNSAFE_PREFIX}{host} resolves to {kind} address {ip}"

    def connect(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None) -> socket.socket:
        """`socket.create_connection` that resolves once, vets every address and connects only to vetted ones."""
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise OSError(f"cannot resolve {host}: {err}") from None
        reasons = [self.address_reason(host, ipaddress.ip_address(info[4][0])) for info in infos]
        refused = next((r for r in reasons if r), None)
        if refused:  # one bad address taints the name: a round-robin answer must not reach the refused one
            raise UnsafeURLError(refused[len(UNSAFE_PREFIX) :])
        last_error: OSError | None = None
        for family, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                last_error = err
                sock.close()
        raise last_error or OSError(f"cannot connect to {host}")


class _CappedResponse(io.BufferedIOBase):
    """Wraps an HTTPResponse: `read()` stops past max_bytes or past max_seconds since the request started, and
    raises IncompleteBodyError on a body cut short."""

    def __init__(self, response: http.client.HTTPResponse, policy: UrlPolicy, started: float):
        self._response, self._policy, self._started = response, policy, started
        self._received = 0  # body bytes so far, over every read()

    def __getattr__(self, name):  # headers, status, code, url, getheader, info, geturl ...
        return getattr(self._response, name)

    def readable(self) -> bool:
        return True

    def read(self, amt: int | None = -1) -> bytes:
        limit = self._policy.max_bytes if amt is None or amt < 0 else min(amt, self._policy.max_bytes + 1)
        chunks, total = [], 0
        while total < limit:
            if time.monotonic() - self._started > self._policy.max_seconds:
                raise TimeoutError(f"response took longer than {self._policy.max_seconds:g} s")
            chunk = self._read1(min(65536, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > self._policy.max_bytes:
            raise ValueError(f"response body over {self._policy.max_bytes} bytes")
        return b"".join(chunks)

    def _read1(self, n: int) -> bytes:
        """HTTPResponse.read1, with a short body made an error. read1 ends a Content-Length body that the server
        cut short silently: it returns b"" and leaves `length` (the bytes still declared) above 0, where read()
        would raise IncompleteRead. A chunked body cut short raises a bare IncompleteRead(b'')."""
        try:
            chunk = self._response.read1(n)
        except http.client.IncompleteRead:
            raise IncompleteBodyError(self._received) from None
        self._received += len(chunk)
        if not chunk and self._response.length:  # None: chunked or read to close; 0: all of it arrived
            raise IncompleteBodyError(self._received, self._received + self._response.length)
        return chunk

    def close(self) -> None:
        self._response.close()
        super().close()


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: UrlGuard):
        super().__init__()
        self.guard = guard

    def _open(self, cls, req, **kwargs):
        def connection(host, **conn_kwargs):
            conn = cls(host, **conn_kwargs)
            conn._create_connection = self.guard.connect  # http.client's hook for opening the socket
            return conn

        req._lensforge_started = time.monotonic()
        try:
            return self.do_open(connection, req, **kwargs)
        except urllib.error.URLError as err:  # urllib wraps connect-time errors; keep the refusal itself
            if isinstance(err.reason, UnsafeURLError):
                raise err.reason from None
            raise

    def http_open(self, req):
        return self._open(http.client.HTTPConnection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: UrlGuard):
        super().__init__()
        self.guard = guard

    _open = _GuardedHTTPHandler._open

    def https_open(self, req):
        return self._open(http.client.HTTPSConnection, req, context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Checks every redirect target with the same policy before urllib follows it (or refuses it its own way)."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, guard: UrlGuard):
        self.guard = guard

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            newurl = urljoin(req.full_url, target)
            reason = self.guard.static_reason(newurl)
            if reason:
                fp.close()
                raise UnsafeURLError(f"redirect to {newurl}: {reason[len(UNSAFE_PREFIX):]}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _CapProcessor(urllib.request.BaseHandler):
    handler_order = 1100  # after HTTPErrorProcessor (1000): only successful responses get wrapped

    def __init__(self, policy: UrlPolicy):
        self.policy = policy

    def http_response(self, req, response):
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.policy.max_bytes:
            response.close()
            raise ValueError(f"response body of {length} bytes is over {self.policy.max_bytes}")
        return _CappedResponse(response, self.policy, getattr(req, "_lensforge_started", time.monotonic()))

    https_response = http_response


def guarded_opener(policy: UrlPolicy) -> urllib.request.OpenerDirector:
    """An opener with only guarded http(s), redirects, error processing and caps — nothing else."""
    guard = UrlGuard(policy)
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.UnknownHandler(),  # file://, ftp://, data: ... → "unknown url type"
        _GuardedHTTPHandler(guard),
        _GuardedHTTPSHandler(guard),
        urllib.request.HTTPDefaultErrorHandler(),
        _GuardedRedirectHandler(guard),
        urllib.request.HTTPErrorProcessor(),
        _CapProcessor(policy),
    ):
        opener.add_handler(handler)
    return opener


def install_guard(policy: UrlPolicy | None = None) -> None:
    """Make urllib's global opener the guarded one in this process (a Ray worker setup hook)."""
    urllib.request.install_opener(guarded_opener(policy or UrlPolicy.from_env()))
