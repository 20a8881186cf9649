"""The online client against the local endpoint, over real loopback HTTP through the real openai client: 429 with
Retry-After, 5xx and timeouts, malformed bodies, refusals and truncation, fatal 401/404."""

import asyncio
import time

import openai
import pytest

from captioning.client import (AuthError, ModelNotFound, NotSent, RateController, Sender, make_client,
                               resolve_api_key)
from captioning.config import CaptionConfig
from captioning.pipeline import caption
from captioning.schema import read_captions



def image_body(cfg: CaptionConfig, data) -> dict:
    from captioning.images import load_images
    from captioning.pipeline import pending_work
    from captioning.presets import PRESETS
    from captioning.request import build_request

    item = pending_work(data, {"short": PRESETS["short"]}, cfg.model)[0]
    image = load_images(data, [item], cfg)[item["key"]]
    return build_request(item["key"], image.data_url, ["short"], PRESETS, cfg)[0]


def send_all(cfg: CaptionConfig, body: dict, keys: list[str], stagger_s: float = 0.0):
    """Send `body` once per key (staggered starts) through one Sender; (answers, seconds each took from t0)."""
    async def main():
        client = make_client(cfg, resolve_api_key(cfg))
        sender = Sender(client, cfg, client.api_key)
        t0 = time.monotonic()

        async def one(i, key):
            await asyncio.sleep(i * stagger_s)
            answer = await sender.send(body, key)
            return answer, time.monotonic() - t0
        async with client:
            done = await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
        return [a for a, _ in done], [t for _, t in done], sender
    return asyncio.run(main())


def test_429_retry_after_pauses_every_request_then_recovers(cap_endpoint, cap_data):
    handle, base_url = cap_endpoint
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini", concurrency=8)
    body = image_body(cfg, cap_data)
    handle.set_faults(script=["429"], retry_after_s=1)
    answers, times, sender = send_all(cfg, body, ["a", "b"], stagger_s=0.2)
    assert all(a.body is not None for a in answers)
    assert answers[0].attempts == 2 and times[0] >= 1.0  # waited Retry-After before asking again
    # b started during the pause: it was held back (sent once, after the pause), not sent into the 429 storm
    assert answers[1].attempts == 1 and times[1] >= 1.0
    assert handle.stats()["by_key"] == {"a": 2, "b": 1}
    assert sender.rate.limit < 8 and sender.counts["429"] == 1


def test_aimd_halves_once_per_burst_and_grows_back():
    rate = RateController(8)
    rate.on_rate_limit(0.5)
    rate.on_rate_limit(0.5)  # the same burst: in-flight requests that also met the 429
    assert rate.limit == 4
    for _ in range(4):
        rate.on_success()
    assert 4.9 < rate.limit < 5.1  # +1 per window of `limit` successes
    for _ in range(1000):
        rate.on_success()
    assert rate.limit == 8


def test_5xx_and_timeouts_retried_with_backoff(cap_endpoint, cap_data):
    handle, base_url = cap_endpoint
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini", timeout_s=0.5, backoff_s=0.05, max_attempts=6)
    body = image_body(cfg, cap_data)
    handle.set_faults(script=["500", "timeout", "500"], timeout_sleep_s=3)
    (answer,), _, sender = send_all(cfg, body, ["k"])
    assert answer.body is not None and answer.attempts == 4
    assert sender.counts["5xx"] == 2 and sender.counts["timeout"] == 1
    handle.set_faults(script=["500"] * 3)
    cfg3 = cfg.model_copy(update={"max_attempts": 3})
    (answer,), _, _ = send_all(cfg3, body, ["k2"])
    assert answer.body is None and answer.error.startswith("gave up after 3 attempts: 500")


