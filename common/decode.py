"""The one decoder of a web image: bytes → the RGB picture a browser shows on a white page.

    im = decode_rgb(data, max_pixels=cfg.download.max_pixels)  # PIL RGB; ValueError("undecodable: ...") or
                                                                # ValueError("decompression bomb: WxH")
    im = decode_rgb(data, draft=768)   # JPEG decoded at 1/2..1/8 scale when much larger (captioner, thumbnails)
    w, h = displayed_size(data)        # header only: EXIF orientation 5-8 swaps the sides
    rgb = to_rgb(pil_image)            # the mode rules below, for an image already open and oriented

Curation's filters (pixel_filters.decode, and through it precompute's VAE input), the captioner's upload and the
reports' thumbnails all decode here, so a row's pixels are the same wherever they are looked at.

Mode rules (Pillow's own `convert("RGB")` clips wide modes: a 16-bit gray photo came out all white):
  EXIF      orientation 2..8 applied (Pillow's getexif also reads an XMP tiff:Orientation).
  alpha     RGBA, LA, PA, RGBa, and any mode with info["transparency"] (P with an index or per-index alpha bytes,
            L/RGB with a PNG tRNS colour key): composited over white.
  I;16*     the high byte (v >> 8). Pillow itself opens 16-bit RGB/RGBA/gray+alpha PNGs and 16-bit RGB TIFFs
            by keeping the high byte, so a 16-bit gray PNG and the same picture as 16-bit RGB decode alike.
  I         int32, whose mode does not say the range. A PNG has no 32-bit samples, so an `I` PNG (Pillow < 10
            opened 16-bit gray PNGs so) is 16-bit. Otherwise (TIFF): values all within 0..255 are 8-bit and kept,
            anything larger is taken as 16-bit (v >> 8); values outside 0..65535 are clipped.
  F         ×255 when the largest value is ≤ 1, else taken as 0..255; clipped to 0..255 either way, NaN → 0.
  1         black/white. CMYK, YCbCr, LAB, HSV: Pillow's conversions (CMYK naive, no ICC; Pillow's JPEG
            decoder already un-inverts Adobe CMYK).
ICC profiles are not applied (a browser would; the rare wide-gamut photo comes out a little dull).
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits a sample: scaled by numpy
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90°


@contextmanager
def _strict_truncation():
    """PIL's LOAD_TRUNCATED_IMAGES is a module global that other libraries set to True; force False while we
    decode (a truncated file must fail, not come back half grey) and put back whatever was there."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def decode_rgb(data: bytes, max_pixels: int | None = None, draft: int | None = None) -> Image.Image:
    """Bytes → RGB PIL image as a browser shows it (module docstring's rules).

    max_pixels: the header's width×height is checked against it before any pixel is decoded (None: only Pillow's
    own cap, 2 × Image.MAX_IMAGE_PIXELS). draft: let a JPEG decode at a reduced scale that still covers a
    draft×draft box (the caller resizes anyway). Raises ValueError("decompression bomb: ...") or
    ValueError("undecodable: ...").
    """
    with _strict_truncation(), warnings.catch_warnings():
        if max_pixels is not None:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels decides
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # PIL's own cap (2 × MAX_IMAGE_PIXELS), if ours is higher
            raise ValueError(f"decompression bomb: {e}") from e
        except Image.UnidentifiedImageError as e:  # its message names a BytesIO address: not reproducible
            raise ValueError("undecodable: not an image format Pillow recognises") from e
        except Exception as e:  # OSError, SyntaxError from broken headers
            raise ValueError(f"undecodable: {type(e).__name__}: {e}") from e
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ValueError(f"decompression bomb: {w}x{h}")
        try:
            if draft:
                im.draft(None, (draft, draft))  # a no-op for every format but JPEG; keeps the mode
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: keeps im.format, which to_rgb reads for `I`
            rgb = to_rgb(im)
        except Exception as e:  # truncated data, bad chunks, decoder errors
            raise ValueError(f"undecodable: {type(e).__name__}: {e}") from e
    if rgb.width == 0 or rgb.height == 0:
        raise ValueError(f"undecodable: empty image {w}x{h}")
    return rgb


def displayed_size(data: bytes) -> tuple[int, int]:
    """(width, height) as displayed, from the header alone: what decode_rgb's image will measure."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(ExifTags.Base.Orientation, 1) in SWAPPING_ORIENTATIONS else (w, h)


def has_alpha(im: Image.Image) -> bool:
    """Whether some pixel may be transparent: an alpha band, or a palette/colour-key transparency in info."""
    return im.mode in ALPHA_MODES or "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB by the module docstring's rules; `im` itself when it is already plain RGB."""
    if im.mode in WIDE_MODES:
        return Image.fromarray(_wide_to_gray8(im), "L").convert("RGB")
    if has_alpha(im):
        rgba = im.convert("RGBA")  # applies info["transparency"] for P, L and RGB
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _wide_to_gray8(im: Image.Image) -> np.ndarray:
    """I;16* / I / F image → (H, W) uint8 by the ranges of the module docstring."""
    raw = np.asarray(im)  # (H, W) uint16 (either byte order), int32 or float32
    if im.mode == "F":
        v = np.nan_to_num(raw.astype(np.float64), nan=0.0)
        scale = 255.0 if v.size and v.max() <= 1.0 else 1.0
        return np.clip(np.rint(v * scale), 0, 255).astype(np.uint8)
    if im.mode == "I" and im.format != "PNG" and (raw.max() if raw.size else 0) <= 255:
        gray = np.clip(raw, 0, 255).astype(np.uint8)
    else:
        gray = (np.clip(raw.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    key = im.info.get("transparency")
    if isinstance(key, int):  # a 16-bit gray PNG's tRNS: that exact value is transparent
        gray[raw == key] = 255
    return gray
