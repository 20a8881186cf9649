"""Recover a `Scene` from an image: the inverse of `render`, robust to JPEG and downscaling.

    from scenes import parse
    scene = parse(Image.open("scene.jpg"))      # objects (shape, colour, size, cell) and background; word is None

How, per image:
1. background = per-channel median of all pixels (the background covers well over half of every render);
   named by the nearest of BACKGROUNDS, but the measured value is what the steps below subtract.
2. per cell (the fixed 3×3 grid): empty if no pixel is EMPTY_DISTANCE away from the background; else pixels
   farther than FG_FRACTION of the farthest one are foreground, and the cell's colour is the named colour whose
   segment background→colour lies closest to those pixels (distance-weighted), so edge pixels that JPEG or
   resizing mixed with the background vote for the right colour. A cell whose foreground
   is neutral (no chroma) holds the word's ink and is skipped.
3. a soft coverage map alpha = projection of each pixel onto that segment (0 background … 1 full colour),
   upsampled so the cell is ~96 px, shifted so its centroid is the cell centre and blurred by ~half an input pixel.
4. shape and size: the nearest (sum of squared differences) of the same maps made from renders of every
   (shape, size) in that same cell at the input's resolution, so resolution and pixel-phase biases cancel; sub-pixel
   coverage keeps a large shape (8 px at 32²) readable where a binary outline would not be.

Measured accuracy (objects exactly right, shape + colour + size + cell, over truth ∪ parse; backgrounds 100 %; 200
random scenes, JPEG q75..95, area or antialiased-bilinear resize; `pytest tests/scenes/test_parse.py -s`):
    JPEG of the 256² render, then resize:   256²: 100 %   64²: 100 %   32²: 100 %
    resize first, then JPEG (stress case):                64²: 100 %   32²: ~78 % (4:2:0 chroma subsampling
                                                          washes out a 4.7 px small shape; small triangle/star mix)
    render(scene, 32) parsed directly: 100 % on the test's 30 scenes.
Generated images (off-centre or off-size shapes) still parse, against the nearest prototype; a shape that spans two
cells is seen as two objects, and a blob gets the nearest shape.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from scenes.render import render
from scenes.scene import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, Obj, Scene

EMPTY_DISTANCE = 40.0  # a cell whose farthest pixel is this close to the background is empty (JPEG noise < ~20)
FG_FRACTION = 0.4  # foreground = farther than this fraction of the cell's farthest pixel (a small star at 32²
#                    never reaches full colour, so a fixed threshold would lose it)
INK_CHROMA = 12.0  # foreground whose mean distance from the grey axis is below this is neutral ink (the word):
#                   objects keep far more chroma, even when JPEG's 4:2:0 subsampling washes out a 4 px shape
MIN_AREA = 0.02  # smallest object coverage, as a fraction of the cell area (a small star is ~0.07)
BLUR_PIXELS = 0.5  # Gaussian sigma, in input pixels, applied to coverage maps before matching
UPSAMPLED_CELL = 96  # cell side in pixels after upsampling the coverage map

_OBJECT_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _OBJECT_NAMES], dtype=np.float32)  # (K, 3)


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 RGB from a PIL image or an (H, W), (H, W, 3) or (H, W, 4) uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    return array[..., :3].astype(np.float32)


def _cell_slices(height: int, width: int) -> dict[str, tuple[slice, slice]]:
    return {
        name: (slice(round(r * height / 3), round((r + 1) * height / 3)),
               slice(round(c * width / 3), round((c + 1) * width / 3)))
        for name, (r, c) in CELLS.items()
    }


def _segment_fit(pixels: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pixels (N, 3): distance to each palette segment bg→colour (N, K) and the coverage alpha on it (N, K)."""
    direction = _PALETTE - bg  # (K, 3)
    offset = pixels - bg  # (N, 3)
    alpha = np.clip(offset @ direction.T / np.maximum((direction**2).sum(1), 1e-6), 0, 1)  # (N, K)
    nearest = bg + alpha[..., None] * direction  # (N, K, 3)
    return np.linalg.norm(pixels[:, None, :] - nearest, axis=-1), alpha


