"""Prices, cost, and the budget that never lets spent + in flight pass max_cost_usd."""

import warnings

import pytest

from captioning.config import CaptionConfig, Price
from captioning.ledger import Ledger, cost_usd, price_for, reservation_usd
from captioning.presets import PRESETS
from captioning.request import build_request
from captioning.tokens import image_tokens


def test_price_table_batch_and_overrides():
    assert price_for("gpt-4.1") == Price(input=2.0, output=8.0)
    assert price_for("gpt-4.1-mini", batch=True) == Price(input=0.2, output=0.8)
    assert price_for("gpt-4.1-nano-2025-04-14") == Price(input=0.1, output=0.4)  # dated snapshot
    assert cost_usd(price_for("gpt-4.1"), 1_000_000, 1_000_000) == pytest.approx(10.0)
    cfg = CaptionConfig(model="my-vlm", prices={"my-vlm": {"input": 1.0, "output": 3.0}})
    assert price_for("my-vlm", cfg) == Price(input=1.0, output=3.0)


def test_unknown_model_costs_zero_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert price_for("some-unknown-model-x") == Price(input=0, output=0)
        price_for("some-unknown-model-x")
    assert len([w for w in caught if "some-unknown-model-x" in str(w.message)]) == 1


def test_budget_counts_in_flight_reservations():
    ledger = Ledger(budget_usd=1.0)
    assert ledger.reserve(0.4) and ledger.reserve(0.4)
    assert not ledger.reserve(0.4) and ledger.exhausted  # 0.8 in flight + 0.4 > 1.0, though nothing is spent
    ledger.settle(0.4, 0.1)  # reservations are upper bounds: settling frees room for the next request
    assert ledger.reserve(0.4)
    ledger.settle(0.4, 0.15)
    ledger.settle(0.4, 0.15)
    assert ledger.spent == pytest.approx(0.4) and ledger.reserved == 0
    assert not Ledger(1.0, spent=0.9).reserve(0.2)  # what earlier runs spent counts
    assert Ledger(None).reserve(1e9)


def test_reservation_bounds_the_real_cost():
    cfg = CaptionConfig(model="gpt-4.1", detail="high")
    (body,) = build_request("k", "data:image/jpeg;base64,AA", ["dense"], PRESETS, cfg)
    est = reservation_usd(body, 768, 512, price_for("gpt-4.1"))
    # at least the image by the tile rule and the full completion cap
    assert est >= cost_usd(price_for("gpt-4.1"), image_tokens(768, 512, "high"), PRESETS["dense"].max_tokens)
    assert est < 0.01
