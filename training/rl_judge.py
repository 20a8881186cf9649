"""The rubric judge reward of `lensforge rl --reward judge`: an OpenAI-compatible vision model answers each item of a
prompt's rubric as yes / no about each rollout; the reward is the share of yes (Lens-RL: GPT-4.1-mini, about ten
items plus the global structural-integrity one).

    judge = JudgeReward(cfg.judge, run_dir, rank=0, world=1)    # probes the endpoint: a wrong URL fails here
    raw = judge.score(prompts, images, step)                    # one value in [0, 1] per image
    judge.last                                                  # this step's cost, requests, cache hits, unreadable

Requests go through captioning's client (captioning/client.py: its retries, shared 429 back-off, fatal 401 / 404)
with captioning's cost ledger: each request reserves an upper bound of its cost before it is sent, so the spend
never passes `max_cost_usd`; when it would, training stops cleanly with the last checkpoint intact. Rubrics come
from the same endpoint once per prompt (captioning/judge_prompts.py has the wording), unless the prompt file
gives one.

Nothing paid for is asked twice: every rubric and every answer is appended, as it arrives, to this rank's journal
RUN/rl/judge-rank<R>.jsonl (one whole line per os.write, as captioning/journal.py argues: a SIGKILL cannot lose
it). A resumed run replays the same rollouts (the RL loop's draws are seeded by step), so their answers come from
the journal, keyed by the image's bytes and the question. The journal is also the ledger: its costs, summed, are
what the judge has cost this rank so far.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from captioning.client import Sender, make_client, probe_endpoint, resolve_api_key
from captioning.config import CaptionConfig
from captioning.judge_prompts import answer_messages, read_answer, read_rubric, rubric_messages
from captioning.ledger import Ledger, cost_usd, price_for, reservation_usd
from training.rl_config import JudgeConfig
from training.rl_prompts import RLPrompt
from training.trainer import TrainingStopped

JOURNAL = "judge-rank{rank}.jsonl"  # under RUN/rl/
RUBRIC_TOKENS, ANSWER_TOKENS = 600, 4  # completion caps: a JSON list of questions; one word


class JudgeStopped(TrainingStopped):
    """The judge cannot go on: its budget is spent, or a request failed after every retry."""


def caption_config(cfg: JudgeConfig, world: int) -> CaptionConfig:
    """The captioning client's settings for the judge; each of `world` ranks spends its share of the budget."""
    return CaptionConfig(base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env, prices=cfg.prices,
                         max_cost_usd=cfg.max_cost_usd / world if cfg.max_cost_usd else None,
                         concurrency=cfg.concurrency, max_attempts=cfg.max_attempts, timeout_s=cfg.timeout_s,
                         backoff_s=cfg.backoff_s, backoff_max_s=cfg.backoff_max_s, detail=cfg.detail)


def image_url(image: Image.Image, upscale: int) -> tuple[str, int, int, str]:
    """(PNG data URL, width, height, sha256 of the PNG): enlarged by nearest neighbour to `upscale` if smaller."""
    if max(image.size) < upscale:
        factor = upscale // max(image.size)
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    raw = buf.getvalue()
    return ("data:image/png;base64," + base64.b64encode(raw).decode("ascii"), image.width, image.height,
            hashlib.sha256(raw).hexdigest())


def answer_key(image_hash: str, question: str) -> str:
    return hashlib.sha256(f"{image_hash}\n{question}".encode()).hexdigest()[:32]


