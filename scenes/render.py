"""Draw a `Scene` as an RGB image, deterministically.

    from scenes import render
    render(scene, size=32).save("scene.png")

Shapes are drawn on a canvas of at least 512² and box-downsampled to `size`, so a 32² render equals an area
resize of a large one (clean 8 px shapes, not aliased 4 px stairs). The word, if any, is drawn in neutral ink
(black on light backgrounds, white on black) inside an empty cell (`Scene.word_cell`), so it never touches an
object and the parser can tell ink from object colours.

Rich world (`Scene.world == "rich"`): a hollow object is its shape minus a copy scaled by HOLLOW_INNER about the
shape's incentre, filled with the background (a uniform outline); the frame is a border FRAME_WIDTH of the side,
drawn first; the word fits a narrower box (RICH_WORD_BOX) so it keeps clear of the frame in an edge cell.
"""

from __future__ import annotations

import math
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from scenes.scene import BACKGROUNDS, CELLS, COLORS, FRAME_WIDTH, HOLLOW_INNER, SIZES, Obj, Scene

MIN_CANVAS = 512  # supersampled drawing side; a power-of-two multiple keeps 256 and 32 exact
# The word's box as fractions of its cell (width, height). Basic: 80 % x 35 %. Rich: 70 % wide, so a word in an edge
# cell keeps 0.05 of the image side from the edge (the frame takes 1/32 and the parser clears 0.038), and 40 % high.
WORD_BOX = {"basic": (0.8, 0.35), "rich": (0.7, 0.4)}


def cell_box(cell: str, side: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a cell in a square image of side `side`."""
    row, col = CELLS[cell]
    step = side / 3
    return col * step, row * step, (col + 1) * step, (row + 1) * step


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape centred at (cx, cy) inside a `side`² box; None for the circle (drawn as an ellipse)."""
    h = side / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # apex up, base on the box's bottom edge: fills half its bounding box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":  # 5-point star, moved down so its box is centred. Inner radius 0.5 R, not the regular
        # 0.382 R: at 32² the regular star's arms are sub-pixel and it reads as a blob the size of a small circle.
        outer, inner = h, h * 0.5
        dy = (outer - outer * math.cos(math.pi / 5)) / 2
        return [
            (cx + r * math.sin(k * math.pi / 5), cy + dy - r * math.cos(k * math.pi / 5))
            for k, r in zip(range(10), [outer, inner] * 5)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def incentre(shape: str, cx: float, cy: float, side: float) -> tuple[float, float]:
    """The point a hollow shape's inner copy is scaled about: equidistant from all edges, so the outline is uniform."""
    h = side / 2
    if shape == "triangle":  # apex (cx, cy-h), base corners (cx±h, cy+h): sides 2h, h√5, h√5
        return cx, cy + h * (math.sqrt(5) - 1) / (math.sqrt(5) + 1)
    if shape == "star":  # shape_polygon moves the star down by dy to centre its box
        return cx, cy + (h - h * math.cos(math.pi / 5)) / 2
    return cx, cy


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill: tuple) -> None:
    polygon = shape_polygon(shape, cx, cy, s)
    if polygon is None:
        draw.ellipse((cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, background: str, side: int) -> None:
    x0, y0, x1, y1 = cell_box(obj.cell, side)
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, SIZES[obj.size] * (x1 - x0)
    _draw_shape(draw, obj.shape, cx, cy, s, COLORS[obj.color])
    if obj.fill == "hollow":  # the same shape, shrunk about its incentre, in the background colour
        ix, iy = incentre(obj.shape, cx, cy, s)
        k = HOLLOW_INNER
        _draw_shape(draw, obj.shape, ix + k * (cx - ix), iy + k * (cy - iy), k * s, BACKGROUNDS[background])


def ink_color(background: str) -> tuple[int, int, int]:
    """Neutral ink that contrasts with the background (the word must not look like an object colour)."""
    return (15, 15, 15) if ink_name(background) == "black" else (240, 240, 240)


def ink_name(background: str) -> str:
    """What a caption calls the ink: black on the light backgrounds, white on black."""
    return "black" if sum(BACKGROUNDS[background]) > 3 * 80 else "white"


@lru_cache(maxsize=64)
def _word_mask(word: str) -> Image.Image:
    """The word in white on black ("L"), cropped to its ink, at a fixed font size; scaled later to fit a cell."""
    font = ImageFont.load_default(size=64)
    x0, y0, x1, y1 = font.getbbox(word)
    mask = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
    ImageDraw.Draw(mask).text((1 - x0, 1 - y0), word, fill=255, font=font)
    return mask


def _draw_word(canvas: Image.Image, scene: Scene, side: int) -> None:
    cell = scene.word_cell
    if cell is None:
        return
    x0, y0, x1, y1 = cell_box(cell, side)
    mask = _word_mask(scene.word)
    box_w, box_h = WORD_BOX[scene.world]  # fit the box, keeping the aspect ratio
    scale = min(box_w * (x1 - x0) / mask.width, box_h * (y1 - y0) / mask.height)
    w, h = max(1, round(mask.width * scale)), max(1, round(mask.height * scale))
    mask = mask.resize((w, h), Image.BILINEAR)
    ink = Image.new("RGB", (w, h), ink_color(scene.background))
    canvas.paste(ink, (round((x0 + x1 - w) / 2), round((y0 + y1 - h) / 2)), mask)


def render(scene: Scene, size: int = 256) -> Image.Image:
    """The scene as a `size`×`size` RGB image; equal inputs give equal pixels."""
    if size < 8:
        raise ValueError(f"render size must be >= 8, got {size}")
    factor = max(1, math.ceil(MIN_CANVAS / size))
    side = size * factor
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    if scene.frame is not None:
        draw.rectangle((0, 0, side - 1, side - 1), outline=COLORS[scene.frame], width=round(FRAME_WIDTH * side))
    for obj in scene.objects:
        _draw_object(draw, obj, scene.background, side)
    _draw_word(canvas, scene, side)
    return canvas if factor == 1 else canvas.reduce(factor)
