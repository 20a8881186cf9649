"""Response checks: ok / refused / error with the reason."""

import pytest

from captioning.checks import check_caption, looks_english
from captioning.config import CaptionConfig
from captioning.presets import PRESETS
from captioning.request import parse_response

DENSE = PRESETS["dense"]
GOOD = ("A large red circle sits in the center of a plain white background, with a small blue square to its "
        "upper left and a green triangle in the bottom right corner.")


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I cannot describe this image.",
    "As an AI, I am unable to view images.",
    "Sorry, I can't assist with that request.",
    "  I apologize, but I can't identify people.",
])
def test_refusals(text):
    status, reason = check_caption(text, "stop", DENSE)
    assert status == "refused" and reason.startswith("refusal")


def test_quoted_refusal_words_inside_a_caption_are_fine():
    text = GOOD + ' A sign reads "I cannot wait".'
    assert check_caption(text, "stop", DENSE) == ("ok", None)


def test_each_failure_has_its_reason():
    assert check_caption("", "stop", DENSE)[1].startswith("empty")
    assert check_caption(None, "stop", DENSE)[0] == "error"
    assert check_caption(GOOD, "length", DENSE)[1].startswith("truncated")
    assert check_caption("A red circle.", "stop", DENSE)[1].startswith("too short")
    assert check_caption(" ".join(["the word"] * 150), "stop", DENSE)[1].startswith("too long")
    assert check_caption(GOOD, "stop", DENSE, word_ranges={"dense": (80, 200)})[1].startswith("too short")
    assert check_caption("x", "stop", DENSE, refusal="I can't")[0] == "refused"
    assert check_caption(GOOD, "content_filter", DENSE)[0] == "refused"


def test_language_heuristic():
    german = "Ein großer roter Kreis liegt mittig auf weißem Grund, daneben ein blaues Quadrat und ein Dreieck."
    chinese = "一个红色的圆形位于白色背景的中央，左上方有一个蓝色的正方形。" * 2
    assert not looks_english(chinese) and check_caption(chinese, "stop", DENSE)[1].startswith("wrong language")
    assert not looks_english(german) and check_caption(german, "stop", DENSE)[0] == "error"
    assert check_caption(german, "stop", DENSE, language=None)[0] == "ok"
    assert looks_english(GOOD)
    # tags have no stopwords: only the letter check applies
    tags = "red circle, blue square, green triangle, white background, flat, vector, simple, shapes, icons"
    assert check_caption(tags, "stop", PRESETS["tags"]) == ("ok", None)


def test_rows_from_a_response_carry_status_and_cost():
    cfg = CaptionConfig(model="gpt-4.1")
    body = {"model": "gpt-4.1", "choices": [{"message": {"content": GOOD}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}
    (row,) = parse_response(body, ["dense"], cfg, key="0007")
    assert row["status"] == "ok" and row["text"] == GOOD and row["error"] is None
    assert row["cost_usd"] == pytest.approx((1000 * 2.0 + 100 * 8.0) / 1e6)
    body["choices"][0]["finish_reason"] = "length"
    (row,) = parse_response(body, ["dense"], cfg, key="0007")
    assert row["status"] == "error" and row["text"] is None and row["cost_usd"] > 0  # billed all the same