def test_stop_sends_nothing_more_and_cuts_backoffs_short(cap_endpoint, cap_data):
    handle, base_url = cap_endpoint
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini")
    body = image_body(cfg, cap_data)
    handle.set_faults(script=["500"])

    async def main():
        client = make_client(cfg, resolve_api_key(cfg))
        async with client:
            sender = Sender(client, cfg)
            sender.backoff = lambda attempt: 30.0  # not the jittered draw, which may be ~0
            retrying = asyncio.create_task(sender.send(body, "k1"))
            while not handle.stats()["requests"]:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the 500 came back: now in a backoff of up to 30 s
            started = time.monotonic()
            sender.stop()
            answer = await retrying
            with pytest.raises(NotSent):
                await sender.send(body, "k2")
            return answer, time.monotonic() - started

    answer, waited = asyncio.run(main())
    assert answer.body is None and answer.error.startswith("stopped before retrying: 500") and waited < 1
    assert handle.stats()["requests"] == 1  # neither the retry nor the new request went out


def test_401_and_unknown_model_are_fatal_with_a_clear_message(cap_endpoint, cap_data, monkeypatch, cap_secret):
    handle, base_url = cap_endpoint
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini")
    body = image_body(cfg, cap_data)
    handle.set_faults(script=["401"])
    with pytest.raises(AuthError, match="401") as err:
        send_all(cfg, body, ["k"])
    assert cap_secret not in str(err.value)
    with pytest.raises(ModelNotFound, match="no-such-model"):
        send_all(cfg.model_copy(update={"model": "no-such-model"}), {**body, "model": "no-such-model"}, ["k"])
    # the whole job stops at once: a wrong key ends the run after the requests already in flight
    handle.reset()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(AuthError):
        caption(cap_data, cfg.model_copy(update={"concurrency": 2}))
    assert handle.stats()["requests"] <= 3


def test_bad_answers_become_rows_and_are_asked_again(cap_endpoint, cap_data, kept_keys):
    handle, base_url = cap_endpoint
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini", concurrency=1, retry_failed_checks=0)
    handle.set_faults(script=["malformed", "refusal", "truncate", "empty"])
    stats = caption(cap_data, cfg)
    rows = read_captions(cap_data).to_pandas().sort_values("created_at")
    first = rows.head(4)
    assert list(first["status"]) == ["error", "refused", "error", "error"]
    assert first["error"].iloc[0].startswith("malformed") and first["error"].iloc[2].startswith("truncated")
    assert first["error"].iloc[3].startswith("empty") and first["cost_usd"].iloc[1] > 0  # refusals are billed
    assert stats["outcomes"][("dense", "ok")] == len(kept_keys) - 4
    handle.reset()
    caption(cap_data, cfg)  # the rerun asks again for exactly the four that failed
    assert sorted(k for k, n in handle.stats()["by_key"].items() for _ in range(n)) == sorted(first["key"])
    ok = read_captions(cap_data).to_pandas().query("status == 'ok'")
    assert sorted(ok["key"]) == kept_keys


def test_failed_checks_retried_in_the_same_run(cap_endpoint, cap_data, kept_keys):
    handle, base_url = cap_endpoint
    cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini", concurrency=1, retry_failed_checks=1)
    handle.set_faults(script=["refusal", "ok", "truncate"])  # the re-ask comes right after the bad answer
    stats = caption(cap_data, cfg)
    assert stats["outcomes"] == {("dense", "ok"): len(kept_keys)} and stats["requests"] == len(kept_keys) + 2


def test_api_key_resolution(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_api_key(CaptionConfig(base_url="http://127.0.0.1:9/v1")) == "sk-local"
    assert resolve_api_key(CaptionConfig(base_url="http://localhost:9/v1")) == "sk-local"
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        resolve_api_key(CaptionConfig(base_url="https://api.example.com/v1"))
    monkeypatch.setenv("MY_KEY", "sk-x")
    assert resolve_api_key(CaptionConfig(api_key_env="MY_KEY")) == "sk-x"
    azure = CaptionConfig(azure={"endpoint": "https://r.openai.azure.com", "deployment": "gpt41"})
    assert isinstance(make_client(azure, "k"), openai.AsyncAzureOpenAI)
