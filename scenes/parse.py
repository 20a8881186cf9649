"""Recover a `Scene` from an image: the inverse of `render`, robust to JPEG and downscaling.

    from scenes import parse
    scene = parse(Image.open("scene.jpg"))      # objects (shape, colour, size, cell) and background; word is None
    scene = parse(image, world="rich")          # + fills, the frame, the word and its cell

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

The rich world (`world="rich"`), before step 2: the frame is read from the outermost ring of pixels (a frame when
its median distance from the background exceeds FRAME_DISTANCE; its colour by the same segment test, among FRAMES),
then a BORDER_CLEAR band is overwritten with the background. Step 4 also matches hollow prototypes (large only).
After step 4, the free cell holding the most neutral ink is the word's, and the word is the nearest (same distance)
of the ink templates of every word of WORDS rendered in that cell at the input's resolution.

Measured, rich (300 random rich scenes, seed 123; objects exactly right incl. fill, over truth ∪ parse; frames
incl. none; word cells incl. none; words over scenes with one; `pytest tests/scenes/test_parse.py -s`):
                                              objects   frames   word cells   words
    render(scene, 32), parsed directly:       100 %     100 %    100 %        100 %
    render(scene, 64):                        100 %     100 %    100 %        100 %
    JPEG of the 256² render, then to 64²:     100 %     100 %    100 %        100 %
    JPEG of the 256² render, then to 32²:     100 %     100 %    100 %        ~99 %
    resize first, then JPEG (stress), 64²:    ~87 %     100 %    ~99 %        ~98 %   4:2:0 chroma smears the
                                     32²:     ~45 %     ~100 %   ~83 %        ~66 %   frame into edge cells
                                                                                      (phantom small stars)
The endpoint's path (JPEG q90 of the 256² render, draft-decoded to 64²) is 100 % on all four.

Generated images (off-centre or off-size shapes) still parse, against the nearest prototype; a shape that spans two
cells is seen as two objects, and a blob gets the nearest shape.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from scenes.render import ink_color, render
from scenes.scene import BACKGROUNDS, CELLS, COLORS, FRAMES, SHAPES, SIZES, WORDS, WORLDS, Obj, Scene

EMPTY_DISTANCE = 40.0  # a cell whose farthest pixel is this close to the background is empty (JPEG noise < ~20)
FG_FRACTION = 0.4  # foreground = farther than this fraction of the cell's farthest pixel (a small star at 32²
#                    never reaches full colour, so a fixed threshold would lose it)
INK_CHROMA = 12.0  # foreground whose mean distance from the grey axis is below this is neutral ink (the word):
#                   objects keep far more chroma, even when JPEG's 4:2:0 subsampling washes out a 4 px shape
MIN_AREA = 0.02  # smallest object coverage, as a fraction of the cell area (a small star is ~0.07)
MIN_INK_AREA = 0.005  # rich: smallest word coverage (HELLO at 32² is under 2 px tall, ~0.017 of its cell)
BLUR_PIXELS = 0.5  # Gaussian sigma, in input pixels, applied to coverage maps before matching
UPSAMPLED_CELL = 96  # cell side in pixels after upsampling the coverage map
FRAME_DISTANCE = 60.0  # rich: a frame when the image's outermost ring is, in median, this far from the background
BORDER_CLEAR = 0.038  # rich: the band (fraction of the side) overwritten with the background before reading cells:
#                      wider than the frame (1/32), narrower than a large shape's free edge (0.04)

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


def _template(alpha: np.ndarray, min_area: float = MIN_AREA) -> np.ndarray | None:
    """A cell's coverage map, upsampled to ~UPSAMPLED_CELL px and shifted so its centroid is the cell centre."""
    height, width = alpha.shape
    alpha = np.where(alpha > 0.15, alpha, 0)  # JPEG noise along the colour direction is not coverage
    if alpha.sum() < min_area * height * width:
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


def _at(image: Image.Image, height: int, width: int) -> np.ndarray:
    """A 256² render area-resized to the input's resolution, as float32 (H, W, 3)."""
    array = np.asarray(image)
    if (height, width) != array.shape[:2]:
        array = cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA)
    return array.astype(np.float32)


@lru_cache(maxsize=16)
def _prototypes(height: int, width: int, world: str = "basic") -> dict[str, list[tuple[tuple[str, ...], np.ndarray]]]:
    """Per cell, the coverage template of every (shape, size, fill) rendered there at this resolution (area resize
    of the 256² render); hollow ones (large only) in the rich world."""
    table: dict[str, list] = {cell: [] for cell in CELLS}
    bg = np.array(BACKGROUNDS["white"], dtype=np.float32)
    kinds = [(size, "solid") for size in SIZES] + ([("large", "hollow")] if world == "rich" else [])
    for shape in SHAPES:
        for size, fill in kinds:
            objects = tuple(Obj(shape, "blue", size, cell, fill) for cell in CELLS)
            rgb = _at(render(Scene(objects=objects, background="white", world=world), 256), height, width)
            for cell, (rows, cols) in _cell_slices(height, width).items():
                found = _cell_color(rgb[rows, cols], bg)
                template = None if found is None else _template(found[1])
                if template is not None:
                    table[cell].append(((shape, size, fill), template))
    return table


