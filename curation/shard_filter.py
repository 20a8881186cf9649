"""The filter step over one downloaded shard: decode, pixel filters, one CLIP pass, hashes for dedup.

Input: DATA/download/{shard}.tar + {shard}.parquet (img2dataset). Output: DATA/filtered/{shard}.parquet, one row
per URL of the shard, and DATA/filtered/_done/{shard}.json (counts per reason, the worker's node, the config hash,
the download's stamp, the part's size) — written last, so it marks the shard done. A rerun skips a done shard only
while its part is there with the size the marker records, the filter config is the same and the download shard is
the one it filtered; otherwise it filters it again. Markers sit under `_done/`, which Parquet readers skip, so
`pd.read_parquet("DATA/filtered")` reads the parts alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_path
from curation.config import CurateConfig
from curation.download import KEY_COLUMN, download_stamp
from curation.input_shards import refusals
from curation.manifest import SCORE_COLUMNS, STATUS_FAILED_DECODE, STATUS_FAILED_DOWNLOAD, STATUS_OK
from curation.markers import marker_path, read_marker, stale_reason, write_marker
from curation.markers import read_markers  # noqa: F401 — bench/curate.py reads the filtered markers from here
from curation.pixel_filters import decode, image_hashes, pixel_reason, pixel_scores, thumbnail
from curation.safety import UNSAFE_PREFIX

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

FILTERED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        *[(c, pa.float32()) for c in SCORE_COLUMNS],  # curation/filters.py's chain order
        ("reject_reason", pa.string()),
        ("shard", pa.string()),
        ("member", pa.string()),
        ("exact_hash", pa.string()),
        ("phash", pa.int64()),
        ("thumb", pa.binary()),  # (8, 8, 3) uint8: confirms pHash pairs in dedup
        ("embedding", pa.list_(pa.float32())),
    ]
)


def filter_config_hash(cfg: CurateConfig) -> str:
    """Everything that changes a filtered shard; a rerun with another value redoes the shard (not the download)."""
    relevant = cfg.model_dump(exclude={"allow_hosts", "url_col", "caption_col", "dedup"})
    relevant["download"] = {"max_pixels": cfg.download.max_pixels}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def shard_done(filtered_dir: Path, shard: str, cfg_hash: str, download: str | None) -> bool:
    """Done when the marker says this config and this download of the shard (`download_stamp`), and the part it
    vouches for is there with the size it recorded; a changed download or part is filtered again, and said so."""
    record = read_marker(marker_path(filtered_dir, shard))
    if record is None or record.get("config_hash") != cfg_hash:
        return False
    if record.get("download_stamp") != download:
        print(f"curate: filtered shard {shard}: made from an earlier download of the shard; filtering that shard again")
        return False
    problem = stale_reason(record, filtered_dir)
    if problem:
        print(f"curate: filtered shard {shard}: {problem}; filtering that shard again")
        return False
    return True


def _clean_error(error: str) -> str:
    """urllib wraps connect-time errors as '<urlopen error ...>'; keep the message itself."""
    if error.startswith("<urlopen error ") and error.endswith(">"):
        return error[len("<urlopen error ") : -1]
    return error


def _download_row(meta: dict, shard: str, refused: dict[str, str]) -> dict:
    """A filtered row from img2dataset's record of one URL, before decoding; `refused`: key → the guard's reason
    (input_shards.py), which such a row's error is."""
    row = {name: None for name in FILTERED_SCHEMA.names}
    row.update(key=meta[KEY_COLUMN], sha256=meta.get("sha256"), shard=f"{shard}.tar")
    if row["key"] in refused:
        row.update(status=STATUS_FAILED_DOWNLOAD, error=refused[row["key"]], reject_reason="unsafe_url", shard=None)
    elif meta["status"] != "success":
        error = _clean_error(meta.get("error_message") or "download failed")
        row.update(status=STATUS_FAILED_DOWNLOAD, error=error)
        row["reject_reason"] = "unsafe_url" if error.startswith(UNSAFE_PREFIX) else "failed_download"
        row["shard"] = None
    return row


