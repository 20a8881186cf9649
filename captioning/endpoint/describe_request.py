"""One chat-completions request body in, one chat.completion body out: the captioning logic of the local endpoint,
shared by the HTTP route and the Batch API worker. No HTTP here.

    request = read_request(body, models={"gpt-4.1-mini"})   # validates; raises RequestError (→ 400 / 404)
    content, prompt_tokens = caption(request)                # decode + parse + describe: CPU work, run in a thread
    caption(request, world="rich")                           # the rich scene world (`serve-captioner --world rich`)
    completion_body(request, content, prompt_tokens)         # the chat.completion JSON, max_tokens honoured

The caption's density is read from the prompt's text (system + user parts), first match wins:
    1. response_format json_object and lines "- <variant>: <instruction>" → {"<variant>": caption, ...}, each
       caption chosen by rules 2-5 on that line's instruction;
    2. "comma-separated tags" → describe(scene, "tags");
    3. "one sentence"         → describe(scene, "short");
    4. "about N words"        → describe(scene, "dense" if N >= 60 else "medium", max_words=N);
    5. otherwise              → describe(scene, "dense").

The rubric judge's two requests (captioning/judge_prompts.py owns their wording) are answered from the scenes too:
a text-only rubric request gets {"questions": scenes.rubric.rubric_for(the scene its prompt describes)}, and a
yes/no question about an image gets "yes" or "no" from the parsed image (scenes.rubric.answer; "no" for a
question it does not know).

`world` ("basic" or "rich", scenes/scene.py) is the scene world the images come from: it is parsed and described in
that world (a rich dense caption names fills, frame, word and relations). It is a server setting, not a request
field: a real API is not told what world its images show.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from captioning.judge_prompts import ANSWER_ASK, RUBRIC_ASK, prompt_of, question_of
from captioning.tokens import DETAILS, completion_tokens, image_tokens, text_tokens, words_within
from scenes import Scene, describe, parse
from scenes.rubric import STRUCTURE, answer, read_description, rubric_for

PARSE_SIDE = 64  # images are parsed at most this large (JPEG draft decode + area resize): parse is exact at 64²
#                  for renders (scenes/parse.py) and ~5x faster than at 256²: ~3 ms a request instead of ~15
SCENE_CACHE_SIZE = 4096  # a client asks for several variants of the same image: parse it once
DENSE_MIN_WORDS = 60  # "about N words" with N >= this asks for the dense paragraph, below it the medium sentence
REFUSAL = "I'm sorry, but I can't help with that."

VARIANT_LINE = re.compile(r"^\s*-\s*([A-Za-z0-9_][\w.-]*)\s*:\s*(\S.*?)\s*$", re.MULTILINE)
ABOUT_WORDS = re.compile(r"about\s+(\d+)\s+words")


class RequestError(Exception):
    """A request the endpoint answers with an OpenAI error JSON and this HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    texts: tuple[str, ...]  # every text part of every message, in order
    images: tuple[tuple[str, str], ...]  # (data URL, detail)
    json_mode: bool
    max_tokens: int | None


def read_request(body: object, models: set[str] | frozenset[str]) -> ChatRequest:
    """Validate a chat-completions body (cheap: no image decoding)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "you must provide a model parameter", param="model")
    if model not in models:
        raise RequestError(404, f"The model `{model}` does not exist", code="model_not_found", param="model")
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported by the lensforge endpoint", param="stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", param="messages")
    texts: list[str] = []
    images: list[tuple[str, str]] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(400, "each message needs a content string or a list of parts", param="messages")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                url, detail = part["image_url"].get("url"), part["image_url"].get("detail", "auto")
                if not isinstance(url, str) or detail not in DETAILS:
                    raise RequestError(400, f"image_url needs a url and a detail in {DETAILS}", param="messages")
                if not url.startswith("data:"):
                    raise RequestError(400, "only data URLs are supported (data:image/...;base64,...)",
                                       code="invalid_image_url", param="messages")
                images.append((url, detail))
            else:
                raise RequestError(400, f"unsupported content part {kind!r}", param="messages")
    if not images and not any(RUBRIC_ASK in text for text in texts):
        raise RequestError(400, "the lensforge endpoint captions images: no image_url part in the messages",
                           param="messages")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise RequestError(400, "max_tokens must be a positive integer", param="max_tokens")
    response_format = body.get("response_format")
    json_mode = isinstance(response_format, dict) and response_format.get("type") == "json_object"
    return ChatRequest(model, tuple(texts), tuple(images), json_mode, limit)


def style_for(instruction: str) -> tuple[str, int | None]:
    """(describe style, max_words) asked for by an instruction: rules 2-5."""
    text = instruction.lower()
    if "comma-separated tags" in text:
        return "tags", None
    if "one sentence" in text:
        return "short", None
    found = ABOUT_WORDS.search(text)
    if found:
        words = max(1, int(found[1]))
        return ("dense" if words >= DENSE_MIN_WORDS else "medium"), words
    return "dense", None


def caption_for(scene: Scene, texts: tuple[str, ...], json_mode: bool) -> str:
    """The answer's content for a parsed scene: rule 1 (JSON variants) else rules 2-5 on all the text."""
    text = "\n".join(texts)
    variants = VARIANT_LINE.findall(text) if json_mode else []
    if variants:
        return json.dumps({name: describe(scene, *style_for(instruction)) for name, instruction in variants})
    return describe(scene, *style_for(text))


