"""common.decode: every Pillow mode a web image arrives in, saved in a real format, decodes to what a browser
shows on a white page (compared with references computed here from the known pixel values)."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from common.decode import decode_rgb, displayed_size, to_rgb

H, W = 48, 64
Y, X = np.mgrid[0:H, 0:W]
GRAY8 = ((X * 4 + Y) % 256).astype(np.uint8)  # (H, W)
GRAY16 = ((Y * W + X) * 21).astype(np.uint16)  # (H, W) 0..64491: every high byte, low bytes all over
RGB8 = np.stack([X * 4, Y * 5, (X + Y) * 2], axis=-1).astype(np.uint8)  # (H, W, 3)
ALPHA = ((X * 4) % 256).astype(np.uint8)  # (H, W): 0 (transparent) … 252, a column each
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
INDEX = ((X // 16 + Y // 16) % 4).astype(np.uint8)  # (H, W) palette indices
# 16-px flat blocks, all colours distinct: JPEG (4:4:4, 8×8 DCT blocks inside flat areas) keeps them within a few
# levels, and any wrong flip or turn moves a block.
BLOCK_COLOURS = np.array([[200, 30, 40], [30, 200, 40], [40, 30, 200], [220, 220, 30], [30, 220, 220], [220, 30, 220],
                          [120, 60, 10], [10, 120, 60], [60, 10, 120], [250, 250, 250], [5, 5, 5], [128, 128, 128]],
                         np.uint8)
BLOCKS = BLOCK_COLOURS[(Y // 16) * (W // 16) + X // 16]  # (H, W, 3), a 4×3 grid


def enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=-1)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def p_image() -> Image.Image:
    im = Image.fromarray(INDEX, "P")
    im.putpalette(PALETTE.ravel().tolist())
    return im


def lab_to_srgb_gray(lightness_byte: np.ndarray) -> np.ndarray:
    """CIE L* (Pillow stores it ×255/100; a*, b* as signed bytes, 0 neutral) → sRGB gray, by the CIE and sRGB
    formulas (D65 white)."""
    L = lightness_byte.astype(np.float64) * 100 / 255
    y = np.where(L > 8, ((L + 16) / 116) ** 3, L / 903.3)
    s = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)
    return gray3(np.rint(s * 255).astype(np.uint8))


def f_wide() -> np.ndarray:
    v = GRAY8.astype(np.float32) * 1.25 - 20  # -20 … 298.75: beyond 0..255 both ways
    v[0, 0] = np.nan
    return v


# name → (bytes, the mode Pillow opens them as, reference (H, W, 3) uint8, tolerance in levels). Tolerance 0 for
# lossless formats; 1 where alpha is composited (rounding); JPEG and colour-space conversions a few levels.
CASES = {
    "1 png": lambda: (enc(Image.fromarray(INDEX % 2 == 1), "PNG"), "1", gray3((INDEX % 2 == 1) * np.uint8(255)), 0),
    "L png": lambda: (enc(Image.fromarray(GRAY8), "PNG"), "L", gray3(GRAY8), 0),
    "L png tRNS key": lambda: (enc(Image.fromarray(GRAY8), "PNG", transparency=40), "L",
                               gray3(np.where(GRAY8 == 40, 255, GRAY8).astype(np.uint8)), 0),
    "LA png": lambda: (enc(Image.fromarray(np.stack([GRAY8, ALPHA], -1), "LA"), "PNG"), "LA",
                       over_white(gray3(GRAY8), ALPHA), 1),
    "P png": lambda: (enc(p_image(), "PNG"), "P", PALETTE[INDEX], 0),
    "P gif transparency index": lambda: (enc(p_image(), "GIF", transparency=1), "P",
                                         np.where((INDEX == 1)[..., None], 255, PALETTE[INDEX]).astype(np.uint8), 0),
    "P png transparency bytes": lambda: (enc(p_image(), "PNG", transparency=bytes([0, 128, 255, 255])), "P",
                                         over_white(PALETTE[INDEX], np.array([0, 128, 255, 255], np.uint8)[INDEX]), 1),
    "I;16 png": lambda: (enc(Image.fromarray(GRAY16), "PNG"), "I;16", gray3((GRAY16 >> 8).astype(np.uint8)), 0),
    "I;16 png tRNS key": lambda: (enc(Image.fromarray(GRAY16), "PNG", transparency=int(GRAY16[5, 5])), "I;16",
                                  gray3(np.where(GRAY16 == GRAY16[5, 5], 255, GRAY16 >> 8).astype(np.uint8)), 0),
    "I;16B tiff": lambda: (enc(Image.frombytes("I;16B", (W, H), GRAY16.astype(">u2").tobytes()), "TIFF"), "I;16B",
                           gray3((GRAY16 >> 8).astype(np.uint8)), 0),
    "I;16L tiff": lambda: (enc(Image.frombytes("I;16L", (W, H), GRAY16.astype("<u2").tobytes()), "TIFF"), "I;16",
                           gray3((GRAY16 >> 8).astype(np.uint8)), 0),
    "I tiff 16-bit values": lambda: (enc(Image.fromarray(GRAY16.astype(np.int32)), "TIFF"), "I",
                                     gray3((GRAY16 >> 8).astype(np.uint8)), 0),
    "I tiff 8-bit values": lambda: (enc(Image.fromarray(GRAY8.astype(np.int32)), "TIFF"), "I", gray3(GRAY8), 0),
    "F tiff unit range": lambda: (enc(Image.fromarray(GRAY8.astype(np.float32) / 255), "TIFF"), "F", gray3(GRAY8), 0),
    "F tiff 0..255, out of range, NaN": lambda: (
        enc(Image.fromarray(f_wide()), "TIFF"), "F",
        gray3(np.clip(np.rint(np.nan_to_num(f_wide(), nan=0)), 0, 255).astype(np.uint8)), 0),
    "CMYK jpeg (Adobe, inverted)": lambda: (enc(Image.fromarray(BLOCKS).convert("CMYK"), "JPEG", quality=95), "CMYK",
                                            BLOCKS, 4),
    "CMYK tiff": lambda: (enc(Image.fromarray(RGB8).convert("CMYK"), "TIFF"), "CMYK", RGB8, 0),
    "RGB png": lambda: (enc(Image.fromarray(RGB8), "PNG"), "RGB", RGB8, 0),
    "RGB png tRNS key": lambda: (enc(Image.fromarray(BLOCKS), "PNG", transparency=(30, 200, 40)), "RGB",
                                 np.where((BLOCKS == [30, 200, 40]).all(-1)[..., None], 255, BLOCKS)
                                 .astype(np.uint8), 0),
    "RGB jpeg": lambda: (enc(Image.fromarray(BLOCKS), "JPEG", quality=95, subsampling=0), "RGB", BLOCKS, 4),
    "RGB webp lossless": lambda: (enc(Image.fromarray(RGB8), "WEBP", lossless=True), "RGB", RGB8, 0),
    "RGBA png": lambda: (enc(Image.fromarray(np.dstack([RGB8, ALPHA])), "PNG"), "RGBA", over_white(RGB8, ALPHA), 1),
    "RGBA webp lossless": lambda: (enc(Image.fromarray(np.dstack([RGB8, ALPHA])), "WEBP", lossless=True, exact=True),
                                   "RGBA", over_white(RGB8, ALPHA), 1),
    # 16-bit colour PNGs: Pillow opens them as 8-bit RGB/RGBA, keeping each sample's high byte.
    "RGB 16-bit png": lambda: (cv2.imencode(".png", np.dstack([GRAY16, GRAY16[::-1], GRAY16[:, ::-1]])[..., ::-1])[1]
                               .tobytes(), "RGB", (np.dstack([GRAY16, GRAY16[::-1], GRAY16[:, ::-1]]) >> 8)
                               .astype(np.uint8), 0),
    "RGBA 16-bit png": lambda: (cv2.imencode(".png", np.dstack([GRAY16[..., None].repeat(3, -1),
                                                                ALPHA.astype(np.uint16) * 257]))[1].tobytes(),
                                "RGBA", over_white(gray3((GRAY16 >> 8).astype(np.uint8)), ALPHA), 1),
    "YCbCr tiff": lambda: (enc(Image.fromarray(BLOCKS).convert("YCbCr"), "TIFF"), "YCbCr", BLOCKS, 3),
    "LAB tiff": lambda: (enc(Image.fromarray(np.stack([GRAY8, 0 * GRAY8, 0 * GRAY8], -1), "LAB"), "TIFF"), "LAB",
                         lab_to_srgb_gray(GRAY8), 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_decodes_to_what_a_browser_shows(name):
    data, opened_mode, ref, atol = CASES[name]()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == opened_mode  # the case really exercises that mode (Pillow may change what it opens as)
    out = decode_rgb(data)
    assert out.mode == "RGB" and out.size == (W, H)
    diff = np.abs(np.asarray(out, np.int16) - ref.astype(np.int16))
    assert diff.max() <= atol, f"{name}: max |Δ| {diff.max()} at {np.unravel_index(diff.argmax(), diff.shape)}"


def test_i16_png_is_its_high_byte_not_white():
    data = enc(Image.fromarray(GRAY16), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9  # Pillow's own convert clips: the old bug
    out = np.asarray(decode_rgb(data))
    assert not (out == 255).all()
    assert (out[..., 0] == GRAY16 >> 8).all() and (out[..., 0] == out[..., 2]).all()


def test_cmyk_jpeg_is_adobe_inverted_and_undone():
    data = enc(Image.fromarray(BLOCKS).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as im:
        assert "adobe" in im.info  # Pillow writes (and reads) Adobe's inverted CMYK
    assert np.abs(np.asarray(decode_rgb(data), np.int16) - BLOCKS).max() <= 4  # not the inverted colours


# What a viewer shows for each EXIF orientation of the stored pixels S, written from the EXIF definitions (not from
# Pillow's table): 2 mirror, 3 turn 180°, 4 flip, 5 transpose, 6 turn 90° clockwise, 7 transverse, 8 turn 90° anti.
SHOWN = {
    2: lambda s: s[:, ::-1],
    3: lambda s: s[::-1, ::-1],
    4: lambda s: s[::-1],
    5: lambda s: s.transpose(1, 0, 2),
    6: lambda s: np.rot90(s, k=-1),
    7: lambda s: np.rot90(s, k=2).transpose(1, 0, 2),
    8: lambda s: np.rot90(s, k=1),
}


@pytest.mark.parametrize("orientation", sorted(SHOWN))
def test_exif_orientation_is_applied(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = enc(Image.fromarray(BLOCKS), "JPEG", quality=95, subsampling=0, exif=exif)
    out = np.asarray(decode_rgb(data), np.int16)
    ref = SHOWN[orientation](BLOCKS)
    assert out.shape == ref.shape and np.abs(out - ref).max() <= 4
    assert displayed_size(data) == (ref.shape[1], ref.shape[0])


def test_draft_decodes_a_large_jpeg_smaller_and_still_oriented():
    big = np.asarray(Image.fromarray(BLOCKS).resize((800, 600), Image.NEAREST))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = enc(Image.fromarray(big), "JPEG", quality=95, exif=exif)
    full, small = decode_rgb(data), decode_rgb(data, draft=100)
    assert full.size == (600, 800)
    assert small.size == (150, 200)  # 1/4 scale: the largest that still covers 100×100
    shown = np.asarray(full.resize(small.size, Image.BOX), np.int16)
    assert np.abs(np.asarray(small, np.int16) - shown).mean() < 3


def test_modes_no_file_brings():
    hsv = Image.fromarray(np.array([[[0, 255, 255], [85, 255, 255], [0, 0, 128]]], np.uint8), "HSV")
    assert np.asarray(to_rgb(hsv)).tolist() == [[[255, 0, 0], [0, 255, 0], [128, 128, 128]]]
    # Pillow < 10 opened 16-bit gray PNGs as mode I: from a PNG, I is 16-bit even when the picture is dark.
    dark = Image.fromarray(np.full((2, 2), 200, np.int32))
    assert (np.asarray(to_rgb(dark)) == 200).all()  # generic I within 0..255: 8-bit values
    dark.format = "PNG"
    assert (np.asarray(to_rgb(dark)) == 0).all()  # 200 of 65535


def test_undecodable_stays_a_clear_error():
    with pytest.raises(ValueError, match="^undecodable: not an image format"):
        decode_rgb(b"<html>not an image</html>")
    data = enc(Image.fromarray(GRAY16), "PNG")
    with pytest.raises(ValueError, match="^undecodable: "):
        decode_rgb(data[: len(data) // 2])
