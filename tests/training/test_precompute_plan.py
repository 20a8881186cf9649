"""training/precompute_plan.py's candidates: precompute reads one captioner's captions (precompute.caption_model),
never a mix, and a key that captioner has not captioned is skipped with that reason."""

from datetime import datetime, timezone

import pandas as pd
import pytest

from captioning.presets import PRESETS
from captioning.schema import captions_dir, write_part
from curation.manifest import MANIFEST_COLUMNS, make_key
from curation.pipeline import write_manifest
from training.precompute_plan import caption_column, caption_sources, read_candidates

DENSE = PRESETS["dense"].prompt_id
KEYS = [make_key(i) for i in range(3)]


@pytest.fixture
def data(tmp_path):
    rows = [{"key": k, "url": f"http://127.0.0.1/{k}.jpg", "alt_text": f"alt {k}", "status": "ok", "width": 64,
             "height": 64, "keep": True, "shard": "00000.tar", "member": f"{k}.jpg"} for k in KEYS]
    write_manifest(pd.DataFrame(rows).reindex(columns=list(MANIFEST_COLUMNS)), tmp_path)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    captions = [{"key": k, "variant": "dense", "text": f"{k} by {m}", "model": m, "prompt_id": DENSE,
                 "status": "ok", "created_at": now} for m, keys in (("old", KEYS), ("new", KEYS[:2])) for k in keys]
    write_part(captions_dir(tmp_path) / "part-a.parquet", captions)
    return tmp_path


def test_the_configured_captioner_is_read_and_its_gaps_are_skipped(data):
    sources = caption_sources(data, ["dense", "alt"], model="new")
    rows, skipped = read_candidates(data, ["dense", "alt"], sources)
    assert rows[caption_column("dense")].tolist() == [f"{k} by new" for k in KEYS[:2]]
    assert rows[caption_column("alt")].tolist() == [f"alt {k}" for k in KEYS[:2]]
    assert skipped == {f"dense: not captioned by new ({DENSE})": 1}
    rows, _ = read_candidates(data, ["dense"], caption_sources(data, ["dense"], model="old"))
    assert rows[caption_column("dense")].tolist() == [f"{k} by old" for k in KEYS]


def test_two_captioners_and_none_configured_is_refused(data):
    with pytest.raises(ValueError, match="several captioners"):
        read_candidates(data, ["dense"])
    assert caption_sources(data, ["alt"]) == {}  # alt needs no captioner
