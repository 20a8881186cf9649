"""The local captioning endpoint over real loopback HTTP, through the real `openai` client: captions at the
density the prompt asks for, usage by the tile rule, auth, every scripted fault as the client sees it, stats, the
Batch API round trip, and concurrency under injected latency. ~15 s.

    pytest tests/captioning/test_endpoint.py -q
"""

import asyncio
import base64
import io
import json
import math
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from captioning.endpoint import start_endpoint
from captioning.endpoint.describe_request import REFUSAL, style_for
from captioning.endpoint.faults import FaultInjector, Faults
from captioning.tokens import completion_tokens, image_tokens, text_tokens
from scenes import Obj, Scene, describe, render

KEY = "sk-endpoint-test-key"
SCENES = [
    Scene((Obj("circle", "red", "large", "top left"), Obj("star", "blue", "small", "center"),
           Obj("square", "yellow", "large", "bottom right")), background="white"),
    Scene((Obj("triangle", "green", "large", "middle left"), Obj("circle", "pink", "small", "top right")),
          background="gray"),
    Scene((Obj("star", "orange", "large", "bottom center"),), background="black"),
]


def data_url(image: Image.Image, fmt: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90) if fmt == "JPEG" else image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(url: str, instruction: str, detail: str = "auto", system: str = "You caption images.") -> list:
    return [{"role": "system", "content": system},
            {"role": "user", "content": [{"type": "text", "text": instruction},
                                         {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]


@pytest.fixture(scope="module")
def urls() -> list[str]:
    return [data_url(render(scene, 256)) for scene in SCENES]


@pytest.fixture(scope="module")
def ep_server():
    handle, base_url = start_endpoint(api_key=KEY, seed=0)
    yield handle, base_url
    handle.stop()


@pytest.fixture
def ep(ep_server):
    """(handle, base_url) with stats and faults reset."""
    ep_server[0].reset()
    return ep_server


@pytest.fixture
def client(ep) -> OpenAI:
    return OpenAI(base_url=ep[1], api_key=KEY, max_retries=0, timeout=10)


def ask(client: OpenAI, url: str, instruction: str, **kwargs):
    return client.chat.completions.create(model="gpt-4.1-mini", messages=messages(url, instruction), **kwargs)


def control(base_url: str, route: str, payload: dict | None = None) -> dict:
    """GET (payload None) or POST a /_lensforge route."""
    root = base_url.removesuffix("/v1")
    data = None if payload is None else json.dumps(payload).encode()
    with urllib.request.urlopen(urllib.request.Request(root + route, data=data), timeout=5) as response:
        return json.loads(response.read())


# --- captions and usage -------------------------------------------------------------------------------------------

def test_models_listed(client):
    assert {m.id for m in client.models.list()} == {"gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "lensforge-scenes"}


@pytest.mark.parametrize("index", range(len(SCENES)))
def test_dense_caption_mentions_every_object(client, urls, index):
    scene = SCENES[index]
    answer = ask(client, urls[index], "Describe this image in detail.")
    text = answer.choices[0].message.content
    assert text == describe(scene, "dense")
    for obj in scene.objects:
        assert f"{obj.color} {obj.shape}" in text
    assert scene.background in text
    assert answer.choices[0].finish_reason == "stop" and answer.model == "gpt-4.1-mini"


def test_density_follows_the_prompt(client, urls):
    scene = SCENES[0]
    short = ask(client, urls[0], "Describe this image in one sentence.").choices[0].message.content
    assert short == describe(scene, "short") and short.count(".") == 1 and short.endswith(".")
    fifteen = ask(client, urls[0], "Describe this image in about 15 words.").choices[0].message.content
    assert 0 < len(fifteen.split()) <= 15 and fifteen == describe(scene, "medium", max_words=15)
    tags = ask(client, urls[0], "List comma-separated tags.").choices[0].message.content
    assert tags == describe(scene, "tags")


def test_rules_first_match_wins():
    assert style_for("comma-separated tags, one sentence") == ("tags", None)
    assert style_for("One sentence of about 15 words") == ("short", None)
    assert style_for("a paragraph of about 100 words") == ("dense", 100)
    assert style_for("about 40 words") == ("medium", 40)
    assert style_for("whatever you like") == ("dense", None)


def test_json_mode_returns_every_variant(client, urls):
    system = ("Answer with a JSON object holding one caption per key:\n"
              "- dense: a detailed paragraph of about 100 words\n"
              "- short: one sentence naming the main subject\n")
    answer = client.chat.completions.create(model="gpt-4.1", response_format={"type": "json_object"},
                                            messages=messages(urls[1], "Caption this image.", system=system))
    variants = json.loads(answer.choices[0].message.content)
    assert variants == {"dense": describe(SCENES[1], "dense", max_words=100), "short": describe(SCENES[1], "short")}


@pytest.mark.parametrize(("size", "detail", "image"), [
    ((256, 256), "low", 85), ((256, 256), "high", 255), ((1024, 1024), "auto", 765), ((1024, 512), "high", 425),
])
def test_usage_follows_the_tile_rule(client, size, detail, image):
    url = data_url(render(SCENES[0], 256).resize(size), "PNG")
    instruction = "Describe this image in detail."
    answer = client.chat.completions.create(model="gpt-4.1-nano",
                                            messages=messages(url, instruction, detail, system="Be exact."))
    content = answer.choices[0].message.content
    assert image_tokens(*size, detail) == image
    assert answer.usage.prompt_tokens == text_tokens("Be exact." + instruction) + image
    assert answer.usage.completion_tokens == math.ceil(len(content.split()) * 1.33) == completion_tokens(content)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_tile_rule_matches_openai_examples():
    assert image_tokens(4096, 8192, "low") == 85
    assert image_tokens(1024, 1024, "high") == 765  # scaled to 768², 4 tiles
    assert image_tokens(2048, 4096, "high") == 1105  # fit 1024×2048, then 768×1536: 6 tiles
    assert image_tokens(100, 100, "high") == 255  # never scaled up: one tile


def test_max_tokens_truncates_with_finish_reason_length(client, urls):
    answer = ask(client, urls[0], "Describe this image in detail.", max_tokens=10)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens <= 10
    assert describe(SCENES[0], "dense").startswith(answer.choices[0].message.content)


def test_images_that_are_not_scenes_still_get_a_caption(client):
    noise = Image.effect_noise((96, 96), 60).convert("RGB")
    assert ask(client, data_url(noise), "Describe it.").choices[0].message.content
    tiny = ask(client, data_url(Image.new("RGB", (4, 4), "white"), "PNG"), "Describe it.")
    assert tiny.choices[0].message.content == describe(Scene(), "dense")


# --- errors and faults --------------------------------------------------------------------------------------------

def test_errors_are_openai_shaped(ep, client, urls):
    with pytest.raises(openai.AuthenticationError) as err:
        ask(OpenAI(base_url=ep[1], api_key="wrong", max_retries=0), urls[0], "x")
    assert err.value.code == "invalid_api_key" and KEY not in str(err.value.body)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=messages(urls[0], "x"))
    assert err.value.code == "model_not_found" and "The model `gpt-9` does not exist" in err.value.message
    with pytest.raises(openai.BadRequestError, match="only data URLs are supported"):
        ask(client, "http://127.0.0.1/x.jpg", "x")
    with pytest.raises(openai.BadRequestError, match="could not decode"):
        ask(client, "data:image/jpeg;base64," + base64.b64encode(b"not an image").decode(), "x")
    assert ep[0].stats()["by_outcome"] == {"401": 1, "404": 1, "400": 2}


SCRIPTED = {
    "429": openai.RateLimitError,
    "500": openai.InternalServerError,
    "401": openai.AuthenticationError,
    "timeout": openai.APITimeoutError,
    "malformed": (openai.APIResponseValidationError, json.JSONDecodeError),
}


@pytest.mark.parametrize("outcome", list(SCRIPTED))
def test_scripted_error_faults(ep, urls, outcome):
    handle, base_url = ep
    handle.set_faults(script=[outcome, "ok"], retry_after_s=2, timeout_sleep_s=3)
    client = OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=0.5 if outcome == "timeout" else 10)
    with pytest.raises(SCRIPTED[outcome]) as err:
        ask(client, urls[0], "Describe this image in detail.")
    if outcome == "429":
        assert err.value.response.headers["retry-after"] == "2" and err.value.code == "rate_limit_exceeded"
    deadline = time.monotonic() + 3
    while handle.stats()["in_flight"] and time.monotonic() < deadline:  # a timed-out request is cancelled
        time.sleep(0.02)
    assert handle.stats()["in_flight"] == 0
    assert ask(client, urls[0], "Describe this image in detail.").choices[0].message.content  # the script moved on
    assert handle.stats()["by_outcome"] == {outcome: 1, "ok": 1}


@pytest.mark.parametrize(("outcome", "finish_reason"), [("refusal", "stop"), ("truncate", "length"),
                                                        ("empty", "stop")])
def test_scripted_content_faults(ep, client, urls, outcome, finish_reason):
    ep[0].set_faults(script=[outcome])
    choice = ask(client, urls[0], "Describe this image in detail.").choices[0]
    content, full = choice.message.content, describe(SCENES[0], "dense")
    assert choice.finish_reason == finish_reason
    if outcome == "refusal":
        assert content == REFUSAL
    elif outcome == "truncate":
        assert content and full.startswith(content) and len(content) < len(full) and not content.endswith(".")
    else:
        assert content == ""


def test_client_retries_through_scripted_429s(ep, urls):
    ep[0].set_faults(script=["429", "429", "ok"], retry_after_s=0.05)
    client = OpenAI(base_url=ep[1], api_key=KEY, max_retries=2)
    assert ask(client, urls[0], "one sentence").choices[0].message.content == describe(SCENES[0], "short")
    assert ep[0].stats()["by_outcome"] == {"429": 2, "ok": 1} and ep[0].stats()["answered"] == 1  # 429s bill nothing


def test_fault_routes_and_seeded_rates(ep):
    base_url = ep[1]
    active = control(base_url, "/_lensforge/faults", {"rate_500": 0.5, "seed": 3, "script": ["empty"]})
    assert active["rate_500"] == 0.5 and active["script"] == ["empty"] and active["latency_s"] == 0
    with pytest.raises(urllib.error.HTTPError) as err:
        control(base_url, "/_lensforge/faults", {"rate_429": 0.9})  # rates would add up to 1.4
    assert err.value.code == 400
    control(base_url, "/_lensforge/reset", {})
    assert control(base_url, "/_lensforge/faults") == Faults(seed=0).model_dump()
    draws = [FaultInjector(Faults(rate_500=0.3, rate_refusal=0.2, seed=7)) for _ in range(2)]
    first, second = ([d.next_outcome() for _ in range(50)] for d in draws)
    assert first == second and {"ok", "500", "refusal"} == set(first)


def test_stats_count_requests_by_key(ep, client, urls):
    for key in ("k1", "k1", "k2"):
        ask(client, urls[0], "one sentence", extra_headers={"X-Lensforge-Key": key})
    ask(client, urls[0], "one sentence")
    stats = control(ep[1], "/_lensforge/stats")
    assert stats["requests"] == 4 and stats["by_key"] == {"k1": 2, "k2": 1} and stats["by_outcome"] == {"ok": 4}
    assert stats["answered"] == 4 and stats["answered_by_key"] == {"k1": 2, "k2": 1}  # 200s: what would be billed


# --- Batch API ----------------------------------------------------------------------------------------------------

def batch_input(urls: list[str], n: int) -> bytes:
    lines = [{"custom_id": f"key-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4.1-mini", "messages": messages(urls[i % len(urls)], "one sentence")}}
             for i in range(n)]
    lines[1]["body"]["model"] = "no-such-model"  # always fails: a 404 in the error file
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def run_batch(client: OpenAI, data: bytes, deadline_s: float = 15.0):
    uploaded = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data) and uploaded.purpose == "batch"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "test"})
    assert batch.status == "validating" and batch.metadata == {"run": "test"}
    deadline = time.monotonic() + deadline_s
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    return batch