async def gather_all(coroutines: list) -> None:
    """Run them together; the first failure cancels the rest (answers already journaled stay) and is raised as
    itself, not as an ExceptionGroup, so the CLI prints its one line."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except ExceptionGroup as errors:
        raise errors.exceptions[0] from None


class JudgeReward:
    name = "judge"

    def __init__(self, cfg: JudgeConfig, run: str | Path, rank: int = 0, world: int = 1):
        self.cfg, self.caption_cfg = cfg, caption_config(cfg, world)
        self.price = price_for(cfg.model, self.caption_cfg)
        self.api_key = resolve_api_key(self.caption_cfg)
        probe_endpoint(self.caption_cfg, api_key=self.api_key)  # unreachable, wrong path, wrong key: one line now
        self.path = Path(run) / "rl" / JOURNAL.format(rank=rank)
        self.rubrics: dict[str, list[str]] = {}
        self.answers: dict[str, bool | None] = {}
        self.spent = 0.0
        if self.path.is_file():
            self._replay()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.last: dict[str, float] = {}

    def _replay(self) -> None:
        for line in self.path.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line (a write cut short): nothing was learned from it
                continue
            self.spent += row.get("usd", 0.0)
            if row["kind"] == "rubric":
                self.rubrics[row["prompt"]] = row["questions"]
            else:
                self.answers[row["key"]] = row["yes"]

    def _append(self, row: dict) -> None:
        os.write(self._fd, (json.dumps(row) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)

    def check(self, prompts: Sequence[RLPrompt]) -> None:
        """Any prompt can be judged (its rubric is written when first needed)."""

    # -- requests -------------------------------------------------------------------------------------------------
    async def _ask(self, sender: Sender, ledger: Ledger, body: dict, key: str, width: int, height: int,
                   budget_lock: asyncio.Condition) -> tuple[str, int, float]:
        """(content, tokens, usd) of one request, its cost reserved first (waiting for requests in flight to settle
        while the budget is full, and stopping when nothing is in flight to free room)."""
        reserve = reservation_usd(body, width, height, self.price)
        async with budget_lock:
            while not ledger.reserve(reserve):
                if ledger.reserved == 0:
                    raise JudgeStopped(
                        f"the judge's budget is spent (rl.judge.max_cost_usd {self.cfg.max_cost_usd:g} USD; "
                        f"${ledger.spent:.4f} on this rank): training stopped, the last checkpoint is intact; "
                        "raise the budget and rerun with --resume")
                await budget_lock.wait()
        actual = 0.0
        try:
            answer = await sender.send(body, key)
            if answer.body is None:
                raise JudgeStopped(f"a judge request failed ({answer.error}): training stopped, the last "
                                   "checkpoint is intact; rerun with --resume when the endpoint answers")
            usage = answer.body.get("usage") or {}
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            actual = cost_usd(self.price, prompt, completion)
            content = ((answer.body.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
            return content, prompt + completion, actual
        finally:
            async with budget_lock:
                ledger.settle(reserve, actual)
                budget_lock.notify_all()

    async def _run(self, prompts: Sequence[RLPrompt], images: Sequence[Image.Image], step: int) -> list[float]:
        client = make_client(self.caption_cfg, self.api_key)
        sender, lock = Sender(client, self.caption_cfg, self.api_key), asyncio.Condition()
        ledger = Ledger(self.caption_cfg.max_cost_usd, spent=self.spent)
        stats = {"judge_requests": 0, "judge_cached": 0, "judge_unreadable": 0, "judge_usd": 0.0,
                 "judge_tokens": 0}

        def book(row: dict, tokens: int, usd: float) -> None:
            self._append({**row, "step": step, "tokens": tokens, "usd": usd})
            self.spent += usd
            stats["judge_requests"] += 1
            stats["judge_usd"] += usd
            stats["judge_tokens"] += tokens

        async def rubric(prompt: RLPrompt) -> None:
            body = {"model": self.cfg.model, "messages": rubric_messages(prompt.text), "temperature": 0.0,
                    "response_format": {"type": "json_object"}, "max_completion_tokens": RUBRIC_TOKENS}
            content, tokens, usd = await self._ask(sender, ledger, body, f"rubric-{step}", 0, 0, lock)
            try:
                questions = read_rubric(content)
            except ValueError as err:
                raise JudgeStopped(f"{err} (prompt {prompt.text[:60]!r}): give that prompt a \"rubric\" in the "
                                   "prompt file, or use another judge model") from None
            book({"kind": "rubric", "prompt": prompt.text, "questions": questions}, tokens, usd)
            self.rubrics[prompt.text] = questions

        async def verdict(url: str, width: int, height: int, key: str, question: str) -> None:
            body = {"model": self.cfg.model, "messages": answer_messages(question, url, self.cfg.detail),
                    "temperature": 0.0, "max_completion_tokens": ANSWER_TOKENS}
            content, tokens, usd = await self._ask(sender, ledger, body, f"answer-{step}", width, height, lock)
            yes = read_answer(content)
            book({"kind": "answer", "key": key, "yes": yes}, tokens, usd)
            self.answers[key] = yes

        try:
            todo = {p.text: p for p in prompts if not p.rubric and p.text not in self.rubrics}
            await gather_all([rubric(p) for p in todo.values()])
            asks, keys = [], []
            for prompt, image in zip(prompts, images):
                url, width, height, digest = image_url(image, self.cfg.upscale)
                mine = []
                for question in prompt.rubric or self.rubrics[prompt.text]:
                    key = answer_key(digest, question)
                    mine.append(key)
                    if key in self.answers:
                        stats["judge_cached"] += 1
                    else:
                        asks.append(verdict(url, width, height, key, question))
                keys.append(mine)
            await gather_all(asks)
        finally:
            await client.close()
        rewards = []
        for mine in keys:
            verdicts = [self.answers[k] for k in mine]
            stats["judge_unreadable"] += sum(v is None for v in verdicts)
            rewards.append(sum(v is True for v in verdicts) / len(verdicts))  # unreadable counts as no
        self.last = {**stats, "judge_usd_total": self.spent}
        return rewards

    def score(self, prompts: Sequence[RLPrompt], images: Sequence[Image.Image], step: int = 0) -> list[float]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        return asyncio.run(self._run(prompts, images, step))
