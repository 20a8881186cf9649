"""Chat-completions request bodies for one image, and caption rows from a response body. Pure functions, shared by
the online client (captioning/pipeline.py) and the Batch API path (captioning/batch.py).

    bodies = build_request(key, image.data_url, ["dense", "short"], presets, cfg, alt_text="red circle")
    groups = variant_groups(["dense", "short"], cfg)  # which variants each body asks for, aligned with bodies
    rows = parse_response(response_json, [presets[v] for v in groups[0]], cfg, key=key)

One body per variant, or with `json_mode` one body for all of them: the user text lists each variant on its own
line as `- <variant>: <instruction>` and the answer is a JSON object with those keys (response_format json_object).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Sequence

from captioning.checks import check_caption
from captioning.config import CaptionConfig
from captioning.ledger import cost_usd, price_for
from captioning.presets import Preset, json_instruction, resolve_variants
from captioning.schema import STATUS_ERROR

ALT_HINT = "The image's original alt text (may be wrong or empty): {alt}"
JSON_KEY_TOKENS = 16  # completion tokens a JSON answer spends per variant on keys, quotes and braces


def request_model(cfg: CaptionConfig) -> str:
    """The `model` field: Azure routes by deployment name instead."""
    if cfg.azure is not None:
        return cfg.azure.deployment
    if not cfg.model:
        raise ValueError("caption.model is not set: pass --model (e.g. gpt-4.1-mini)")
    return cfg.model


def variant_groups(variants: Sequence[str], cfg: CaptionConfig) -> list[list[str]]:
    """The variants each body of `build_request` asks for, in the same order."""
    return [list(variants)] if cfg.json_mode and len(variants) > 1 else [[v] for v in variants]


def _body(cfg: CaptionConfig, system: str, text: str, image_data_url: str, max_tokens: int) -> dict:
    body = {
        "model": request_model(cfg),
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": image_data_url, "detail": cfg.detail}},
            ]},
        ],
        "max_completion_tokens": cfg.max_tokens or max_tokens,
    }
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    return body


def build_request(key: str, image_data_url: str, variants: Sequence[str], preset_registry: dict[str, Preset],
                  cfg: CaptionConfig, alt_text: str | None = None) -> list[dict]:
    """Request bodies for chat.completions, one per group of `variant_groups(variants, cfg)`. `key` is not part of
    the body (the online client sends it as a header; the Batch API as custom_id)."""
    hint = f"\n{ALT_HINT.format(alt=alt_text or '')}" if cfg.alt_hint else ""
    bodies = []
    for group in variant_groups(variants, cfg):
        presets = [preset_registry[v] for v in group]
        if len(presets) == 1:
            p = presets[0]
            bodies.append(_body(cfg, p.system, p.instruction + hint, image_data_url, p.max_tokens))
            continue
        cap = sum(p.max_tokens + JSON_KEY_TOKENS for p in presets)
        body = _body(cfg, presets[0].system, json_instruction(presets) + hint, image_data_url, cap)
        body["response_format"] = {"type": "json_object"}
        bodies.append(body)
    return bodies


def extract_json_object(text: str) -> dict | None:
    """The answer's JSON object, repaired: code fences stripped, else the first {...} in the text."""
    text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text or "", flags=re.IGNORECASE)
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _as_presets(variants: Sequence[str | Preset], cfg: CaptionConfig) -> list[Preset]:
    if all(isinstance(v, Preset) for v in variants):
        return list(variants)
    registry = resolve_variants(cfg.variants, cfg.prompt_file)
    return [v if isinstance(v, Preset) else registry[v] for v in variants]


def _row(key, preset: Preset, cfg: CaptionConfig, text, status, error, prompt_tokens, completion_tokens, cost,
         served: str | None = None) -> dict:
    """A caption row (captioning/schema.py): `model` is the captioner as configured, which pending work keys on;
    `served_model` what the response named."""
    return {"key": key, "variant": preset.name, "text": text, "model": request_model(cfg),
            "prompt_id": preset.prompt_id, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cost_usd": cost, "latency_s": None, "status": status, "error": error,
            "created_at": datetime.now(timezone.utc), "served_model": served}


def error_rows(key: str | None, variants: Sequence[str | Preset], cfg: CaptionConfig, message: str,
               status: str = STATUS_ERROR) -> list[dict]:
    """Rows for a request that got no usable answer (transport failure, unreadable image): nothing billed."""
    return [_row(key, p, cfg, None, status, message, 0, 0, 0.0) for p in _as_presets(variants, cfg)]


def _split(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, summing exactly to `total`."""
    weights = [max(w, 1) for w in weights]
    parts = [total * w // sum(weights) for w in weights]
    parts[0] += total - sum(parts)
    return parts


def _answers(message: dict, finish: str | None, presets: list[Preset]) -> dict[str, tuple[str | None, str | None]]:
    """variant → (text, problem) of a JSON-mode answer; problem is None when the variant's text was found."""
    if finish == "length":
        return {p.name: (None, "truncated at max tokens (JSON answer)") for p in presets}
    obj = extract_json_object(message.get("content") or "")
    if obj is None:
        return {p.name: (None, "answer is not a JSON object") for p in presets}
    out = {}
    for p in presets:
        value = obj.get(p.name)
        if isinstance(value, list):  # tags answered as a list: the captions table holds them comma-separated
            value = ", ".join(map(str, value))
        out[p.name] = (value, None) if isinstance(value, str) else (None, f"JSON answer lacks string {p.name!r}")
    return out


def parse_response(body: dict, variants: Sequence[str | Preset], cfg: CaptionConfig, key: str | None = None,
                   batch: bool = False) -> list[dict]:
    """Caption rows (captioning/schema.py columns; latency_s left None) of one chat.completions response body,
    one per variant the request asked for. Costs at the standard price, or the Batch API's with `batch`."""
    presets = _as_presets(variants, cfg)
    try:
        choice = body["choices"][0]
        message, finish = choice["message"], choice.get("finish_reason")
        usage = body.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        return error_rows(key, presets, cfg, f"malformed response: {type(err).__name__}: {err}"[:300])
    served = body.get("model")
    price = price_for(cfg.model or served or "", cfg, batch=batch)
    if len(presets) == 1:
        answers = {presets[0].name: (message.get("content"), None)}
    else:
        answers = _answers(message, finish, presets)
    texts = [answers[p.name][0] or "" for p in presets]
    prompts, completions = _split(prompt, [1] * len(presets)), _split(completion, [len(t) for t in texts])
    rows = []
    for p, text, pt, ct in zip(presets, texts, prompts, completions):
        problem = answers[p.name][1]
        status, reason = (STATUS_ERROR, problem) if problem else check_caption(
            text, finish, p, cfg.language, cfg.word_ranges, refusal=message.get("refusal"))
        rows.append(_row(key, p, cfg, text.strip() if reason is None else None, status, reason, pt, ct,
                         cost_usd(price, pt, ct), served))
    return rows
