"""The curation funnel, its terminal and JSON forms, the HTML helpers and DATA/reports/curation.html, on a small
synthetic manifest whose images lie in two tiny webdataset-style tars."""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from common.html import figure_tag, image_tag, new_figure, page, table_html, write_page
from curation.config import CurateConfig
from curation.funnel import format_funnel, funnel, write_funnel_json
from curation.manifest import MANIFEST_SCHEMA, REJECT_REASONS, SCORE_COLUMNS, make_key
from curation.report import write_report

# (status, reject_reason or None = kept, has image bytes, width, height), in manifest order.
ROWS = [
    ("failed_download", "unsafe_url", False, None, None),
    ("failed_download", "unsafe_url", False, None, None),
    ("failed_download", "failed_download", False, None, None),
    ("failed_download", "failed_download", False, None, None),
    ("failed_decode", "failed_decode", False, None, None),
    ("ok", "min_area", True, 64, 48),
    ("ok", "min_area", True, 100, 100),
    ("ok", "aspect", True, 1200, 400),
    ("ok", "blur", True, 512, 512),
    ("ok", "blur", True, 640, 480),
    ("ok", "blur", True, 480, 640),
    ("ok", "blur", True, 800, 600),
    ("ok", "luminance", True, 512, 512),
    ("ok", "duplicate", True, 512, 512),
    ("ok", None, True, 512, 512),
    ("ok", None, True, 768, 512),
    ("ok", None, True, 512, 768),
    ("ok", None, True, 1024, 1024),
]
EXPECTED = {"unsafe_url": 2, "failed_download": 2, "failed_decode": 1, "min_area": 2, "aspect": 1, "blur": 4,
            "luminance": 1, "duplicate": 1}
THUMBS = 3  # thumbs_per_reason: caps blur (4) and kept (4) at 3


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def data(tmp_path):
    """(DATA dir, manifest table): image rows alternate between two tars, members named like img2dataset's."""
    download = tmp_path / "download"
    download.mkdir()
    tars = {s: tarfile.open(download / s, "w") for s in ("00000.tar", "00001.tar")}
    rng = np.random.default_rng(0)
    cols = {name: [] for name in MANIFEST_SCHEMA.names}
    for i, (status, reason, has_img, w, h) in enumerate(ROWS):
        key = make_key(i)
        shard = member = None
        if has_img:
            shard, member = ("00000.tar", "00001.tar")[i % 2], f"{key}.jpg"
            for name, payload in ((member, _jpeg(i)), (f"{key}.json", b"{}")):  # sidecars are skipped
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tars[shard].addfile(info, io.BytesIO(payload))
        ok = status == "ok"
        row = {
            "key": key, "url": f"http://example.test/{i}.jpg", "alt_text": f"picture {i}", "status": status,
            "error": None if ok else f"{status} error {i}", "width": w, "height": h,
            "sha256": f"{i:064x}" if ok else None,
            "blur": float(rng.uniform(10, 5000)) if ok else None,
            "entropy": float(rng.uniform(2, 8)) if ok else None,
            "luminance": float(rng.uniform(0, 1)) if ok else None,
            "clip_score": None, "aesthetic": None, "nsfw": None, "watermark": None,
            "dup_of": make_key(14) if reason == "duplicate" else None,
            "keep": reason is None, "reject_reason": reason, "shard": shard, "member": member,
        }
        for name in cols:
            cols[name].append(row[name])
    for t in tars.values():
        t.close()
    table = pa.table(cols, schema=MANIFEST_SCHEMA)
    table = table.append_column("source_id", pa.array([f"s{i}" for i in range(len(ROWS))]))  # carried through
    return tmp_path, table


def test_funnel_counts_every_reason_in_order(data):
    _, table = data
    f = funnel(table)
    assert f["total"] == len(ROWS)
    assert list(f["reject_reasons"]) == list(REJECT_REASONS)  # order kept, zeros included
    assert f["reject_reasons"] == {r: EXPECTED.get(r, 0) for r in REJECT_REASONS}
    assert f["status"] == {"ok": 13, "failed_download": 4, "failed_decode": 1}
    assert f["kept"] == 4 and f["unexplained"] == 0
    assert f["kept"] + sum(f["reject_reasons"].values()) == f["total"]
    assert f["kept_fraction"] == pytest.approx(4 / len(ROWS))
    assert funnel(table.to_pandas()) == f  # a DataFrame gives the same answer


