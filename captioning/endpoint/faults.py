"""The endpoint's fault and latency settings and the seeded draw of each request's outcome.

    faults = Faults(rate_429=0.1, latency_s=0.2, seed=1)
    injector = FaultInjector(faults)
    injector.next_outcome()          # "ok" / "429" / ... : the script first, then one uniform draw per request
    injector.update({"script": ["429", "ok"], "retry_after_s": 1})

The same field names are the `start_endpoint(**options)` keywords, the `serve-captioner` flags (`--rate-429`) and
the JSON of `POST /_lensforge/faults`. Outcomes are drawn in arrival order from one `random.Random(seed)`, so the
same requests in the same order meet the same faults.
"""

from __future__ import annotations

import random
import threading
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Outcome = Literal["ok", "429", "500", "timeout", "malformed", "refusal", "truncate", "empty", "401"]
OUTCOMES: tuple[str, ...] = Outcome.__args__
# Rate fields in the order their intervals are laid out on [0, 1) for the per-request draw.
RATE_OUTCOMES: dict[str, str] = {
    "rate_429": "429", "rate_500": "500", "rate_timeout": "timeout", "rate_malformed": "malformed",
    "rate_refusal": "refusal", "rate_truncate": "truncate", "rate_empty": "empty",
}


class Faults(BaseModel):
    """What the endpoint does to requests, besides captioning them. All zero by default: a well-behaved server."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    latency_s: float = Field(0.0, ge=0, description="fixed latency added to every chat request (seconds)")
    latency_jitter_s: float = Field(0.0, ge=0, description="plus a uniform random 0..this (seconds)")
    rate_429: float = Field(0.0, ge=0, le=1, description="fraction answered 429 with Retry-After")
    rate_500: float = Field(0.0, ge=0, le=1, description="fraction answered 500")
    rate_timeout: float = Field(0.0, ge=0, le=1, description="fraction that sleep timeout_sleep_s before answering")
    rate_malformed: float = Field(0.0, ge=0, le=1, description="fraction answered 200 with a body that is not JSON")
    rate_refusal: float = Field(0.0, ge=0, le=1, description="fraction answered with a refusal as the content")
    rate_truncate: float = Field(0.0, ge=0, le=1, description="fraction cut mid-sentence, finish_reason length")
    rate_empty: float = Field(0.0, ge=0, le=1, description='fraction answered with content ""')
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After of a 429 (seconds)")
    timeout_sleep_s: float = Field(30.0, ge=0, description="how long a 'timeout' request sleeps (seconds)")
    script: list[Outcome] = Field(default_factory=list,
                                  description="outcomes forced on the next requests, in arrival order, before rates")
    seed: int = Field(0, description="seed of the outcome, jitter and batch-failure draws")
    batch_fail_rate: float = Field(0.0, ge=0, le=1, description="fraction of batch lines that go to the error file")
    batch_status: Literal["completed", "failed", "expired", "cancelled"] | None = Field(
        None, description="force a batch's final status (expired/cancelled process the first half of the lines)")
    batch_delay_s: float = Field(0.0, ge=0, description="time a batch stays in_progress before its lines run")

    @model_validator(mode="after")
    def _rates_fit(self) -> Faults:
        total = sum(getattr(self, name) for name in RATE_OUTCOMES)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {total:.3f}; they must add up to at most 1")
        return self


class FaultInjector:
    """The active `Faults` and the seeded draws over them; thread-safe (the CLI, tests and handlers share it)."""

    def __init__(self, faults: Faults | None = None):
        self._baseline = (faults or Faults()).model_copy(deep=True)
        self._lock = threading.Lock()
        self.reset()

    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults.model_copy(deep=True)

    def reset(self) -> Faults:
        """Back to the settings the server started with, script and random streams included."""
        with self._lock:
            self._faults = self._baseline.model_copy(deep=True)
            self._reseed()
            return self._faults.model_copy(deep=True)

    def update(self, changes: dict) -> Faults:
        """Merge `changes` (field names of `Faults`) into the active settings; a new `script` replaces the pending
        one, a new `seed` restarts the random streams. Raises pydantic.ValidationError on a bad field."""
        with self._lock:
            merged = Faults.model_validate({**self._faults.model_dump(), **changes})
            self._faults = merged
            if "seed" in changes:
                self._reseed()
            return merged.model_copy(deep=True)

    def _reseed(self) -> None:
        seed = self._faults.seed
        self._outcomes = random.Random(seed)
        self._jitter = random.Random(seed + 1)

    def next_outcome(self) -> str:
        """The outcome of the next request: the script's head if any, else one draw against the rates."""
        with self._lock:
            if self._faults.script:
                return self._faults.script.pop(0)
            u = self._outcomes.random()
            edge = 0.0
            for name, outcome in RATE_OUTCOMES.items():
                edge += getattr(self._faults, name)
                if u < edge:
                    return outcome
            return "ok"

    def latency(self) -> float:
        """Seconds to wait before answering this request."""
        with self._lock:
            jitter = self._faults.latency_jitter_s
            return self._faults.latency_s + (self._jitter.random() * jitter if jitter else 0.0)

    def batch_line_fails(self, custom_id: str, attempt: int) -> bool:
        """Whether a batch line fails: drawn from (seed, custom_id, attempt), so the same input fails the same way
        on every run, and a line resubmitted in a later batch gets a fresh draw (retries converge)."""
        rate = self._faults.batch_fail_rate
        return rate > 0 and random.Random(f"{self._faults.seed}:{custom_id}:{attempt}").random() < rate