def _objects(rgb: np.ndarray, bg: np.ndarray, world: str) -> list[Obj]:
    """Step 2-4 in every cell: the object there, if any, against the world's prototypes."""
    height, width = rgb.shape[:2]
    prototypes = _prototypes(height, width, world)
    objects = []
    for cell, (rows, cols) in _cell_slices(height, width).items():
        found = _cell_color(rgb[rows, cols], bg)
        if found is None:
            continue
        template = _template(found[1])
        if template is None or not prototypes[cell]:
            continue
        (shape, size, fill), _ = min(prototypes[cell], key=lambda p: float(np.sum((p[1] - template) ** 2)))
        objects.append(Obj(shape=shape, color=_OBJECT_NAMES[found[0]], size=size, cell=cell, fill=fill))
    return objects


def parse(image: Image.Image | np.ndarray, world: str = "basic") -> Scene:
    """The scene shown in a render (after JPEG / resizing). Basic: objects and background; `word` is not read back
    (always None). Rich: also the frame, fills and the word (its cell, and the nearest of WORDS)."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    if min(height, width) < 9:
        raise ValueError(f"image too small to parse: {width}x{height}")
    bg = np.median(rgb.reshape(-1, 3), axis=0)
    background = min(BACKGROUNDS, key=lambda name: float(np.linalg.norm(bg - BACKGROUNDS[name])))
    if world == "basic":
        return Scene(objects=tuple(_objects(rgb, bg, world)), background=background)
    frame = _frame(rgb, bg)
    rgb = _clear_border(rgb, bg)
    objects = _objects(rgb, bg, world)
    word, word_at = _word(rgb, bg, background, {o.cell for o in objects})
    return Scene(tuple(objects), background, word, frame, word_at, world)


# --- the rich world: frame, word ----------------------------------------------------------------------------------

_FRAME_PALETTE = np.array([COLORS[c] for c in FRAMES], dtype=np.float32)  # (F, 3)


def _frame(rgb: np.ndarray, bg: np.ndarray) -> str | None:
    """The frame's colour from the outermost ring of pixels (pure frame at any size >= 32², JPEG aside), or None."""
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (P, 3)
    distance = np.linalg.norm(ring - bg, axis=1)
    if float(np.median(distance)) < FRAME_DISTANCE:
        return None
    direction = _FRAME_PALETTE - bg  # (F, 3): the same segment test as an object's colour
    alpha = np.clip((ring - bg) @ direction.T / np.maximum((direction**2).sum(1), 1e-6), 0, 1)  # (P, F)
    residual = np.linalg.norm(ring[:, None, :] - (bg + alpha[..., None] * direction), axis=-1)
    return FRAMES[int(np.argmin(np.median(residual, axis=0)))]


def _clear_border(rgb: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """A copy with a BORDER_CLEAR band at every edge set to the background: the frame and its JPEG ringing go, and
    no object or word reaches that far out."""
    height, width = rgb.shape[:2]
    rows, cols = max(1, int(BORDER_CLEAR * height)), max(1, int(BORDER_CLEAR * width))
    out = rgb.copy()
    out[:rows], out[-rows:], out[:, :cols], out[:, -cols:] = bg, bg, bg, bg
    return out


def _ink_alpha(cell: np.ndarray, bg: np.ndarray, ink: np.ndarray) -> np.ndarray | None:
    """The coverage map of neutral ink in a cell, or None when the cell is empty or its foreground has colour."""
    distance = np.linalg.norm(cell - bg, axis=-1)
    if distance.max() < EMPTY_DISTANCE:
        return None
    fg = distance > FG_FRACTION * distance.max()
    chroma = np.linalg.norm(cell[fg] - cell[fg].mean(axis=1, keepdims=True), axis=1)
    if float(np.average(chroma, weights=distance[fg])) >= INK_CHROMA:
        return None
    direction = ink - bg
    return np.clip((cell - bg) @ direction / max(float(direction @ direction), 1e-6), 0, 1)


@lru_cache(maxsize=16)
def _word_prototypes(height: int, width: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Per cell, the ink template of every word of WORDS drawn there at this resolution."""
    table: dict[str, list] = {cell: [] for cell in CELLS}
    bg, ink = np.array(BACKGROUNDS["white"], np.float32), np.array(ink_color("white"), np.float32)
    slices = _cell_slices(height, width)
    for word in WORDS:
        for cell, (rows, cols) in slices.items():
            scene = Scene(word=word, word_at=cell, background="white", world="rich")
            alpha = _ink_alpha(_at(render(scene, 256), height, width)[rows, cols], bg, ink)
            template = None if alpha is None else _template(alpha, MIN_INK_AREA)
            if template is not None:
                table[cell].append((word, template))
    return table


def _word(rgb: np.ndarray, bg: np.ndarray, background: str, occupied: set[str]) -> tuple[str | None, str | None]:
    """(word, cell) of the free cell holding the most neutral ink, the word the nearest template; (None, None)."""
    ink = np.array(ink_color(background), np.float32)
    best: tuple[float, str, np.ndarray] | None = None
    for cell, (rows, cols) in _cell_slices(*rgb.shape[:2]).items():
        alpha = None if cell in occupied else _ink_alpha(rgb[rows, cols], bg, ink)
        if alpha is not None and (best is None or alpha.sum() > best[0]):
            best = (float(alpha.sum()), cell, alpha)
    template = None if best is None else _template(best[2], MIN_INK_AREA)
    prototypes = _word_prototypes(*rgb.shape[:2])[best[1]] if template is not None else []
    if not prototypes:
        return None, None
    word, _ = min(prototypes, key=lambda p: float(np.sum((p[1] - template) ** 2)))
    return word, best[1]
