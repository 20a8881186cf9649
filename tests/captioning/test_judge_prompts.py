"""captioning/judge_prompts.py against the local endpoint over real loopback HTTP and the real `openai` client: a
rubric written for a scene's description, and yes / no answers that a faithful image passes and a wrong one fails,
billed like captions (image tokens by the tile rule)."""

import pytest
from openai import OpenAI

from captioning.endpoint import start_endpoint
from captioning.judge_prompts import answer_messages, read_answer, read_rubric, rubric_messages
from captioning.tokens import image_tokens
from scenes import Obj, Scene, describe, render
from scenes.rubric import STRUCTURE, rubric_for
from tests.captioning.test_endpoint import data_url

KEY = "sk-judge-test-key"
TARGET = Scene((Obj("circle", "red", "large", "top left"), Obj("star", "blue", "large", "center")), "white")
WRONG = Scene((Obj("circle", "red", "large", "bottom right"),), "gray")


@pytest.fixture(scope="module")
def client():
    handle, base_url = start_endpoint(api_key=KEY, seed=0)
    yield OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=10)
    handle.stop()


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="gpt-4.1-mini", messages=messages, **kwargs)


def test_the_endpoint_writes_the_rubric_of_the_scene_a_prompt_describes(client):
    reply = ask(client, rubric_messages(describe(TARGET, "dense")), response_format={"type": "json_object"})
    questions = read_rubric(reply.choices[0].message.content)
    assert questions == rubric_for(TARGET) and questions[-1] == STRUCTURE and len(questions) == 7
    vague = ask(client, rubric_messages("a cozy living room"), response_format={"type": "json_object"})
    assert read_rubric(vague.choices[0].message.content) == [STRUCTURE]  # nothing it can read: the global item
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_a_faithful_image_answers_yes_and_a_wrong_one_no_question_by_question(client):
    questions = rubric_for(TARGET)
    right, wrong = data_url(render(TARGET, 256)), data_url(render(WRONG, 256))
    answers = [read_answer(ask(client, answer_messages(q, right)).choices[0].message.content) for q in questions]
    assert answers == [True] * len(questions)
    answers = [read_answer(ask(client, answer_messages(q, wrong)).choices[0].message.content) for q in questions]
    assert answers == [True, False, False, False, False, False, True]  # a red circle, elsewhere, alone, on gray
    reply = ask(client, answer_messages(questions[0], right, detail="low"))
    assert reply.usage.prompt_tokens > image_tokens(256, 256, "low")  # the image billed, plus the text


def test_replies_are_read_strictly():
    assert read_rubric('{"questions": ["Is it red?", "Is it red?", "' + STRUCTURE + '"]}') == ["Is it red?", STRUCTURE]
    for bad in ("not json", '{"questions": []}', '{"questions": "Is it red?"}', "[1, 2]"):
        with pytest.raises(ValueError, match="no questions"):
            read_rubric(bad)
    assert (read_answer("Yes."), read_answer("no, it is blue"), read_answer("maybe"), read_answer("")) == \
        (True, False, None, None)
