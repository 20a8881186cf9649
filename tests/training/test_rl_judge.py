"""training/rl_judge.py against the local OpenAI-compatible endpoint over loopback HTTP (the real `openai` client
through captioning's Sender): the rubric's share of yes scores a faithful render above a wrong one; every rubric
and answer is billed and journaled, so a second judge on the same run asks nothing it has paid for; the budget
stops the judge before it is passed, with what was paid kept."""

import json

import pytest

from captioning.endpoint import start_endpoint
from scenes import Obj, Scene, describe, render
from scenes.rubric import rubric_for
from training.rl_config import JudgeConfig
from training.rl_judge import JudgeReward, JudgeStopped
from training.rl_prompts import RLPrompt

KEY = "sk-rl-judge-test"
TARGET = Scene((Obj("circle", "red", "large", "top left"), Obj("star", "blue", "large", "center")), "white")
WRONG = Scene((Obj("square", "green", "large", "bottom right"),), "black")


@pytest.fixture(scope="module")
def endpoint():
    handle, base_url = start_endpoint(api_key=KEY, seed=0)
    yield base_url
    handle.stop()


@pytest.fixture
def judge_cfg(endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return JudgeConfig(base_url=endpoint, model="gpt-4.1-mini")


def journal(run) -> list[dict]:
    return [json.loads(line) for line in (run / "rl" / "judge-rank0.jsonl").read_text().splitlines()]


def test_a_faithful_image_scores_above_a_wrong_one_and_everything_paid_is_journaled(judge_cfg, tmp_path):
    prompt = RLPrompt(describe(TARGET, "dense"))
    judge = JudgeReward(judge_cfg, tmp_path)
    right, wrong = render(TARGET, 32), render(WRONG, 32)
    scores = judge.score([prompt, prompt], [right, wrong], step=1)
    questions = rubric_for(TARGET)
    assert scores[0] == 1.0 and scores[1] < 0.5  # the wrong scene passes the structural item at most
    rows = journal(tmp_path)
    assert [r["kind"] for r in rows].count("rubric") == 1  # one rubric per prompt
    assert [r["kind"] for r in rows].count("answer") == 2 * len(questions)
    assert all(r["usd"] > 0 and r["tokens"] > 0 and r["step"] == 1 for r in rows)
    spent = sum(r["usd"] for r in rows)
    assert judge.last["judge_usd"] == pytest.approx(spent) and judge.last["judge_requests"] == len(rows)
    judge.close()

    again = JudgeReward(judge_cfg, tmp_path)  # a resumed run: the same rollouts cost nothing more
    assert again.score([prompt, prompt], [right, wrong], step=1) == scores
    assert again.last["judge_requests"] == 0 and again.last["judge_cached"] == 2 * len(questions)
    assert again.spent == pytest.approx(spent) and len(journal(tmp_path)) == len(rows)
    again.close()


def test_a_given_rubric_is_used_as_is(judge_cfg, tmp_path):
    judge = JudgeReward(judge_cfg, tmp_path)
    prompt = RLPrompt("anything", rubric=("Is there a red circle?", "Is there a green square?"))
    assert judge.score([prompt], [render(TARGET, 32)]) == [0.5]
    assert all(r["kind"] == "answer" for r in journal(tmp_path))
    judge.close()


def test_the_budget_stops_the_judge_and_keeps_what_was_paid(judge_cfg, tmp_path):
    prompt = RLPrompt(describe(TARGET, "dense"))
    tight = judge_cfg.model_copy(update={"max_cost_usd": 2e-3, "concurrency": 2})
    judge = JudgeReward(tight, tmp_path)
    with pytest.raises(JudgeStopped, match="budget is spent.*last checkpoint is intact"):
        judge.score([prompt] * 8, [render(TARGET, 32)] * 4 + [render(WRONG, 32)] * 4, step=1)
    rows = journal(tmp_path)
    assert rows and sum(r["usd"] for r in rows) <= 2e-3  # never past the budget, and nothing paid was dropped
    judge.close()


def test_a_dead_endpoint_or_a_wrong_key_is_one_line_before_any_work(judge_cfg, tmp_path, monkeypatch):
    from captioning.client import AuthError, EndpointUnreachable

    with pytest.raises(EndpointUnreachable):
        JudgeReward(judge_cfg.model_copy(update={"base_url": "http://127.0.0.1:9/v1"}), tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(AuthError):
        JudgeReward(judge_cfg, tmp_path)
