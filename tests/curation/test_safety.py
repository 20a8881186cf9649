"""The URL guard: static refusals, refusals at connect time and behind redirects, and response caps —
over real loopback HTTP through the same urllib opener img2dataset uses in the workers."""

import json
import time
import urllib.request

import pytest

from curation.safety import UNSAFE_PREFIX, UnsafeURLError, UrlGuard, UrlPolicy, guarded_opener, iri_to_uri
from scenes.serve import start_server

ONLY_127_0_0_1 = UrlPolicy(allow_hosts=("127.0.0.1",))


@pytest.mark.parametrize(
    "url, refused",
    [
        ("http://127.0.0.1:8000/a.jpg", False),
        ("https://93.184.216.34/a.jpg", False),  # a public literal address is fine (nothing connects here)
        ("http://example.com/a.jpg", False),  # names are resolved at connect time, in the worker
        ("http://127.0.0.2:8000/a.jpg", True),
        ("http://[::1]:8000/a.jpg", True),
        ("http://[::ffff:127.0.0.2]/a.jpg", True),
        ("http://10.1.2.3/a.jpg", True),
        ("http://169.254.169.254/latest/meta-data", True),
        ("http://224.0.0.1/a.jpg", True),
        ("http://localhost:8000/a.jpg", True),
        ("file:///etc/passwd", True),
        ("ftp://127.0.0.1/a.jpg", True),
        ("http://user:secret@127.0.0.1/a.jpg", True),
        ("http://user@127.0.0.1/a.jpg", True),
        ("not a url", True),
        ("http://127.0.0.1:99999/a.jpg", True),
    ],
)
def test_static_reason(url, refused):
    reason = UrlGuard(ONLY_127_0_0_1).static_reason(url)
    assert (reason is not None) == refused, reason
    if refused:
        assert reason.startswith(UNSAFE_PREFIX)


@pytest.mark.parametrize(
    "iri, uri",
    [
        ("http://127.0.0.1:8000/画像.jpg", "http://127.0.0.1:8000/%E7%94%BB%E5%83%8F.jpg"),  # UTF-8, RFC 3987 §3.1
        ("http://127.0.0.1/a b.jpg", "http://127.0.0.1/a%20b.jpg"),
        (" http://h/a.jpg\n", "http://h/a.jpg"),  # white space around a URL is not part of it
        ("http://h/ü?q=猫 x#ß", "http://h/%C3%BC?q=%E7%8C%AB%20x#%C3%9F"),  # query and fragment too
        ("http://h/%E7%94%BB/画", "http://h/%E7%94%BB/%E7%94%BB"),  # escapes already there stay as they are
        ("http://h/100%/画", "http://h/100%25/%E7%94%BB"),  # a "%" that starts no escape is encoded
        ("http://h/a\"<>{}|^`b", "http://h/a%22%3C%3E%7B%7D%7C%5E%60b"),  # ASCII a URI cannot hold
        ("http://例え.jp/画", "http://xn--r8jz45g.jp/%E7%94%BB"),  # IDNA host
        ("http://faß.de:8080/", "http://xn--fa-hia.de:8080/"),  # UTS #46 as browsers (IDNA 2003 said fass.de)
        ("http://ü@例え.jp/", "http://%C3%BC@xn--r8jz45g.jp/"),
        ("http://１２７.０.０.１/x", "http://127.0.0.1/x"),  # full-width digits are the address they map to
        ("http://ｌｏｃａｌｈｏｓｔ/x", "http://localhost/x"),
        ("http://☃.net/画", "http://☃.net/%E7%94%BB"),  # a host IDNA refuses stays, for the guard to refuse
        # URIs come back unchanged, reserved characters, case, dot segments and default ports included
        ("http://H/a/../b;p?x=1+2&y=%2b#f", "http://H/a/../b;p?x=1+2&y=%2b#f"),
        ("http://[::1]:80/x?", "http://[::1]:80/x?"),
        ("http://h/%41%2F", "http://h/%41%2F"),
    ],
)
def test_iri_to_uri(iri, uri):
    assert iri_to_uri(iri) == uri
    assert iri_to_uri(uri) == uri  # idempotent


