"""Machine-readable rows from the bench scripts, for BENCHMARKS.md (bench/write_benchmarks.py).

    emit([row("caption", "requests/s at 64 in flight", 293.8, "req/s", peer=320, peer_name="ceiling 64 / 0.2 s",
              goal=">= 0.8")])

Each script still prints its own figures; `emit` appends the same figures as JSON lines to the file named by
LENSFORGE_BENCH_JSON and does nothing when it is unset, so a script run by hand behaves as before.
"""

from __future__ import annotations

import json
import math
import os

ENV = "LENSFORGE_BENCH_JSON"


def row(stage: str, figure: str, value: float, unit: str, *, peer: float | None = None, peer_name: str = "",
        ratio: float | None = None, goal: str = "", goal_of: str = "ratio", note: str = "") -> dict:
    """One figure. `ratio` defaults to value / peer. `goal` is "<op> <number>" (">= 0.9", "<= 2") on the ratio,
    or on the value with goal_of="value"."""
    if ratio is None and peer:
        ratio = value / peer
    return {"stage": stage, "figure": figure, "value": _finite(value), "unit": unit, "peer": _finite(peer),
            "peer_name": peer_name, "ratio": _finite(ratio), "goal": goal, "goal_of": goal_of, "note": note}


def emit(rows: list[dict]) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)