def _decode_and_score(row: dict, data: bytes, cfg: CurateConfig) -> np.ndarray | None:
    """Fill pixel scores, hashes and the pixel verdict into `row`; the image if it may go on to CLIP."""
    try:
        img = decode(data, cfg.download.max_pixels)  # (H, W, 3) uint8; header checked before decoding
    except ValueError as err:
        row.update(status=STATUS_FAILED_DECODE, error=str(err), reject_reason="failed_decode", shard=None, member=None)
        return None
    height, width = img.shape[:2]
    scores = pixel_scores(img)
    row.update(status=STATUS_OK, width=width, height=height, **scores)
    row["exact_hash"], row["phash"] = image_hashes(img)
    row["thumb"] = thumbnail(img)
    row["reject_reason"] = pixel_reason(width, height, scores, cfg)
    return img if row["reject_reason"] is None else None


class ShardFilter:
    """Filters whole shards; one per Ray actor, so the CLIP model (if any) loads once per worker, lazily."""

    def __init__(self, data: str, cfg: CurateConfig):
        self.data, self.cfg = Path(data), cfg
        self.scorer = None
        if cfg.models.clip_model:  # torch and open_clip load only where a model filter runs
            from curation.model_filters import ClipScorer

            self.scorer = ClipScorer(cfg.models)

    def _score_batch(self, rows: list[dict], images: list[np.ndarray], alt: list[str]) -> None:
        from curation.model_filters import model_reason

        out = self.scorer(images, alt)
        for i, row in enumerate(rows):
            scores = {name: (None if out.get(name) is None else float(out[name][i])) for name in
                      ("clip_score", "aesthetic", "nsfw", "watermark")}
            row.update({k: (None if v is None or np.isnan(v) else v) for k, v in scores.items()})
            row["embedding"] = out["embedding"][i].astype(np.float32).tolist()
            row["reject_reason"] = model_reason(scores, self.cfg.models)

    def __call__(self, shard: str) -> dict:
        started = time.time()
        download_dir, filtered_dir = self.data / "download", self.data / "filtered"
        stamp = download_stamp(download_dir, shard)  # the download read here, for the marker
        metas = pq.read_table(download_dir / f"{shard}.parquet").to_pylist()
        by_i2d_key = {m["key"]: m for m in metas}
        refused = refusals(self.data, shard)
        rows = {m["key"]: _download_row(m, shard, refused) for m in metas}
        pending: tuple[list, list, list] = ([], [], [])  # rows, images, alt texts waiting for one CLIP batch
        with tarfile.open(download_dir / f"{shard}.tar") as tar:
            for member in tar:
                stem, ext = os.path.splitext(member.name)
                if ext.lower() not in IMAGE_EXTENSIONS or stem not in rows:
                    continue
                row = rows[stem]
                row["member"] = member.name
                img = _decode_and_score(row, tar.extractfile(member).read(), self.cfg)
                if img is not None and self.scorer is not None:
                    for buf, item in zip(pending, (row, img, by_i2d_key[stem].get("caption") or "")):
                        buf.append(item)
                    if len(pending[0]) >= self.cfg.models.batch_size:
                        self._score_batch(*pending)
                        pending = ([], [], [])
        if pending[0]:
            self._score_batch(*pending)
        for row in rows.values():  # a success img2dataset wrote no bytes for (should not happen): say so
            if row["status"] is None:
                row.update(status=STATUS_FAILED_DECODE, error="no image bytes in shard", reject_reason="failed_decode")
        return self._write(filtered_dir, shard, list(rows.values()), started, stamp)

    def _write(self, filtered_dir: Path, shard: str, rows: list[dict], started: float, stamp: str | None) -> dict:
        import ray

        filtered_dir.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=FILTERED_SCHEMA)
        with atomic_path(filtered_dir / f"{shard}.parquet", fsync=True) as tmp:  # its marker follows: state
            pq.write_table(table, tmp)
        stats = {
            "shard": shard,
            "rows": len(rows),
            "reasons": dict(Counter(r["reject_reason"] or "kept" for r in rows)),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "seconds": round(time.time() - started, 3),
            "config_hash": filter_config_hash(self.cfg),
            "download_stamp": stamp,
        }
        return write_marker(marker_path(filtered_dir, shard), stats, filtered_dir, [f"{shard}.parquet"])