@pytest.mark.parametrize("iri, refused", [
    ("http://127.0.0.1/画像.jpg", None),
    ("http://１２７.０.０.１/画像.jpg", None),  # allowed: it is 127.0.0.1
    ("http://１２７.０.０.２/x", "127.0.0.2 resolves to loopback"),
    ("http://ｌｏｃａｌｈｏｓｔ/x", "localhost is a local name"),
    ("http://☃.net/x", "not a valid IDNA name"),
    ("http://a：b/x", "malformed URL"),  # a full-width colon: urllib refuses the netloc
])
def test_the_guard_vets_the_uri_that_is_fetched(iri, refused):
    """The guard must see the host that will be connected to: a full-width `localhost` is `localhost`."""
    reason = UrlGuard(ONLY_127_0_0_1).static_reason(iri_to_uri(iri))
    assert (reason is None) if refused is None else (refused in reason), reason
    if refused:
        assert UrlGuard(ONLY_127_0_0_1).static_reason(iri) is not None  # refused as given, too


def test_allow_list_takes_cidrs_and_names():
    guard = UrlGuard(UrlPolicy(allow_hosts=("127.0.0.0/8", "localhost")))
    assert guard.static_reason("http://127.0.0.2/a.jpg") is None
    assert guard.static_reason("http://localhost/a.jpg") is None
    assert guard.static_reason("http://10.0.0.1/a.jpg") is not None


@pytest.fixture()
def servers(tmp_path):
    """A: 127.0.0.1 (allowed), serving a file and redirects. B: 127.0.0.2 (refused), serving a 'secret'."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    (b_dir / "secret.txt").write_text("secret")
    b_server, b_url = start_server(b_dir, host="127.0.0.2", port=0)
    (a_dir / "ok.txt").write_text("hello")
    (a_dir / "big.bin").write_bytes(b"x" * 5000)
    (a_dir / "slow.bin").write_bytes(b"y" * 20)
    (a_dir / "_serve.json").write_text(json.dumps({
        "/to_b": {"redirect": f"{b_url}/secret.txt"},
        "/to_file": {"redirect": "file:///etc/passwd"},
        "/to_localhost": {"redirect": f"http://localhost:{b_url.rsplit(':', 1)[1]}/secret.txt"},
        "/slow.bin": {"dribble_bytes_per_s": 4},
    }))
    a_server, a_url = start_server(a_dir, host="127.0.0.1", port=0)
    yield a_url, b_url
    a_server.shutdown(), b_server.shutdown()


def test_opener_admits_the_allowed_host(servers):
    a_url, _ = servers
    with guarded_opener(ONLY_127_0_0_1).open(f"{a_url}/ok.txt", timeout=5) as r:
        assert r.read() == b"hello"


def test_b_is_reachable_without_the_guard(servers):
    """The refusals below mean something only if B answers an unguarded client."""
    _, b_url = servers
    with urllib.request.build_opener().open(f"{b_url}/secret.txt", timeout=5) as r:
        assert r.read() == b"secret"


@pytest.mark.parametrize("path", ["to_b", "to_file", "to_localhost"])
def test_redirects_to_refused_targets_are_refused(servers, path):
    a_url, _ = servers
    with pytest.raises(UnsafeURLError, match="unsafe url: redirect to"):
        guarded_opener(ONLY_127_0_0_1).open(f"{a_url}/{path}", timeout=5)


def test_direct_request_to_refused_address_never_connects(servers):
    _, b_url = servers
    with pytest.raises(UnsafeURLError, match="127.0.0.2 resolves to loopback"):
        guarded_opener(ONLY_127_0_0_1).open(f"{b_url}/secret.txt", timeout=5)


@pytest.mark.parametrize("scheme_url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:text/plain,hi"])
def test_opener_has_no_other_schemes(scheme_url):
    with pytest.raises(urllib.error.URLError, match="unknown url type"):
        guarded_opener(ONLY_127_0_0_1).open(scheme_url, timeout=5)


def test_body_size_cap(servers):
    a_url, _ = servers
    policy = UrlPolicy(allow_hosts=("127.0.0.1",), max_bytes=1000)
    with pytest.raises(ValueError, match="over 1000"):
        with guarded_opener(policy).open(f"{a_url}/big.bin", timeout=5) as r:
            r.read()


def test_dribbling_server_hits_the_time_cap(servers):
    a_url, _ = servers
    policy = UrlPolicy(allow_hosts=("127.0.0.1",), max_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="longer than 1 s"):
        with guarded_opener(policy).open(f"{a_url}/slow.bin", timeout=5) as r:
            r.read()
    assert time.monotonic() - started < 4  # 20 bytes at 4 B/s would take 5 s
