"""The image of a manifest row as sent to the captioner: read from its download tar, resized, re-encoded.

    load_images(data, rows, cfg)  # {key: Image(data_url, width, height)} or {key: error string}

Rows name their bytes by `shard` (a tar under DATA/download/) and `member`. Each tar is indexed once (member →
offset, size) and kept in a small cache, so a batch of keys costs one seek + read per image, not one scan of the
tar per key. Resizing to `max_side` before sending matters: OpenAI bills images by 512-px tiles after fitting them
into 2048² and then 768 on the short side, so a 4000-px photo costs the same as a 768-px one, only slower to send.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage

from captioning.config import CaptionConfig
from common.decode import decode_rgb
from curation.download import read_members

@dataclass(frozen=True)
class Image:
    data_url: str  # data:image/jpeg;base64,...
    width: int  # as sent, after resizing
    height: int


def prepare(raw: bytes, max_side: int, quality: int) -> Image:
    """Longest side to `max_side` (never upscaled), RGB JPEG, as a data URL."""
    # What the filters saw (EXIF orientation, alpha over white, 16-bit scaled); a JPEG much larger than max_side
    # decodes at a reduced scale (fast path).
    im = decode_rgb(raw, draft=max_side)
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), im.width, im.height)


def load_images(data: str | Path, rows: list[dict], cfg: CaptionConfig) -> dict[str, Image | str]:
    """key → Image, or key → error message (missing shard or member, undecodable bytes)."""
    download = Path(data) / "download"
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    out: dict[str, Image | str] = {}
    for shard, group in by_shard.items():
        path = download / shard if shard else None
        if path is None or not path.is_file():
            out.update({r["key"]: f"image shard not found: {shard}" for r in group})
            continue
        blobs = read_members(path, [r["member"] for r in group])
        for r in group:
            raw = blobs.get(r["member"])
            if raw is None:
                out[r["key"]] = f"member {r['member']} not in {shard}"
                continue
            try:
                out[r["key"]] = prepare(raw, cfg.max_side, cfg.jpeg_quality)
            except Exception as err:  # PIL raises many types for bad bytes; the row records why
                out[r["key"]] = f"undecodable image: {type(err).__name__}: {err}"
    return out
