"""The training-shard format: what `lensforge precompute` writes and the training loader reads. One owner: here.

Layout under DATA/shards/:

    <set_id>/encoders.json                     the cache key (fields: training/cache_key.py); set_id = sha256 of
                                               its canonical JSON, first 12 hex digits
    <set_id>/index.parquet                     one row per shard: path, bucket, base, samples, bytes (the tar's)
    <set_id>/errors.parquet                    one row per sample that could not be made: key, stage, error
    <set_id>/<W>x<H>/shard-000000.tar          webdataset tars, one aspect bucket per folder
    <set_id>/<W>x<H>/shard-000000.done.json    completion marker, written after the tar: {"shard", "plan",
                                               "samples", "bytes" (the tar's size), "errors"}; it vouches for the
                                               tar only while the tar has that size (`tar_mismatch`)

A set with other encoders gets another set_id, so a rerun with another codec, text encoder, dtype or bucket table
writes beside the old shards instead of mixing with them; training calls `check_encoders` before reading.

Each sample (plain webdataset, readable with `webdataset.WebDataset(paths)`):

    __key__                the manifest key (no dots)
    tensors.safetensors    one safetensors blob:
        latent             (C, H/f, W/f) bfloat16 (or float32), normalized by the codec (inference/codecs.py)
        text.<variant>     (L, D) bfloat16: the text encoder's features where its mask is True, unpadded;
                           D = K·dim, the K layers concatenated, exactly what `TextEncoder.encode` returns
        or, with text_dtype float8_e4m3fn,
        text.<variant>     (L, D) float8_e4m3fn and scale.<variant> (L,) float32: x ≈ text · scale[:, None]
    meta.json              {"key", "bucket": "WxH", "base", "ratio", "size": [w, h] (original, as decoded),
                            "crop": [left, top, right, bottom] (original pixels), "upscaled", "variants": [...],
                            "captions": {variant: text}}

An empty caption has L = 0 (a (0, D) tensor): no text tokens, the same convention as inference's empty prompt.

    from training.shard_format import read_sample, check_encoders
    check_encoders("data/shards/3f2a9c0e1b7d", expected)   # ValueError naming what differs
    for s in webdataset.WebDataset(paths): sample = read_sample(s)   # {"key", "latent", "text", "meta"}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.atomic import write_json

FORMAT_VERSION = 2  # 2: Lens's chat for gpt-oss (template, date, offset in the key), no token-id samples
ENCODERS_FILE = "encoders.json"
INDEX_FILE = "index.parquet"
ERRORS_FILE = "errors.parquet"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# What to do about a shard that is cut short or corrupt: precompute redoes every shard without a trusted marker.
REDO = "delete it and rerun `lensforge precompute` with the same settings (it redoes missing shards)"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}


def canonical_json(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def shard_set_id(encoders: dict) -> str:
    """First 12 hex digits of sha256 of the canonical encoders.json."""
    return hashlib.sha256(canonical_json(encoders).encode()).hexdigest()[:12]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


# --- text features: bf16 or fp8 with a per-token scale -----------------------------------------------------------


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D) float → (L, D) float8_e4m3fn, (L,) float32 scale, so that x ≈ q.float() · scale[:, None]."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX  # (L,); an all-zero token keeps a tiny scale
    q = (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.float()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


# --- one sample ---------------------------------------------------------------------------------------------------


def pack_sample(key: str, latent: torch.Tensor, meta: dict, text: dict[str, torch.Tensor] | None = None,
                text_dtype: str = "bfloat16", latent_dtype: str = "bfloat16") -> dict:
    """The webdataset sample dict (all values bytes, `__key__` a str) of one image and its caption variants."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r}: webdataset keys may not contain '.' or '/'")
    tensors = {"latent": latent.to(DTYPES[latent_dtype]).contiguous()}
    for variant, feats in (text or {}).items():  # (L, D)
        if text_dtype == "float8_e4m3fn":
            tensors[f"text.{variant}"], tensors[f"scale.{variant}"] = quantize_fp8(feats)
        else:
            tensors[f"text.{variant}"] = feats.to(DTYPES[text_dtype]).contiguous()
    return {"__key__": key, "tensors.safetensors": st_save(tensors), "meta.json": canonical_json(meta).encode()}


def write_sample(sink, key: str, latent: torch.Tensor, meta: dict, **kwargs) -> int:
    """Write one sample to a `webdataset.TarWriter`; returns the bytes written. kwargs: as `pack_sample`."""
    return sink.write(pack_sample(key, latent, meta, **kwargs))


