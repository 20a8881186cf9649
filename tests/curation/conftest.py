"""Fixtures of the curation filter and dedup tests: small synthetic renders, as JPEG bytes or RGB arrays."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw


def render_shapes(seed: int = 0, size: tuple[int, int] = (256, 256), background=(235, 235, 230)) -> Image.Image:
    """A few random ellipses and rectangles on a flat background (the look of the synthetic scene world), plus
    mild per-pixel noise so the real-web entropy default (3 bits) passes."""
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(im)
    for _ in range(5):
        s = int(rng.integers(min(w, h) // 8, min(w, h) // 3))
        x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)([x0, y0, x0 + s, y0 + s], fill=color)
    noisy = np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, (h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}) | kw)
    return buf.getvalue()


@pytest.fixture
def shapes():
    return render_shapes


@pytest.fixture
def to_bytes():
    return encode
