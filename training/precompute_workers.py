"""What precompute runs on Ray workers: decode + resize/crop tasks (CPU), the encoder actors, the probe.

    decode_batch(rows, data=..., max_pixels=...)   # pandas batch of plan rows → pixels of each row's bucket
    Encoder(cfg)(batch)                             # → packed samples (tensors.safetensors, meta.json) or errors
    Encoder(cfg).encode_shard(set_dir, data, shard) # one planned shard → its tar and done marker, written here
    probe_encoders(cfg, texts)                      # loaded identities + geometry + text lengths

Nothing here normalizes latents or templates text: `inference.codecs` and `inference.text` do, in the actor.
A row that fails (corrupt bytes, failed encode) leaves as a row with `error` set, never as an exception.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from curation.pixel_filters import decode
from training.buckets import Bucket, crop_box
from training.precompute_config import PrecomputeConfig
from training.precompute_output import ShardWriter
from training.precompute_plan import caption_column
from training.shard_format import canonical_json, pack_sample

RESAMPLE = "lanczos"  # PIL's, with its box filter below 3× (reducing_gap); recorded in encoders.json

OUT_COLUMNS = ["key", "shard", "sample", "meta", "error", "stage"]


def _bucket_of(row) -> Bucket:
    w, h = (int(x) for x in row["bucket"].split("x"))
    return Bucket(int(row["base"]), row["ratio"], w, h)


def resize_crop(img: np.ndarray, bucket: Bucket) -> tuple[np.ndarray, list[float]]:
    """(H, W, 3) uint8 → (bucket.height, bucket.width, 3) uint8: the centred crop box of the bucket's aspect,
    resized in one resampling pass (PIL's `box=`). Returns the crop box in the original's pixels."""
    height, width = img.shape[:2]
    box = crop_box(width, height, bucket)
    out = Image.fromarray(img).resize((bucket.width, bucket.height), Image.Resampling.LANCZOS, box=box,
                                      reducing_gap=3.0)
    return np.asarray(out), [round(v, 3) for v in box]


def _read(handles: dict, path: Path, offset: int, size: int) -> bytes:
    if path not in handles:
        handles[path] = open(path, "rb")
    f = handles[path]
    f.seek(offset)
    return f.read(size)


def decode_batch(rows: pd.DataFrame, data: str, max_pixels: int, variants: list[str]) -> pd.DataFrame:
    """Plan rows → `pixels` (bytes of the bucket-sized uint8 image, empty on error), `meta_json`, `error`."""
    download = Path(data) / "download"
    pixels, metas, errors = [], [], []
    handles: dict = {}
    try:
        for row in rows.to_dict("records"):
            bucket = _bucket_of(row)
            try:
                img = decode(_read(handles, download / row["shard_in"], row["offset"], row["size"]), max_pixels)
                out, box = resize_crop(img, bucket)
            except Exception as err:  # ValueError from decode; anything else from a broken file
                pixels.append(b"")
                metas.append("")
                errors.append(str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")
                continue
            captions = {v: row[caption_column(v)] for v in variants}
            meta = {"key": row["key"], "bucket": bucket.name, "base": bucket.base, "ratio": bucket.ratio,
                    "size": [int(img.shape[1]), int(img.shape[0])], "crop": box, "upscaled": bool(row["upscaled"]),
                    "variants": list(variants), "captions": captions}
            pixels.append(out.tobytes())
            metas.append(canonical_json(meta))
            errors.append(None)
    finally:
        for f in handles.values():
            f.close()
    return pd.DataFrame({"key": rows["key"].to_numpy(), "shard": rows["shard"].to_numpy(),
                         "bucket": rows["bucket"].to_numpy(), "pixels": pixels, "meta_json": metas, "error": errors})


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoders(cfg: PrecomputeConfig, device: str | None = None):
    from inference.codecs import load_codec
    from inference.text import load_text_encoder

    device = device or _device()
    codec = load_codec(cfg.codec, device=device, dtype=getattr(torch, cfg.codec_dtype))
    text = load_text_encoder(cfg.text_encoder, device=device, dtype=getattr(torch, cfg.text_encoder_dtype),
                             date=cfg.text_date)
    return codec, text


def probe_encoders(cfg: PrecomputeConfig, texts: dict[str, list[str]]) -> dict:
    """The loaded codec's and text encoder's identities (checked against the cache key by the driver), the codec's
    geometry, the feature width, and the token count of each sample text per variant (for the storage estimate)."""
    codec, encoder = load_encoders(cfg)
    lengths = {}
    for variant, sample in texts.items():
        lengths[variant] = []
        for start in range(0, len(sample), cfg.batch_size):
            _, mask = encoder.encode(sample[start:start + cfg.batch_size])
            lengths[variant] += mask.sum(1).tolist()
    return {"codec": codec.identity(), "text": encoder.identity(), "channels": codec.channels,
            "factor": codec.factor, "multiple": codec.multiple, "feature_dim": encoder.feature_dim,
            "lengths": lengths}


class Encoder:
    """One codec + text encoder per Ray actor (GPU when there is one); batches of decoded rows → packed samples;
    `encode_shard`: one planned shard → its tar and done marker."""

    def __init__(self, cfg: PrecomputeConfig):
        threads = os.environ.get("OMP_NUM_THREADS")  # Ray sets it from the actor's num_cpus
        if threads and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(threads)))
        self.cfg = cfg
        self.device = _device()
        self.codec, self.text = load_encoders(cfg, self.device)

    @torch.no_grad()
    def _latents(self, pixels: list[bytes], width: int, height: int) -> torch.Tensor:
        arr = np.stack([np.frombuffer(p, np.uint8).reshape(height, width, 3) for p in pixels])
        images = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
        return self.codec.encode(images).float().cpu()  # (B, C, H/f, W/f)

    def _texts(self, captions: list[str]) -> list[torch.Tensor]:
        """Per caption: (L, D) features where the mask is True."""
        features, mask = self.text.encode(captions)  # (B, L, D), (B, L)
        return [features[i][mask[i]] for i in range(len(captions))]

    def _encode(self, rows: list[dict]) -> list[dict]:
        """Rows of one bucket → packed samples; raises on any failure (the caller retries one by one)."""
        meta = [json.loads(r["meta_json"]) for r in rows]
        width, height = (int(x) for x in rows[0]["bucket"].split("x"))
        latents = self._latents([r["pixels"] for r in rows], width, height)
        per_variant = {v: self._texts([m["captions"][v] for m in meta]) for v in self.cfg.variants}
        out = []
        for i, r in enumerate(rows):
            texts = {v: per_variant[v][i] for v in self.cfg.variants}
            packed = pack_sample(r["key"], latents[i], meta[i], text=texts, text_dtype=self.cfg.text_dtype,
                                 latent_dtype=self.cfg.latent_dtype)
            out.append({"sample": packed["tensors.safetensors"], "meta": packed["meta.json"], "error": None})
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        results: list[dict | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            if isinstance(r["error"], str):
                results[i] = {"sample": b"", "meta": b"", "error": r["error"], "stage": "decode"}
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            if results[i] is None:
                groups.setdefault(r["bucket"], []).append(i)
        for members in groups.values():
            try:
                encoded = self._encode([rows[i] for i in members])
            except Exception:  # find the row that fails; the others still get encoded
                encoded = []
                for i in members:
                    try:
                        encoded += self._encode([rows[i]])
                    except Exception as err:
                        encoded.append({"sample": b"", "meta": b"", "error": f"{type(err).__name__}: {err}",
                                        "stage": "encode"})
            for i, result in zip(members, encoded):
                results[i] = {"stage": None, **result}
        return pd.DataFrame({"key": batch["key"].to_numpy(), "shard": batch["shard"].to_numpy(),
                             "sample": [r["sample"] for r in results], "meta": [r["meta"] for r in results],
                             "error": [r["error"] for r in results], "stage": [r["stage"] for r in results]})

    def encode_shard(self, set_dir: str, data: str, shard: dict) -> dict:
        """One shard of the plan ({shard, plan, rows, file}: training/precompute_parts.py) → its tar and done marker,
        written by this actor; returns the marker's record and this node's id. Its rows are decoded by CPU tasks
        beside the actor, a few chunks ahead of the encoder (their pixels wait in the object store, not more)."""
        import ray

        rows = pd.read_parquet(shard["file"]).assign(shard=shard["shard"])
        if len(rows) != shard["rows"]:
            raise RuntimeError(f"precompute: {shard['file']} holds {len(rows)} rows, {shard['rows']} planned")
        w, h = (int(x) for x in rows["bucket"].iat[0].split("x"))
        step = self.cfg.decode_batch_size
        # A decode task's memory: its source images and resized copies. Also keeps it off this actor's resources.
        decode = ray.remote(decode_batch).options(num_cpus=1, memory=max(512 * 2**20, step * w * h * 12))
        ahead = max(4, 2 * -(-self.cfg.batch_size // step))  # chunks decoded ahead: 2 encoder batches, at least 4
        starts, pending = list(range(0, len(rows), step)), []
        writer = ShardWriter(Path(set_dir), shard["shard"], shard["plan"])
        try:
            batch = None
            for i in range(len(starts)):
                while len(pending) < ahead and i + len(pending) < len(starts):
                    start = starts[i + len(pending)]
                    pending.append(decode.remote(rows.iloc[start:start + step], data, self.cfg.max_pixels,
                                                 self.cfg.variants))
                got = ray.get(pending.pop(0))
                batch = got if batch is None else pd.concat([batch, got], ignore_index=True)
                last = i == len(starts) - 1
                while len(batch) >= self.cfg.batch_size or (last and len(batch)):  # batches of batch_size rows
                    self._write(writer, batch.iloc[:self.cfg.batch_size])
                    batch = batch.iloc[self.cfg.batch_size:]
            record = writer.finish()
        except BaseException:
            writer.abort()
            raise
        return {**record, "node": ray.get_runtime_context().get_node_id()}

    def _write(self, writer: ShardWriter, decoded: pd.DataFrame) -> None:
        for r in self(decoded).itertuples(index=False):
            writer.add(r.key, r.sample, r.meta, r.error if isinstance(r.error, str) else None, r.stage)
