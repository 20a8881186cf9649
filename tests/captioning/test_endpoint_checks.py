"""An endpoint that cannot answer fails `lensforge caption` at once, in one line, with exit code 2 and nothing
written: a base URL that is no URL (config.check_base_url), a closed port and a wrong path (client.probe_endpoint).
Servers without GET /models still pass the probe; a refused connection during a run is no timeout."""

import asyncio
import socket
import time

import pytest
from aiohttp import web

from captioning.client import AuthError, Sender, make_client, probe_endpoint, resolve_api_key
from captioning.config import CaptionConfig
from captioning.endpoint.server import EndpointHandle
from pipelines import cli


def caption_cli(data, base_url, *extra) -> int:
    return cli.main(["caption", "--data", str(data), "--base-url", base_url, "--model", "gpt-4.1-mini", *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("lensforge: error: ")
    return err[0]


def assert_nothing_written(data) -> None:
    assert not list(data.glob("captions/part-*"))
    assert not (data / "config.caption.yaml").exists()


@pytest.fixture
def closed_url() -> str:
    """A loopback port nobody listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("url, why", [
    ("htp://127.0.0.1:8001/v1", "scheme must be http:// or https:// (not 'htp')"),
    ("127.0.0.1:8001/v1", "scheme must be http:// or https:// (none given: http://127.0.0.1:8001/v1?)"),
    ("localhost:8001/v1", "scheme must be http:// or https:// (none given"),
    ("ftp://127.0.0.1/v1", "(not 'ftp')"),
    ("http://127.0.0.1:186311/v1", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:0/v1", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:80a/v1", "port must be a number from 1 to 65535"),
    ("http://:8001/v1", "no host"),
    ("http://127.0.0.1 :8001/v1", "contains white space"),
])
def test_a_base_url_that_is_no_url_is_one_line_before_any_request(url, why, cap_data, capsys):
    started = time.monotonic()
    assert caption_cli(cap_data, url) == 2
    line = one_error_line(capsys)
    assert f"base URL {url!r}" in line and why in line, line
    assert time.monotonic() - started < 5
    assert_nothing_written(cap_data)


def test_valid_base_urls_pass():
    for url in ("http://127.0.0.1:8001/v1", "https://api.openai.com/v1", "http://[::1]:65535/v1", "http://vllm"):
        assert CaptionConfig(base_url=url).base_url == url
    with pytest.raises(ValueError, match="no host"):
        CaptionConfig(azure={"endpoint": "https://", "deployment": "d"})


@pytest.mark.parametrize("batch", [False, True])
def test_a_closed_port_fails_fast_in_one_line_writing_nothing(batch, closed_url, cap_data, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    started = time.monotonic()
    assert caption_cli(cap_data, closed_url, *(["--batch-api"] if batch else [])) == 2
    assert time.monotonic() - started < 5  # not ~80 s of retries
    line = one_error_line(capsys)
    assert line == f"lensforge: error: caption: cannot connect to {closed_url} (connection refused)"
    assert_nothing_written(cap_data)


def test_the_dry_run_contacts_no_endpoint(closed_url, cap_data, capsys):
    assert caption_cli(cap_data, closed_url, "--dry-run") == 0
    assert "nothing was sent" in capsys.readouterr().out


@pytest.mark.parametrize("batch, route", [(False, "chat/completions"), (True, "batches")])
def test_a_wrong_path_names_the_404_and_the_urls(batch, route, cap_endpoint, cap_data, capsys):
    handle, base_url = cap_endpoint
    root = base_url.removesuffix("/v1")
    assert caption_cli(cap_data, root, *(["--batch-api"] if batch else [])) == 2
    line = one_error_line(capsys)
    assert f"404 at {root}/models and at {root}/{route}: is --base-url missing /v1 ({root}/v1)?" in line, line
    assert "model" not in line.split("404")[0]  # not "model not found"
    assert handle.stats()["requests"] == 0
    assert_nothing_written(cap_data)


def test_a_rejected_key_is_named(cap_endpoint, monkeypatch):
    _, base_url = cap_endpoint
    with pytest.raises(AuthError, match=r"^401 from .*: the API key was rejected"):
        probe_endpoint(CaptionConfig(base_url=base_url, model="gpt-4.1-mini"), api_key="sk-wrong")


def serve(routes: list[web.RouteDef]) -> EndpointHandle:
    app = web.Application()
    app.add_routes(routes)
    return EndpointHandle(app, "127.0.0.1", 0)


async def reject(request: web.Request) -> web.Response:  # what a live route says to the probe's empty body
    return web.json_response({"error": {"message": "model is required"}}, status=400)


async def no_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": []})


@pytest.mark.parametrize("routes", [[web.post("/v1/chat/completions", reject)],  # no GET /models
                                    [web.get("/v1/models", no_models)]])
def test_a_server_without_models_or_with_only_models_passes_the_probe(routes):
    with serve(routes) as server:
        probe_endpoint(CaptionConfig(base_url=server.base_url, model="m"), api_key="sk-local")
    with serve([web.get("/v1/models", reject)]) as server:  # a 400 is an answer: the server is there
        probe_endpoint(CaptionConfig(base_url=server.base_url, model="m"), api_key="sk-local")


def test_a_refused_connection_during_a_run_is_a_connection_error_not_a_timeout(closed_url):
    cfg = CaptionConfig(base_url=closed_url, model="gpt-4.1-mini", max_attempts=2, backoff_s=0.01)

    async def main():
        client = make_client(cfg, resolve_api_key(cfg))
        async with client:
            sender = Sender(client, cfg)
            return await sender.send({"model": cfg.model, "messages": []}, "k"), sender

    answer, sender = asyncio.run(main())
    assert answer.error == "gave up after 2 attempts: connection error: connection refused"
    assert sender.counts["connection"] == 2 and sender.counts["timeout"] == 0
