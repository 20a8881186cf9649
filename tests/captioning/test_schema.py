"""captioning/schema.py: captions identified by (key, variant, model, prompt_id); which captions a stage reads
(`choose_sources`); parts written before `served_model` existed still read."""

from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captioning.presets import PRESETS
from captioning.schema import CAPTIONS_SCHEMA, captions_dir, choose_sources, latest_captions, read_captions, write_part

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DENSE = PRESETS["dense"].prompt_id


def row(key, model, prompt_id=DENSE, status="ok", t=0, text=None, variant="dense") -> dict:
    return {"key": key, "variant": variant, "text": text or f"{key} by {model}", "model": model,
            "prompt_id": prompt_id, "status": status, "created_at": T0 + timedelta(seconds=t), "cost_usd": 0.01}


def write(data, name, rows):
    write_part(captions_dir(data) / f"part-{name}.parquet", rows)


def test_latest_keeps_one_row_per_source_and_sources_pick_one(tmp_path):
    write(tmp_path, "a", [row("k1", "m-a"), row("k1", "m-a", status="error", t=5, text="x"), row("k2", "m-a")])
    write(tmp_path, "b", [row("k1", "m-b", status="error", t=1), row("k1", "m-b", t=2)])
    latest = latest_captions(tmp_path).to_pandas()
    assert sorted(zip(latest["key"], latest["model"], latest["status"])) == [
        ("k1", "m-a", "ok"), ("k1", "m-b", "ok"), ("k2", "m-a", "ok")]  # the ok row wins over a later error
    picked = latest_captions(tmp_path, {"dense": ("m-b", DENSE)}).to_pandas()
    assert picked[["key", "text"]].values.tolist() == [["k1", "k1 by m-b"]]


def test_choose_sources_takes_the_only_one_and_refuses_to_guess_between_several(tmp_path):
    write(tmp_path, "a", [row("k1", "m-a"), row("k2", "m-a"), row("k1", "m-a", variant="short", prompt_id="s@1")])
    assert choose_sources(tmp_path, ["dense", "short"]) == {"dense": ("m-a", DENSE), "short": ("m-a", "s@1")}
    write(tmp_path, "b", [row("k1", "m-b")])
    with pytest.raises(ValueError, match=r"several captioners \(m-a: 2, m-b: 1\).*caption_model"):
        choose_sources(tmp_path, ["dense"])
    assert choose_sources(tmp_path, ["dense"], model="m-b") == {"dense": ("m-b", DENSE)}
    # A model with no captions yet: its keys are skipped, never filled from another model.
    assert choose_sources(tmp_path, ["dense"], model="m-c") == {"dense": ("m-c", DENSE)}
    assert latest_captions(tmp_path, choose_sources(tmp_path, ["dense"], model="m-c")).num_rows == 0
    assert choose_sources(tmp_path, ["never"]) == {}


def test_choose_sources_prefers_the_current_preset_among_prompt_versions(tmp_path):
    write(tmp_path, "a", [row("k1", "m", prompt_id="dense@old"), row("k1", "m")])
    assert choose_sources(tmp_path, ["dense"]) == {"dense": ("m", DENSE)}
    write(tmp_path, "b", [row("k1", "m", variant="mine", prompt_id="mine@1"),
                          row("k1", "m", variant="mine", prompt_id="mine@2")])
    with pytest.raises(ValueError, match=r"several prompts .*caption_prompts"):
        choose_sources(tmp_path, ["mine"])
    assert choose_sources(tmp_path, ["mine"], prompt_ids={"mine": "mine@2"}) == {"mine": ("m", "mine@2")}


def test_a_part_written_before_served_model_reads_with_nulls(tmp_path):
    old = pa.Table.from_pylist([row("k1", "m")], schema=CAPTIONS_SCHEMA).drop_columns(["served_model"])
    captions_dir(tmp_path).mkdir(parents=True)
    pq.write_table(old, captions_dir(tmp_path) / "part-old.parquet")
    write(tmp_path, "new", [row("k2", "m") | {"served_model": "m-2026-01-01"}])
    rows = read_captions(tmp_path).to_pandas().set_index("key")
    assert rows["served_model"].to_dict() == {"k1": None, "k2": "m-2026-01-01"}
    assert read_captions(tmp_path, columns=["key", "served_model"]).num_rows == 2
    assert len(pd.read_parquet(captions_dir(tmp_path))) == 2
