"""Caption statistics on a small synthetic captions table, with the numbers worked out by hand, and
DATA/reports/captions.html written self-contained with thumbnails read from a webdataset-style tar."""

from __future__ import annotations

import io
import re
import tarfile
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from captioning.schema import CAPTIONS_SCHEMA, captions_dir
from captioning.stats import caption_stats, format_stats, noun_count, nouns, words, write_captions_report
from curation.manifest import MANIFEST_SCHEMA, manifest_dir

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

# (key, variant, status, text), in attempt order; every row costs $0.01.
ROWS = [
    ("k0", "dense", "ok", "A red circle and two blue squares."),  # 7 words; nouns circle, squares
    ("k1", "dense", "ok", "Three stars on a white background."),  # 6 words; nouns stars, background
    ("k2", "dense", "refused", None),
    ("k3", "dense", "error", None),
    ("k3", "dense", "error", None),  # a second failed attempt: latest is still error
    ("k4", "dense", "error", None),
    ("k4", "dense", "ok", "A dog sits beside a tree"),  # 6 words; nouns dog, tree
    ("k0", "short", "ok", "A red circle."),  # 3 words; 1 noun
    ("k1", "short", "ok", "Stars."),  # 1 word; 1 noun
]


def _write_captions(data, rows=ROWS):
    records = [
        {"key": k, "variant": v, "text": t, "model": "m", "prompt_id": f"{v}@x", "prompt_tokens": 10,
         "completion_tokens": 5, "cost_usd": 0.01, "latency_s": 0.5, "status": s,
         "error": None if s == "ok" else s, "created_at": T0 + timedelta(seconds=i)}
        for i, (k, v, s, t) in enumerate(rows)
    ]
    captions_dir(data).mkdir(parents=True, exist_ok=True)
    # two parts, as two runs would leave them
    pq.write_table(pa.Table.from_pylist(records[:4], schema=CAPTIONS_SCHEMA), captions_dir(data) / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(records[4:], schema=CAPTIONS_SCHEMA), captions_dir(data) / "part-b.parquet")


def _jpeg(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _write_manifest(data):
    """k0, k1 and k4 have bytes in one tar; k2 and k3 failed to download (no shard)."""
    (data / "download").mkdir(parents=True)
    with tarfile.open(data / "download" / "00000.tar", "w") as tar:
        for i, key in enumerate(["k0", "k1", "k4"]):
            payload = _jpeg(i)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    rows = [{"key": k, "status": "ok", "keep": True, "shard": "00000.tar", "member": f"{k}.jpg"}
            for k in ("k0", "k1", "k4")]
    rows += [{"key": k, "status": "failed_download", "keep": False} for k in ("k2", "k3")]
    manifest_dir(data).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest_dir(data) / "part-00000.parquet")


def test_words_and_noun_proxy():
    assert words("A red-orange star's edge, 3 CATS!") == ["a", "red-orange", "star's", "edge", "3", "cats"]
    vocab = nouns()
    assert {"circle", "square", "triangle", "star", "dog"} <= vocab
    assert noun_count(words("Two circles, three boxes and a dog near trees"), vocab) == 4  # circles boxes dog trees
    assert noun_count(words("Bright and colourful"), vocab) == 0


def test_caption_stats_by_hand(tmp_path):
    _write_captions(tmp_path)
    stats = caption_stats(tmp_path)
    assert list(stats) == ["dense", "short"]

    d = stats["dense"]
    assert (d["count"], d["ok"], d["refused"], d["error"], d["attempts"]) == (5, 3, 1, 1, 7)
    assert d["refusal_rate"] == pytest.approx(0.2) and d["error_rate"] == pytest.approx(0.2)
    assert d["cost_usd"] == pytest.approx(0.07)  # every attempt is paid for
    assert d["words_mean"] == pytest.approx(19 / 3)  # 7, 6, 6
    assert d["words_median"] == 6
    assert d["words_p5"] == pytest.approx(6.0)  # numpy's linear interpolation over [6, 6, 7]
    assert d["words_p95"] == pytest.approx(6.9)
    assert d["words_hist"] == {"edges": list(range(9)), "counts": [0, 0, 0, 0, 0, 0, 2, 1]}
    # a red circle and two blue squares three stars on white background dog sits beside tree
    assert d["vocabulary"] == 16
    assert d["nouns_per_caption"] == pytest.approx(2.0)

    s = stats["short"]
    assert (s["count"], s["ok"], s["refusal_rate"], s["error_rate"]) == (2, 2, 0.0, 0.0)
    assert (s["words_mean"], s["words_median"], s["vocabulary"], s["nouns_per_caption"]) == (2.0, 2.0, 4, 1.0)
    assert s["cost_usd"] == pytest.approx(0.02)

    text = format_stats(stats)
    assert text.splitlines()[0].startswith("variant") and "dense" in text and "short" in text
    assert "total cost $0.0900" in text


def test_no_captions(tmp_path):
    assert caption_stats(tmp_path) == {}
    assert format_stats({}) == "no captions yet"


def test_report_is_self_contained(tmp_path):
    _write_captions(tmp_path)
    _write_manifest(tmp_path)
    path = write_captions_report(tmp_path, samples=10)
    assert path == tmp_path / "reports" / "captions.html"
    html = path.read_text()
    assert "<script" not in html and not re.search(r'(src|href)="(?!data:|#)', html)  # nothing external
    assert len(re.findall(r'<img class="chart"', html)) == 2  # one words-per-caption histogram per variant
    assert len(re.findall(r'src="data:image/jpeg;base64,', html)) == 3  # thumbnails of k0, k1, k4
    # samples: every key with an ok caption (k0, k1, k4), with its captions
    for text in ("A red circle and two blue squares.", "Stars.", "A dog sits beside a tree"):
        assert text in html
    assert "nouns/caption" in html and "proxy" in html
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
