"""What the rubric judge of RL post-training (issue 17) asks an OpenAI-compatible vision model, and how it reads the
replies: one owner for the wording, which the local endpoint also recognises to answer offline.

    messages = rubric_messages("A large red circle in the top left.")     # text only; reply: {"questions": [...]}
    questions = read_rubric(reply_text)                                  # ["Is there a red circle?", ...]
    messages = answer_messages(question, data_url)                       # one image, one question
    yes = read_answer(reply_text)                                        # True / False / None (unreadable)

Lens-RL asked GPT-4.1-mini about ten prompt-specific items plus one global "structural integrity" item, each a 0/1
answer; the global item is STRUCTURE (scenes/rubric.py owns its text, as the local judge answers it there).
"""

from __future__ import annotations

import json
import re

from scenes.rubric import STRUCTURE

RUBRIC_ASK = "Write about ten yes/no questions"  # the local endpoint recognises a rubric request by this phrase
ANSWER_ASK = "Answer with one word: yes or no."  # ... and a question about an image by this one
RUBRIC_SYSTEM = "You write evaluation rubrics for text-to-image prompts."
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def rubric_messages(prompt: str) -> list[dict]:
    """The chat messages asking for a prompt's rubric (send with response_format json_object)."""
    return [{"role": "system", "content": RUBRIC_SYSTEM},
            {"role": "user", "content": f"Prompt: {prompt}\n\n{RUBRIC_ASK} that an image faithful to this prompt "
                                        "answers \"yes\" to: one per object, attribute, count, position and relation "
                                        "it names, each answerable from the image alone. Reply as JSON: "
                                        "{\"questions\": [\"...\", ...]}"}]


def read_rubric(content: str) -> list[str]:
    """The questions of a rubric reply, with STRUCTURE last (added when the model left it out); ValueError when
    the reply holds no questions."""
    try:
        questions = json.loads(content).get("questions")
    except (json.JSONDecodeError, AttributeError):
        questions = None
    if not isinstance(questions, list) or not any(isinstance(q, str) and q.strip() for q in questions):
        raise ValueError(f"the judge's rubric reply holds no questions: {content[:120]!r}")
    found = [q.strip() for q in questions if isinstance(q, str) and q.strip() and q.strip() != STRUCTURE]
    return [*dict.fromkeys(found), STRUCTURE]


def answer_messages(question: str, image_url: str, detail: str = "low") -> list[dict]:
    """One yes/no question about one image (a data URL)."""
    return [{"role": "user", "content": [
        {"type": "text", "text": f"Look at the image. Question: {question}\n{ANSWER_ASK}"},
        {"type": "image_url", "image_url": {"url": image_url, "detail": detail}}]}]


def question_of(text: str) -> str | None:
    """The question inside an answer request's text (what the local endpoint answers)."""
    found = re.search(r"Question:\s*(.+?)\s*(?:\n|$)", text)
    return found[1] if found else None


def prompt_of(text: str) -> str | None:
    """The prompt inside a rubric request's text."""
    found = re.search(r"Prompt:\s*(.+?)\s*(?:\n|$)", text)
    return found[1] if found else None


def read_answer(content: str) -> bool | None:
    """True for a reply whose first yes/no word is yes, False for no, None when it holds neither."""
    found = _YES_NO.search(content or "")
    return None if found is None else found[1].lower() == "yes"