def _cell_color(cell: np.ndarray, bg: np.ndarray) -> tuple[int, np.ndarray] | None:
    """Index of the best object colour for a cell's foreground and the cell's coverage map; None if the cell is
    empty or holds only neutral ink."""
    distance = np.linalg.norm(cell - bg, axis=-1)
    if distance.max() < EMPTY_DISTANCE:
        return None
    fg = distance > FG_FRACTION * distance.max()
    chroma = np.linalg.norm(cell[fg] - cell[fg].mean(axis=1, keepdims=True), axis=1)
    if float(np.average(chroma, weights=distance[fg])) < INK_CHROMA:
        return None
    residual, _ = _segment_fit(cell[fg], bg)
    best = int(np.argmin((residual * distance[fg, None]).sum(0)))
    _, alpha = _segment_fit(cell.reshape(-1, 3), bg)
    return best, alpha[:, best].reshape(cell.shape[:2])


def _template(alpha: np.ndarray) -> np.ndarray | None:
    """A cell's coverage map, upsampled to ~UPSAMPLED_CELL px and shifted so its centroid is the cell centre."""
    height, width = alpha.shape
    alpha = np.where(alpha > 0.15, alpha, 0)  # JPEG noise along the colour direction is not coverage
    if alpha.sum() < MIN_AREA * height * width:
        return None
    factor = max(1, round(UPSAMPLED_CELL / max(height, width)))
    up = cv2.resize(alpha, (width * factor, height * factor), interpolation=cv2.INTER_LINEAR)
    moments = cv2.moments(up)
    dx = up.shape[1] / 2 - moments["m10"] / moments["m00"]
    dy = up.shape[0] / 2 - moments["m01"] / moments["m00"]
    shift = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
    centred = cv2.warpAffine(up, shift, (up.shape[1], up.shape[0]), flags=cv2.INTER_LINEAR)
    # Blur by ~1 source pixel: the comparison should weigh the silhouette, not JPEG's block noise.
    return cv2.GaussianBlur(centred, (0, 0), sigmaX=BLUR_PIXELS * factor)


@lru_cache(maxsize=16)
def _prototypes(height: int, width: int) -> dict[str, list[tuple[tuple[str, str], np.ndarray]]]:
    """Per cell, the coverage template of every (shape, size) rendered there at this resolution (area resize of
    the 256² render)."""
    table: dict[str, list] = {cell: [] for cell in CELLS}
    bg = np.array(BACKGROUNDS["white"], dtype=np.float32)
    for shape in SHAPES:
        for size in SIZES:
            scene = Scene(objects=tuple(Obj(shape, "blue", size, cell) for cell in CELLS), background="white")
            image = np.asarray(render(scene, 256))
            if (height, width) != image.shape[:2]:
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
            rgb = image.astype(np.float32)
            for cell, (rows, cols) in _cell_slices(height, width).items():
                found = _cell_color(rgb[rows, cols], bg)
                template = None if found is None else _template(found[1])
                if template is not None:
                    table[cell].append(((shape, size), template))
    return table


def parse(image: Image.Image | np.ndarray) -> Scene:
    """The scene shown in a render (after JPEG / resizing); `word` is not read back (always None)."""
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    if min(height, width) < 9:
        raise ValueError(f"image too small to parse: {width}x{height}")
    bg = np.median(rgb.reshape(-1, 3), axis=0)
    background = min(BACKGROUNDS, key=lambda name: float(np.linalg.norm(bg - BACKGROUNDS[name])))
    prototypes = _prototypes(height, width)
    objects = []
    for cell, (rows, cols) in _cell_slices(height, width).items():
        found = _cell_color(rgb[rows, cols], bg)
        if found is None:
            continue
        template = _template(found[1])
        if template is None or not prototypes[cell]:
            continue
        (shape, size), _ = min(prototypes[cell], key=lambda p: float(np.sum((p[1] - template) ** 2)))
        objects.append(Obj(shape=shape, color=_OBJECT_NAMES[found[0]], size=size, cell=cell))
    return Scene(objects=tuple(objects), background=background)
