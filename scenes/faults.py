"""The web's failure modes, as bytes on disk plus what the server must do with them.

Each fault kind is a function `(scene, image, rng) -> Fault`; `image` is the normal render of the row's scene.
`dataset.render_dataset` decides which rows carry which kind; the curation stage must reject every one of them
(or, for duplicates, keep exactly one copy).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from scenes.render import render
from scenes.scene import BACKGROUNDS, Rng, Scene

# Order matters only for the rare case of fewer faulty rows than kinds; names are a public contract.
FAULT_KINDS: tuple[str, ...] = (
    "broken_link", "truncated", "not_image", "tiny", "extreme_aspect", "near_blank", "blurred",
    "optout", "exact_duplicate", "near_duplicate", "bomb",
)
DUPLICATE_KINDS = ("exact_duplicate", "near_duplicate")
NORMAL_QUALITY = 90  # JPEG quality of normal images
TINY_SIDE = 24
BOMB_SIDE = 30000  # 9e8 pixels: Pillow refuses above 2 × MAX_IMAGE_PIXELS (~1.8e8) with DecompressionBombError


@dataclass
class Fault:
    data: bytes | None  # None: no file at all (broken link)
    ext: str = "jpg"
    serve: dict = field(default_factory=dict)  # this file's entry in _serve.json, if any
    shows_scene: bool = True  # whether the image still depicts the row's scene (ground truth is meaningful)


def jpeg(image: Image.Image, quality: int = NORMAL_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def broken_link(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    return Fault(data=None)


def truncated(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    data = jpeg(image)
    return Fault(data=data[: len(data) // 2])


def not_image(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    # A soft 404: the CDN answers 200 with an HTML page under the image's name.
    page = b"<!doctype html><html><head><title>Not found</title></head><body><h1>Page not found</h1></body></html>\n"
    return Fault(data=page, serve={"headers": {"Content-Type": "text/html; charset=utf-8"}}, shows_scene=False)


def tiny(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    return Fault(data=jpeg(render(scene, TINY_SIDE)))


def extreme_aspect(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    """A 5:1 banner (or 1:5 skyscraper): the scene at full height, padded with its background."""
    side = image.width
    wide = rng.random() < 0.5
    canvas = Image.new("RGB", (5 * side, side) if wide else (side, 5 * side), BACKGROUNDS[scene.background])
    canvas.paste(image, (2 * side, 0) if wide else (0, 2 * side))
    return Fault(data=jpeg(canvas))


def near_blank(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    seed = int(rng.random() * 2**31)
    # σ 0.5: a sensor-noise floor, not texture (σ 1.5 already scores like a sparse render on blur and entropy)
    noise = np.random.default_rng(seed).normal(0, 0.5, (image.height, image.width, 1))
    pixels = np.clip(np.array(BACKGROUNDS[scene.background], dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Fault(data=jpeg(Image.fromarray(pixels)), shows_scene=False)


def blurred(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    # radius 1/8 of the side: out of focus beyond doubt (at 1/16 a busy high-contrast scene kept blur ≈ 1.3)
    return Fault(data=jpeg(image.filter(ImageFilter.GaussianBlur(radius=image.width / 8))))


def optout(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    return Fault(data=jpeg(image), serve={"headers": {"X-Robots-Tag": "noai"}})


def near_duplicate_of(source: Image.Image) -> bytes:
    """The source resized to 15/16 of its side (256 -> 240) and re-encoded at another quality."""
    side = round(source.width * 15 / 16)
    return jpeg(source.resize((side, side), Image.BILINEAR), quality=75)


@lru_cache(maxsize=1)
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A real side×side 1-bit black PNG (~110 KB for 30000²): decoding it to RGB needs 2.7 GB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb(scene: Scene, image: Image.Image, rng: Rng) -> Fault:
    return Fault(data=bomb_png(), ext="png", shows_scene=False)


# Duplicates are built in dataset.py from their source row, not from the row's own scene.
MAKERS = {
    "broken_link": broken_link, "truncated": truncated, "not_image": not_image, "tiny": tiny,
    "extreme_aspect": extreme_aspect, "near_blank": near_blank, "blurred": blurred, "optout": optout,
    "bomb": bomb,
}
