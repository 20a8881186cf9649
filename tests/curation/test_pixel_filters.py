import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageFilter

from curation.config import CurateConfig
from curation.manifest import REJECT_REASONS
from curation.pixel_filters import PIXEL_CHECKS, decode, pixel_reason, pixel_scores

BIG = 10**9  # max_pixels that never triggers
# Every pixel threshold off, so one check at a time can be turned on.
OFF = dict(min_area=0, min_aspect=1e-6, max_aspect=1e6, min_blur=0, min_entropy=0, min_luminance=0, max_luminance=1)


def reason_of(im: Image.Image, to_bytes, **cfg) -> str | None:
    img = decode(to_bytes(im), BIG)
    return pixel_reason(img.shape[1], img.shape[0], pixel_scores(img), CurateConfig(**cfg))


def test_checks_follow_manifest_order():
    i = REJECT_REASONS.index(PIXEL_CHECKS[0])
    assert REJECT_REASONS[i : i + len(PIXEL_CHECKS)] == PIXEL_CHECKS


def test_normal_render_passes_the_real_web_defaults(shapes, to_bytes):
    assert reason_of(shapes(0, (480, 400)), to_bytes) is None


def test_each_check_rejects_its_case(shapes, to_bytes):
    normal = shapes(1, (480, 400))
    assert reason_of(shapes(1, (100, 100)), to_bytes) == "min_area"
    assert reason_of(shapes(1, (1600, 300)), to_bytes) == "aspect"
    assert reason_of(normal.filter(ImageFilter.GaussianBlur(4)), to_bytes) == "blur"
    near_blank = Image.new("RGB", (480, 400), (200, 200, 200))
    near_blank.paste((30, 30, 30), (100, 100, 110, 110))  # one sharp dot: passes blur at 0, fails entropy
    assert reason_of(near_blank, to_bytes, **(OFF | {"min_entropy": 3.0})) == "entropy"
    dark = Image.fromarray((np.asarray(normal) * 0.03).astype(np.uint8))
    assert reason_of(dark, to_bytes, **(OFF | {"min_luminance": 0.05})) == "luminance"
    white = Image.new("RGB", (480, 400), (255, 255, 255))
    assert reason_of(white, to_bytes, **(OFF | {"max_luminance": 0.98})) == "luminance"


def test_first_failing_check_wins():
    cfg = CurateConfig()
    bad = {"blur": 0.0, "entropy": 0.0, "luminance": 0.0}
    assert pixel_reason(10, 10, bad, cfg) == "min_area"
    assert pixel_reason(2000, 500, bad, cfg) == "aspect"
    assert pixel_reason(500, 500, bad, cfg) == "blur"
    assert pixel_reason(500, 500, bad | {"blur": 500.0}, cfg) == "entropy"
    assert pixel_reason(500, 500, {"blur": 500.0, "entropy": 6.0, "luminance": 0.99}, cfg) == "luminance"
    assert pixel_reason(500, 500, {"blur": None, "entropy": None, "luminance": None}, cfg) is None


def test_scores_are_in_range_and_blur_is_resolution_independent(shapes):
    img = np.asarray(shapes(2, (512, 512)))
    s = pixel_scores(img)
    assert 0 < s["entropy"] <= 8 and 0 <= s["luminance"] <= 1
    flat = pixel_scores(np.full((300, 300, 3), 128, np.uint8))
    assert flat == {"blur": 0.0, "entropy": 0.0, "luminance": pytest.approx(128 / 255)}
    # The same picture at 4× the pixels: blur is measured at one working resolution, so it barely moves.
    big = np.asarray(Image.fromarray(img).resize((1024, 1024), Image.NEAREST))
    assert pixel_scores(big)["blur"] == pytest.approx(s["blur"], rel=0.05)


def test_decode_rgb_and_alpha_over_white(to_bytes):
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red
    img = decode(to_bytes(rgba, "PNG"), BIG)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert (img == 255).all()
    gray = decode(to_bytes(Image.new("L", (5, 7), 9), "PNG"), BIG)
    assert gray.shape == (7, 5, 3) and (gray == 9).all()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims width×height: the check must fire on the header, before any decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bomb(to_bytes):
    with pytest.raises(ValueError, match=r"^decompression bomb: 12000x12000$"):
        decode(_png_claiming(12000, 12000), max_pixels=64 * 2**20)
    with pytest.raises(ValueError, match=r"^decompression bomb: 2000x1000$"):
        decode(to_bytes(Image.new("RGB", (2000, 1000)), "PNG"), max_pixels=1_000_000)


def test_truncated_and_garbage_are_undecodable(shapes, to_bytes):
    data = to_bytes(shapes(3, (256, 256)))
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as some other library may have left it
    try:
        with pytest.raises(ValueError, match="^undecodable: "):
            decode(data[: len(data) // 2], BIG)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    with pytest.raises(ValueError, match="^undecodable: "):
        decode(b"<html>not an image</html>", BIG)
    with pytest.raises(ValueError, match="^undecodable: "):
        decode(b"", BIG)


def test_16bit_gray_photo_passes_the_filters(shapes, to_bytes):
    """A 16-bit grayscale PNG (mode I;16) is an ordinary photo: Pillow's convert("RGB") clips it to all white, which
    the blur check rejected. Decoded by its high byte it passes the real web defaults like its 8-bit self."""
    gray8 = np.asarray(shapes(4, (480, 400)).convert("L"))  # (400, 480) uint8
    low = np.random.default_rng(0).integers(0, 256, gray8.shape)  # the extra 8 bits: must not change the picture
    data = to_bytes(Image.fromarray((gray8.astype(np.uint16) << 8) | low.astype(np.uint16)), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "I;16"
        clipped = np.asarray(im.convert("RGB"))
    assert pixel_reason(480, 400, pixel_scores(clipped), CurateConfig()) == "blur"  # the old decode's verdict
    img = decode(data, BIG)
    assert (img == gray8[..., None]).all()
    assert pixel_scores(img)["blur"] >= CurateConfig().min_blur
    assert reason_of(Image.fromarray(gray8), to_bytes) is None  # same verdict as the 8-bit picture
    assert pixel_reason(img.shape[1], img.shape[0], pixel_scores(img), CurateConfig()) is None
