"""Aspect buckets: the one owner of the bucket table that precompute writes and training reads.

    table = BucketTable.lens(multiple=codec.multiple)       # Lens: 3 base areas × 9 ratios = 27 buckets
    table = BucketTable((32,), ("1:1",), multiple=4)         # the demo's tiny table: 32² only
    bucket, upscaled = table.assign(width=1920, height=1080)  # → 1360x768 (16:9 at 1024²), False

Assignment (Lens): the ratio nearest to the image's in log space (1:2 … 2:1, so 4:3 and 3:4 are equally far from
1:1), then the largest base area whose bucket the image covers by area (image area ≥ bucket area, no upscaling);
an image smaller than every bucket of its ratio goes to the smallest base area and is upscaled (`upscaled` True,
recorded in the sample's meta). Bucket sides are multiples of `multiple` (the codec's: 16 for FLUX.2's /8 with the
denoiser's patch 2), each rounded to the nearest multiple, so a bucket's area is within a few percent of base².
Ratios are width:height and come from `inference.generate.ASPECTS`, the same nine that sampling offers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inference.generate import ASPECTS

LENS_BASE_SIDES = (512, 768, 1024)  # base areas 512², 768², 1024²
LENS_RATIOS = tuple(ASPECTS)  # 1:2, 9:16, 2:3, 3:4, 1:1, 4:3, 3:2, 16:9, 2:1


@dataclass(frozen=True, order=True)
class Bucket:
    base: int  # side of the base area (base² pixels)
    ratio: str  # "w:h"
    width: int
    height: int

    @property
    def name(self) -> str:
        """`WxH`, the bucket's folder name under DATA/shards/<set_id>/."""
        return f"{self.width}x{self.height}"

    @property
    def log_ratio(self) -> float:
        rw, rh = parse_ratio(self.ratio)
        return math.log(rw / rh)


def parse_ratio(ratio: str) -> tuple[int, int]:
    w, sep, h = ratio.partition(":")
    try:
        rw, rh = int(w), int(h)
    except ValueError:
        raise ValueError(f"bucket ratio {ratio!r} is not W:H with integers") from None
    if not sep or rw <= 0 or rh <= 0:
        raise ValueError(f"bucket ratio {ratio!r} is not W:H with positive integers")
    return rw, rh


def bucket_size(base: int, ratio: str, multiple: int) -> tuple[int, int]:
    """(width, height) of ratio `ratio` with area ≈ base², each side rounded to the nearest multiple of `multiple`."""
    rw, rh = parse_ratio(ratio)
    scale = base / math.sqrt(rw * rh)
    width = max(multiple, round(rw * scale / multiple) * multiple)
    height = max(multiple, round(rh * scale / multiple) * multiple)
    return width, height


class BucketTable:
    """base sides × ratios → buckets; `assign` maps an image size to its bucket."""

    def __init__(self, base_sides=LENS_BASE_SIDES, ratios=LENS_RATIOS, multiple: int = 16):
        if multiple <= 0:
            raise ValueError(f"bucket multiple must be positive, not {multiple}")
        if not base_sides or not ratios:
            raise ValueError("a bucket table needs at least one base side and one ratio")
        self.base_sides = tuple(sorted(set(int(b) for b in base_sides)))
        self.ratios = tuple(sorted(set(ratios), key=lambda r: math.log(parse_ratio(r)[0] / parse_ratio(r)[1])))
        self.multiple = multiple
        self.buckets = [Bucket(b, r, *bucket_size(b, r, multiple)) for b in self.base_sides for r in self.ratios]
        names = [bk.name for bk in self.buckets]
        if len(set(names)) != len(names):
            raise ValueError(f"bucket table has duplicate sizes after rounding to {multiple}: {sorted(names)}")
        self._by = {(bk.base, bk.ratio): bk for bk in self.buckets}

    @classmethod
    def lens(cls, multiple: int = 16) -> "BucketTable":
        return cls(LENS_BASE_SIDES, LENS_RATIOS, multiple)

    def get(self, base: int, ratio: str) -> Bucket:
        return self._by[(base, ratio)]

    def by_name(self, name: str) -> Bucket:
        for bk in self.buckets:
            if bk.name == name:
                return bk
        raise KeyError(name)

    def nearest_ratio(self, width: int, height: int, among: tuple[str, ...] | None = None) -> str:
        """The ratio (of `among`, default all) nearest to width/height in log space; ties go to the narrower."""
        target = math.log(width / height)
        candidates = among or self.ratios
        return min(candidates, key=lambda r: (abs(math.log(parse_ratio(r)[0] / parse_ratio(r)[1]) - target),
                                              self.ratios.index(r)))

    def assign(self, width: int, height: int) -> tuple[Bucket, bool]:
        """(bucket, upscaled): nearest ratio, then the largest base area whose bucket area the image reaches."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height} is empty")
        ratio = self.nearest_ratio(width, height)
        area = width * height
        fitting = [b for b in self.base_sides if area >= self._by[(b, ratio)].width * self._by[(b, ratio)].height]
        if fitting:
            return self._by[(max(fitting), ratio)], False
        return self._by[(self.base_sides[0], ratio)], True

    def identity(self) -> dict:
        """What the shards' encoders.json records of the table."""
        return {"base_sides": list(self.base_sides), "ratios": list(self.ratios), "multiple": self.multiple,
                "sizes": [bk.name for bk in self.buckets]}


def crop_box(width: int, height: int, bucket: Bucket) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the image's pixels: the centred region of the bucket's aspect that is resized
    to the bucket (the whole image along one side, centred along the other)."""
    target = bucket.width / bucket.height
    if width / height > target:  # wider than the bucket: trim left and right
        cw = height * target
        left = (width - cw) / 2
        return left, 0.0, left + cw, float(height)
    ch = width / target
    top = (height - ch) / 2
    return 0.0, top, float(width), top + ch
