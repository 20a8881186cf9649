"""Prompt presets, request bodies and response parsing: the pure half of captioning (shared with the Batch API)."""

import json

import pytest

from captioning.config import CaptionConfig
from captioning.endpoint.describe_request import VARIANT_LINE, style_for
from captioning.presets import PRESETS, list_presets, resolve_variants
from captioning.request import build_request, extract_json_object, parse_response, variant_groups

DATA_URL = "data:image/jpeg;base64,AAAA"


def cfg(**kw) -> CaptionConfig:
    return CaptionConfig(model="gpt-4.1-mini", **kw)


def completion(content: str, finish: str = "stop", prompt: int = 300, completion_tokens: int = 60) -> dict:
    return {"model": "gpt-4.1-mini", "choices": [{"message": {"content": content, "refusal": None},
                                                  "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens}}


def test_registry_and_endpoint_contract():
    assert list_presets() == ["dense", "medium", "short", "tags"]
    # The local endpoint picks the density from these phrases (captioning/endpoint/describe_request.py).
    assert "about 100 words" in PRESETS["dense"].instruction
    assert "about 40 words" in PRESETS["medium"].instruction
    assert "one sentence" in PRESETS["short"].instruction
    assert "comma-separated tags" in PRESETS["tags"].instruction
    assert style_for(PRESETS["dense"].instruction) == ("dense", 100)
    assert style_for(PRESETS["medium"].instruction) == ("medium", 40)
    assert style_for(PRESETS["short"].instruction)[0] == "short"
    assert style_for(PRESETS["tags"].instruction)[0] == "tags"
    assert "no visible text" in PRESETS["dense"].instruction  # only as the thing never to write


def test_prompt_id_is_name_and_content_hash():
    ids = {p.prompt_id for p in PRESETS.values()}
    assert len(ids) == 4 and PRESETS["dense"].prompt_id.startswith("dense@")
    assert len(PRESETS["dense"].prompt_id.split("@")[1]) == 8
    from dataclasses import replace

    assert replace(PRESETS["dense"], version="2").prompt_id != PRESETS["dense"].prompt_id


def test_user_prompt_files(tmp_path):
    prompt = tmp_path / "product.txt"
    prompt.write_text("Describe the product in this image in one sentence.")
    presets = resolve_variants(["dense", f"mine={prompt}"])
    assert list(presets) == ["dense", "mine"] and presets["mine"].instruction.startswith("Describe the product")
    assert list(resolve_variants(["product"], prompt_file=str(prompt))) == ["product"]
    with pytest.raises(LookupError, match="unknown caption preset 'fancy'"):
        resolve_variants(["fancy"])
    with pytest.raises(FileNotFoundError):
        resolve_variants([f"x={tmp_path / 'missing.txt'}"])


def test_one_body_per_variant_with_image_detail_and_alt_hint():
    c = cfg(detail="low", alt_hint=True, temperature=0.2)
    bodies = build_request("0001", DATA_URL, ["dense", "short"], PRESETS, c, alt_text="red circle")
    assert len(bodies) == 2 and variant_groups(["dense", "short"], c) == [["dense"], ["short"]]
    user = bodies[1]["messages"][1]["content"]
    assert user[0]["text"].startswith(PRESETS["short"].instruction)
    assert "original alt text (may be wrong or empty): red circle" in user[0]["text"]
    assert user[1] == {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "low"}}
    assert bodies[0]["max_completion_tokens"] == PRESETS["dense"].max_tokens and bodies[0]["temperature"] == 0.2
    assert "response_format" not in bodies[0]
    no_hint = build_request("0001", DATA_URL, ["dense"], PRESETS, cfg(), alt_text="red circle")
    assert "alt text" not in json.dumps(no_hint)


def test_json_mode_lists_variants_the_endpoint_can_read():
    c = cfg(json_mode=True)
    (body,) = build_request("0001", DATA_URL, ["dense", "tags"], PRESETS, c)
    assert body["response_format"] == {"type": "json_object"}
    text = body["messages"][1]["content"][0]["text"]
    assert [name for name, _ in VARIANT_LINE.findall(text)] == ["dense", "tags"]
    assert f"- dense: {PRESETS['dense'].instruction}" in text


def test_json_answers_repaired_and_split():
    c = cfg(json_mode=True)
    presets = [PRESETS["dense"], PRESETS["tags"]]
    dense = " ".join(["word"] * 30) + " on the table."
    fenced = "```json\n" + json.dumps({"dense": dense, "tags": ["red circle", "white background"]}) + "\n```"
    rows = parse_response(completion(fenced, prompt=301, completion_tokens=70), presets, c, key="k")
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[1]["text"] == "red circle, white background"
    assert sum(r["prompt_tokens"] for r in rows) == 301 and sum(r["completion_tokens"] for r in rows) == 70
    assert all(r["prompt_id"] == p.prompt_id and r["key"] == "k" for r, p in zip(rows, presets))
    chatty = "Sure! Here it is: " + json.dumps({"dense": dense}) + " Hope this helps."
    rows = parse_response(completion(chatty), presets, c)
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "error" and "lacks" in rows[1]["error"]
    assert extract_json_object("no json here") is None
    rows = parse_response(completion("not json"), presets, c)
    assert all(r["status"] == "error" and "not a JSON object" in r["error"] for r in rows)


def test_malformed_bodies_are_error_rows():
    rows = parse_response({"id": "x"}, ["dense"], cfg(), key="k")
    assert rows[0]["status"] == "error" and rows[0]["error"].startswith("malformed response")
    assert rows[0]["cost_usd"] == 0.0