def read_sample(sample: dict) -> dict:
    """A webdataset sample (raw bytes, or `meta.json` already decoded) → {"key", "latent", "text", "meta"}.
    `text[variant]`: (L, D) bfloat16 (fp8 dequantized to bfloat16). A sample cut short (a member missing or
    unreadable: a truncated tar) is a ValueError naming its shard (`__url__`, as webdataset sets it)."""
    try:
        blob, meta = sample["tensors.safetensors"], sample["meta.json"]
        tensors = st_load(bytes(blob)) if isinstance(blob, (bytes, bytearray, memoryview)) else blob
        meta = json.loads(meta) if isinstance(meta, (bytes, bytearray, str)) else meta
    except (KeyError, ValueError, SafetensorError) as err:
        where = f"shard {sample['__url__']}" if "__url__" in sample else "a shard"
        raise ValueError(f"sample {sample.get('__key__')} of {where} is incomplete or unreadable ({err!r}): the "
                         f"tar is truncated or corrupt; {REDO}") from None
    text = {}
    for name, value in tensors.items():
        kind, _, variant = name.partition(".")
        if kind == "text":
            scale = tensors.get(f"scale.{variant}")
            text[variant] = value if scale is None else dequantize_fp8(value, scale).to(torch.bfloat16)
    return {"key": sample.get("__key__", meta.get("key")), "latent": tensors["latent"], "text": text, "meta": meta}


# --- the shard set ------------------------------------------------------------------------------------------------


def write_encoders(shard_set_dir: str | Path, encoders: dict) -> Path:
    return write_json(Path(shard_set_dir) / ENCODERS_FILE, encoders, fsync=True, sort_keys=True)


def read_encoders(shard_set_dir: str | Path) -> dict:
    path = Path(shard_set_dir) / ENCODERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {ENCODERS_FILE} in {shard_set_dir}: not a shard set (run `lensforge precompute`)")
    return json.loads(path.read_text())


def dict_diff(found, expected, path: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ, with both values."""
    if isinstance(found, dict) and isinstance(expected, dict):
        out = []
        for k in sorted(set(found) | set(expected)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in found:
                out.append(f"{sub}: missing in the shards (expected {expected[k]!r})")
            elif k not in expected:
                out.append(f"{sub}: {found[k]!r} in the shards, not in the expected key")
            else:
                out.extend(dict_diff(found[k], expected[k], sub))
        return out
    return [] if found == expected else [f"{path or '.'}: {found!r} in the shards, {expected!r} expected"]


def check_encoders(shard_set_dir: str | Path, expected: dict) -> dict:
    """Refuse a shard set made with other encoders: ValueError naming every field that differs."""
    found = read_encoders(shard_set_dir)
    diffs = dict_diff(json.loads(canonical_json(found)), json.loads(canonical_json(expected)))
    if diffs:
        raise ValueError(f"shards at {shard_set_dir} do not match this config's encoders: " + "; ".join(diffs))
    return found


def done_marker(tar: str | Path) -> Path:
    """`shard-000000.done.json` beside `shard-000000.tar`."""
    tar = Path(tar)
    return tar.with_name(tar.name.removesuffix(".tar") + ".done.json")


def read_done(tar: str | Path) -> dict | None:
    """The done marker's record of a tar, or None when there is none (or it is unreadable: the shard is redone)."""
    try:
        record = json.loads(done_marker(tar).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def tar_mismatch(tar: str | Path, record: dict) -> str | None:
    """Why a done marker cannot vouch for its tar: the tar is gone or not the size the marker records (a cut
    or replaced file); None when it is as recorded. A marker is never trusted over the data."""
    tar = Path(tar)
    if not tar.is_file():
        return f"{tar} is missing"
    size, recorded = tar.stat().st_size, record.get("bytes")
    if size != recorded:
        return f"{tar} is {size:,} bytes, its done marker records " + (
            f"{recorded:,}" if isinstance(recorded, int) else "no size")
    return None


def read_index(shard_set_dir: str | Path):
    """index.parquet as a DataFrame (shard path relative to the set, bucket, base, ratio, samples, bytes)."""
    import pandas as pd

    path = Path(shard_set_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {INDEX_FILE} in {shard_set_dir}: precompute has not finished there")
    return pd.read_parquet(path)


def shard_paths(shard_set_dir: str | Path, bucket: str | None = None) -> list[str]:
    """Absolute tar paths of a set (optionally one bucket), in index order: what `webdataset.WebDataset` takes."""
    index = read_index(shard_set_dir)
    if bucket is not None:
        index = index[index["bucket"] == bucket]
    return [str(Path(shard_set_dir) / p) for p in index["shard"]]