def read_jsonl(client: OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


def test_batch_round_trip_with_failed_lines(ep, client, urls):
    ep[0].set_faults(batch_fail_rate=0.3)
    batch = run_batch(client, batch_input(urls, 12))
    assert batch.status == "completed"
    outputs, errors = read_jsonl(client, batch.output_file_id), read_jsonl(client, batch.error_file_id)
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (12, len(outputs), len(errors))
    assert len(errors) >= 2 and len(outputs) + len(errors) == 12  # key-1 plus the drawn failures
    assert {r["custom_id"] for r in outputs + errors} == {f"key-{i}" for i in range(12)}
    for record in outputs:
        i = int(record["custom_id"].split("-")[1])
        assert record["response"]["status_code"] == 200 and record["error"] is None
        assert record["response"]["body"]["choices"][0]["message"]["content"] == describe(SCENES[i % 3], "short")
    statuses = {r["custom_id"]: r["response"]["status_code"] for r in errors}
    assert statuses.pop("key-1") == 404 and set(statuses.values()) == {500}
    assert all("error" in r["response"]["body"] for r in errors)
    assert batch.id in [b.id for b in client.batches.list()]
    assert client.files.delete(batch.output_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.output_file_id)


def test_expired_batch_has_output_for_the_processed_part(ep, client, urls):
    ep[0].set_faults(batch_status="expired")
    batch = run_batch(client, batch_input(urls, 6))
    assert batch.status == "expired" and batch.expired_at
    outputs, errors = read_jsonl(client, batch.output_file_id), read_jsonl(client, batch.error_file_id)
    assert [r["custom_id"] for r in outputs] == ["key-0", "key-2"]
    expired = [r["custom_id"] for r in errors if r["error"] and r["error"]["code"] == "batch_expired"]
    assert expired == ["key-3", "key-4", "key-5"]


def test_batch_cancel_and_invalid_input(ep, client, urls):
    ep[0].set_faults(batch_delay_s=5)
    uploaded = client.files.create(file=("in.jsonl", batch_input(urls, 4)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert client.batches.cancel(batch.id).status == "cancelling"
    ep[0].set_faults(batch_delay_s=0)
    bad = run_batch(client, b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n')
    assert bad.status == "failed" and bad.errors.data[0].code == "invalid_url" and bad.errors.data[0].line == 1
    deadline = time.monotonic() + 8
    while (batch := client.batches.retrieve(batch.id)).status != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batch.status == "cancelled" and batch.output_file_id is None


def test_files_and_batches_survive_a_restart(client, urls, tmp_path):
    handle, base_url = start_endpoint(api_key=KEY, state_dir=tmp_path)
    with handle:
        first = OpenAI(base_url=base_url, api_key=KEY, max_retries=0)
        batch = run_batch(first, batch_input(urls, 3))
    handle, base_url = start_endpoint(api_key=KEY, state_dir=tmp_path)
    with handle:
        again = OpenAI(base_url=base_url, api_key=KEY, max_retries=0)
        assert again.batches.retrieve(batch.id).status == "completed"
        assert len(read_jsonl(again, batch.output_file_id)) == 2


# --- concurrency and the CLI ---------------------------------------------------------------------------------------

def test_many_requests_in_flight_overlap(ep, urls):
    handle, base_url = ep
    handle.set_faults(latency_s=0.2)

    async def main() -> float:
        async with AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0,
                               http_client=openai.DefaultAioHttpClient()) as client:
            start = time.perf_counter()
            answers = await asyncio.gather(*(client.chat.completions.create(
                model="gpt-4.1-mini", messages=messages(urls[i % 3], "one sentence")) for i in range(64)))
            assert all(a.choices[0].message.content for a in answers)
            return time.perf_counter() - start

    elapsed = asyncio.run(main())
    assert elapsed < 64 * 0.2 / 4, f"64 requests at 200 ms took {elapsed:.1f} s: they did not overlap"
    assert handle.stats()["in_flight_max"] >= 32


def test_cli_flags_become_start_options(urls):
    import argparse

    from pipelines.commands import serve_captioner

    parser = argparse.ArgumentParser()
    serve_captioner.add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--api-key", "k", "--models", "m1,m2", "--script", "refusal,ok",
                              "--latency-s", "0.01", "--seed", "2"])
    handle, base_url = start_endpoint(args.host, args.port, **serve_captioner.options(args))
    with handle:
        client = OpenAI(base_url=base_url, api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["m1", "m2"]
        answer = client.chat.completions.create(model="m2", messages=messages(urls[0], "x"))
        assert answer.choices[0].message.content == REFUSAL
    bad = parser.parse_args(["--rate-429", "0.8", "--rate-500", "0.5"])
    with pytest.raises(ValueError, match="add up to"):
        serve_captioner.run(bad)


def test_rich_world_endpoint_describes_rich_scenes():
    import argparse

    from captioning.endpoint.batches import answer_line
    from pipelines.commands import serve_captioner

    scene = Scene((Obj("circle", "red", "large", "top left", "hollow"), Obj("star", "blue", "small", "center")),
                  background="gray", word="MOON", frame="yellow", word_at="bottom right", world="rich")
    url = data_url(render(scene, 256))
    parser = argparse.ArgumentParser()
    serve_captioner.add_arguments(parser)
    assert serve_captioner.options(parser.parse_args([]))["world"] == "basic"
    handle, base_url = start_endpoint(**serve_captioner.options(parser.parse_args(["--world", "rich"])))
    with handle:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        dense = ask(client, url, "Describe the image in detail.").choices[0].message.content
        assert dense == describe(scene, "dense") and 80 <= len(dense.split()) <= 120
        assert ask(client, url, "Caption it in one sentence.").choices[0].message.content == describe(scene, "short")
    body = {"model": "gpt-4.1-mini", "messages": messages(url, "comma-separated tags")}
    ok, record = answer_line("line-1", body, frozenset({"gpt-4.1-mini"}), False, "rich")
    assert ok and record["response"]["body"]["choices"][0]["message"]["content"] == describe(scene, "tags")
    with pytest.raises(ValueError, match="unknown scene world"):
        start_endpoint(world="fancy")