_cache: OrderedDict[bytes, tuple[Scene, int, int]] = OrderedDict()
_cache_lock = threading.Lock()


def _payload(url: str) -> bytes:
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise RequestError(400, "image data URLs must be base64 (data:image/...;base64,...)", param="messages")
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError):
        raise RequestError(400, "the image data URL is not valid base64", code="invalid_image", param="messages")


def scene_of(url: str, world: str = "basic") -> tuple[Scene, int, int]:
    """The scene shown by a data-URL image and its original (width, height); parsed once per distinct image and
    world."""
    key = hashlib.sha1(world.encode() + b"\0" + url.encode("ascii", "replace")).digest()
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    raw = _payload(url)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            image.draft("RGB", (PARSE_SIDE, PARSE_SIDE))  # JPEG: decode at 1/2 … 1/8 scale, much cheaper
            rgb = image.convert("RGB")
    except Exception as err:  # PIL raises many types for broken bytes (OSError, SyntaxError, bomb errors, ...)
        raise RequestError(400, f"could not decode the image: {type(err).__name__}", code="invalid_image",
                           param="messages") from None
    scale = PARSE_SIDE / max(rgb.size)
    if scale < 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BOX)
    try:
        scene = parse(rgb, world=world)
    except ValueError:  # too small to hold a scene: answer as for any image without one
        scene = Scene(world=world)
    with _cache_lock:
        _cache[key] = (scene, width, height)
        while len(_cache) > SCENE_CACHE_SIZE:
            _cache.popitem(last=False)
    return scene, width, height


def _image_size(url: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(_payload(url))) as image:
            return image.size
    except RequestError:
        raise
    except Exception as err:
        raise RequestError(400, f"could not decode the image: {type(err).__name__}", code="invalid_image",
                           param="messages") from None


def judged(request: ChatRequest, world: str = "basic") -> str | None:
    """The content of a rubric judge's request (a rubric, or a yes / no answer); None for any other request."""
    text = "\n".join(request.texts)
    if RUBRIC_ASK in text and not request.images:
        scene = read_description(prompt_of(text) or "")
        return json.dumps({"questions": rubric_for(scene) if scene is not None else [STRUCTURE]})
    if ANSWER_ASK in text and request.images:
        question = question_of(text) or ""
        return "yes" if answer(question, scene_of(request.images[0][0], world)[0]) else "no"
    return None


def caption(request: ChatRequest, world: str = "basic") -> tuple[str, int]:
    """(content, prompt_tokens) for a request: its first image captioned in `world` (or the judge's request
    answered), every image and text part counted."""
    content = judged(request, world)
    if content is None:
        scene, width, height = scene_of(request.images[0][0], world)
        sizes = [(width, height)] + [_image_size(url) for url, _ in request.images[1:]]
        content = caption_for(scene, request.texts, request.json_mode)
    else:
        sizes = [_image_size(url) for url, _ in request.images]
    prompt = text_tokens("".join(request.texts))
    prompt += sum(image_tokens(w, h, detail) for (w, h), (_, detail) in zip(sizes, request.images))
    return content, prompt


def apply_outcome(content: str, outcome: str) -> tuple[str, str]:
    """(content, finish_reason) after a content fault: refusal, truncate (cut mid-sentence), empty."""
    if outcome == "refusal":
        return REFUSAL, "stop"
    if outcome == "empty":
        return "", "stop"
    if outcome == "truncate":
        words = content.split()
        return " ".join(words[: max(1, len(words) // 2)]).rstrip(".,;:!?\"'") or content[:1], "length"
    return content, "stop"


def completion_body(request: ChatRequest, content: str, prompt_tokens: int, finish_reason: str = "stop") -> dict:
    """A chat.completion object; a content longer than max_tokens is cut to fit, with finish_reason "length"."""
    if request.max_tokens is not None and completion_tokens(content) > request.max_tokens:
        content = " ".join(content.split()[: words_within(request.max_tokens)])
        finish_reason = "length"
    completion = completion_tokens(content)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": "fp_lensforge",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion},
    }
