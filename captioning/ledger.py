"""What captioning costs, and the budget that stops it cleanly before `max_cost_usd` is exceeded.

Every request reserves an upper-bound estimate of its cost when it starts (prompt tokens from the tile rule with a
margin, completion tokens at the preset's cap) and settles with the actual usage when it ends; a request that
cannot reserve is not sent. So spent + in flight never passes the budget, however many requests are in flight.

One worker (in-process) books against a `LocalBudget`; with several Ray workers, the budget lives in one
`LedgerActor` and each worker leases blocks of it (`LeasedBudget`) so that a request costs no round trip to the actor.
"""

from __future__ import annotations

import warnings
from collections import Counter

from captioning.config import CaptionConfig, Price

# USD per 1M tokens, standard (synchronous) tier. Source: https://openai.com/api/pricing/ (and
# platform.openai.com/docs/pricing), read 2025-06. Override or extend with `caption.prices` in the config.
PRICES: dict[str, Price] = {
    "gpt-4.1": Price(input=2.00, output=8.00),
    "gpt-4.1-mini": Price(input=0.40, output=1.60),
    "gpt-4.1-nano": Price(input=0.10, output=0.40),
}
BATCH_DISCOUNT = 0.5  # the Batch API bills half the standard price (same page)
PROMPT_MARGIN = 1.15  # estimated prompt tokens × this when reserving: the tile rule and tokenizer are estimates

_warned: set[str] = set()


def prior_spend(data) -> float:
    """USD already spent on DATA/captions by earlier runs (every attempt row, any model)."""
    import pyarrow.compute as pc

    from captioning.schema import read_captions

    total = pc.sum(read_captions(data, columns=["cost_usd"])["cost_usd"]).as_py()
    return float(total or 0.0)


def price_for(model: str, cfg: CaptionConfig | None = None, batch: bool = False) -> Price:
    """The configured price, else the built-in one (dated snapshots like gpt-4.1-2025-04-14 match their base);
    an unknown model costs 0, with one warning."""
    table = {**PRICES, **(cfg.prices if cfg else {})}
    price = table.get(model) or next((table[m] for m in sorted(table, key=len, reverse=True)
                                      if model.startswith(m + "-2")), None)
    if price is None:
        if model not in _warned:
            _warned.add(model)
            warnings.warn(f"no price known for model {model!r}: costs count as 0 (set caption.prices.{model})",
                          stacklevel=2)
        price = Price(input=0.0, output=0.0)
    if batch:
        price = Price(input=price.input * BATCH_DISCOUNT, output=price.output * BATCH_DISCOUNT)
    return price


def cost_usd(price: Price, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price.input + completion_tokens * price.output) / 1e6


class Ledger:
    """Spent and reserved dollars against an optional budget. Not thread-safe: one event loop (or one actor)."""

    def __init__(self, budget_usd: float | None = None, spent: float = 0.0):
        self.budget = budget_usd
        self.spent = spent  # the budget covers the whole job: what earlier runs spent counts (prior_spend)
        self.reserved = 0.0
        self.exhausted = False  # the last reservation was refused

    def reserve(self, amount: float) -> bool:
        """False when `amount` does not fit; a caller with requests in flight may wait for them and try again
        (their reservations are upper bounds, so settling them frees room)."""
        self.exhausted = self.budget is not None and self.spent + self.reserved + amount > self.budget
        if not self.exhausted:
            self.reserved += amount
        return not self.exhausted

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual


class LocalBudget(Ledger):
    """The in-process budget (workers: 1), which also drives the progress bar (a tqdm bar, or None)."""

    def __init__(self, budget_usd: float | None, bar=None, spent: float = 0.0):
        super().__init__(budget_usd, spent)
        self.bar, self.done, self.prior = bar, Counter(), spent

    def count(self, status: str, n: int = 1) -> None:
        self.done[status] += n
        if self.bar is not None:
            self.bar.update(n)
            done = " ".join(f"{k}={v}" for k, v in self.done.items())
            self.bar.set_postfix_str(f"${self.spent - self.prior:.4f} {done}", refresh=False)

    def flush(self, final: bool = False) -> None:
        """Nothing to report: the bar is updated as rows come (LeasedBudget reports to its actor here)."""


class LedgerActor:
    """The shared budget of all Ray workers (wrapped with ray.remote by the pipeline), plus their progress."""

    def __init__(self, budget_usd: float | None = None, spent: float = 0.0):
        self.ledger = Ledger(budget_usd, spent)
        self.done: dict[str, int] = {}

    def grant(self, amount: float) -> float:
        """Reserve a block for one worker; 0 when the budget cannot cover it."""
        return amount if self.ledger.reserve(amount) else 0.0

    def report(self, released: float, spent: float, counts: dict[str, int]) -> None:
        """A worker gives back `released` of its blocks and books `spent`; counts are its new rows by status."""
        self.ledger.settle(released, spent)
        for status, n in counts.items():
            self.done[status] = self.done.get(status, 0) + n

    def state(self) -> dict:
        return {"spent": self.ledger.spent, "reserved": self.ledger.reserved,
                "exhausted": self.ledger.exhausted, "done": dict(self.done)}


class LeasedBudget:
    """A worker's view of the shared ledger: reserves from a local block, leasing a new one when it runs dry."""

    def __init__(self, actor, block_requests: int):
        self.actor, self.block = actor, max(1, block_requests)  # a lease covers this many requests
        self.allowance = 0.0  # leased, not yet reserved by a request
        self.spent = 0.0  # this worker's total
        self._unreported = [0.0, 0.0, {}]  # released, spent, counts

    def reserve(self, amount: float) -> bool:
        import ray  # a blocking call, but only once per lease of `block` requests

        if self.allowance < amount:
            want = max(amount - self.allowance, amount * self.block)
            got = ray.get(self.actor.grant.remote(want)) or ray.get(self.actor.grant.remote(amount - self.allowance))
            if not got:
                return False
            self.allowance += got
        self.allowance -= amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        # The request's reservation becomes `actual` spent; the rest goes back to the local allowance.
        self.allowance += reserved - actual
        self.spent += actual
        self._unreported[1] += actual

    def count(self, status: str, n: int = 1) -> None:
        counts = self._unreported[2]
        counts[status] = counts.get(status, 0) + n

    def flush(self, final: bool = False) -> None:
        """Book what was spent with the actor; at the end, hand the unused allowance back."""
        released, spent, counts = self._unreported
        if final:
            released, self.allowance = released + max(self.allowance, 0.0), 0.0
        released += spent  # the actor holds spent dollars as reserved until told
        self.actor.report.remote(released, spent, counts)
        self._unreported = [0.0, 0.0, {}]


def prompt_tokens_estimate(body: dict, width: int, height: int) -> int:
    """Prompt tokens of a chat.completions body: the image by the tile rule, text at captioning.tokens' rate."""
    from captioning.tokens import image_tokens, text_tokens

    prompt = 0
    for message in body["messages"]:
        parts = message["content"] if isinstance(message["content"], list) else [{"text": message["content"]}]
        for part in parts:
            if "image_url" in part:
                prompt += image_tokens(width, height, part["image_url"].get("detail", "auto"))
            else:
                prompt += text_tokens(part.get("text", "")) + MESSAGE_OVERHEAD_TOKENS
    return prompt


MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per message part (OpenAI's cookbook counts 3-4)


def reservation_usd(body: dict, width: int, height: int, price: Price) -> float:
    """An upper bound of one request's cost: its prompt (with a margin) and its completion cap."""
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return cost_usd(price, int(prompt_tokens_estimate(body, width, height) * PROMPT_MARGIN) + 1, cap)