def test_funnel_text_reads_like_a_funnel(data):
    _, table = data
    text = format_funnel(funnel(table))
    lines = {line.split()[0]: line.split() for line in text.splitlines()[3:] if line[:1].isalpha()}
    assert lines["input"][1:] == ["18", "100.0%", "18"]
    assert lines["unsafe_url"][1:] == ["2", "11.1%", "16"]
    assert lines["duplicate"][-1] == "4"  # remaining after the last check = kept
    assert lines["entropy"][1] == "0"
    assert lines["kept"][1:] == ["4", "22.2%"]
    assert all(r in lines for r in REJECT_REASONS)


def test_funnel_json_round_trips(data, tmp_path):
    _, table = data
    f = funnel(table)
    path = write_funnel_json(f, tmp_path / "reports" / "funnel.json")
    assert json.loads(path.read_text()) == f
    assert [p.name for p in path.parent.iterdir()] == ["funnel.json"]  # no temp file left behind


def test_html_helpers_are_self_contained(tmp_path):
    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    chart = figure_tag(fig)
    assert chart.startswith('<img class="chart"') and "data:image/png;base64," in chart
    rgba = Image.new("RGBA", (300, 100), (255, 0, 0, 128))
    thumb = image_tag(rgba, max_side=64, title='a "quoted" <key>')
    assert 'width="64" height="21"' in thumb and "data:image/png" in thumb and "&lt;key&gt;" in thumb
    assert rgba.size == (300, 100)  # the caller's image is untouched
    assert "data:image/jpeg" in image_tag(Image.new("RGB", (10, 10)))
    i16 = image_tag(Image.fromarray(np.full((10, 10), 0x4000, np.uint16)))  # 16-bit gray: scaled, not clipped white
    thumb16 = Image.open(io.BytesIO(base64.b64decode(re.search(r"base64,([^\"]+)", i16).group(1))))
    assert abs(int(np.asarray(thumb16.convert("L")).mean()) - 0x40) <= 2
    table = table_html(pd.DataFrame({"a": [1, 2], "b": ["<x>", None]}))
    assert "&lt;x&gt;" in table and table.count("<tr>") == 3 and '<td class="num">2</td>' in table
    assert "<b>raw</b>" in table_html([{"h": "<b>raw</b>"}], html_columns=["h"])
    html = page("t", [("One", "<p>1</p>"), ("One", "<p>2</p>")])
    assert 'id="one"' in html and 'id="one-2"' in html and "<script" not in html
    path = write_page(tmp_path / "sub" / "p.html", "t", [("", "<p>x</p>")])
    assert path.read_text().startswith("<!DOCTYPE html>") and len(list(path.parent.iterdir())) == 1


def test_report_is_self_contained_with_every_thumbnail(data):
    data_dir, table = data
    cfg = CurateConfig()
    path = write_report(data_dir, table, cfg, thumbs_per_reason=THUMBS)
    assert path == data_dir / "reports" / "curation.html"
    html = path.read_text(encoding="utf-8")

    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?://""", html, re.IGNORECASE)
    assert "<script" not in html and "<link" not in html

    scored = [s for s in SCORE_COLUMNS if table[s].null_count < table.num_rows]
    charts = 1 + len(scored) + 1  # funnel, one histogram per score with values, the size scatter
    with_img = {r: n for r, n in EXPECTED.items() if r not in ("unsafe_url", "failed_download", "failed_decode")}
    thumbs = sum(min(n, THUMBS) for n in [*with_img.values(), 4])  # + kept
    assert html.count('<img class="chart"') == charts
    assert html.count("<img") == charts + thumbs
    assert html.count("data:image/jpeg;base64,") == thumbs

    f = funnel(table)
    for reason, n in f["reject_reasons"].items():  # the funnel table names every reason with its count
        assert re.search(rf'<td>{reason}</td><td class="num">{n}</td>', html), reason
    for i in (0, 2, 4):  # rows without bytes: URL and error listed instead of a thumbnail
        assert f"http://example.test/{i}.jpg" in html and f"error {i}<" in html
    assert "min_blur = 100" in html and "max_luminance = 0.98" in html  # thresholds named in the page
    assert 'title="0000000005\nmin_area\n64×48\nblur ' in html  # hover: key, reason, size, scores
    assert "source_id" not in html  # extra input columns ignored


def test_report_survives_a_missing_tar(data):
    data_dir, table = data
    (data_dir / "download" / "00001.tar").unlink()
    html = write_report(data_dir, table, CurateConfig(), thumbs_per_reason=THUMBS).read_text()
    assert "cannot read 00001.tar" in html
    assert html.count("data:image/jpeg;base64,") > 0  # the other tar still gives thumbnails
