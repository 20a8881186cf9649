"""The bucket table: Lens's 27 buckets, nearest ratio in log space, largest base area the image reaches."""

import math

import numpy as np
import pytest

from training.buckets import LENS_BASE_SIDES, LENS_RATIOS, BucketTable, crop_box, parse_ratio


def log_ratio(r: str) -> float:
    w, h = parse_ratio(r)
    return math.log(w / h)


def test_lens_table_has_27_buckets_near_their_base_area_with_sides_multiple_of_16():
    table = BucketTable.lens(multiple=16)
    assert len(table.buckets) == 27 and LENS_BASE_SIDES == (512, 768, 1024)
    assert table.ratios == ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")
    for b in table.buckets:
        assert b.width % 16 == 0 and b.height % 16 == 0
        assert abs(b.width * b.height / b.base**2 - 1) < 0.05, b
        assert abs(math.log(b.width / b.height) - log_ratio(b.ratio)) < 0.05, b
    assert table.get(1024, "1:1").name == "1024x1024" and table.get(1024, "16:9").name == "1360x768"


@pytest.mark.parametrize("ratio", LENS_RATIOS)
def test_each_lens_ratio_lands_in_its_own_bucket_at_the_largest_base(ratio):
    table = BucketTable.lens()
    w, h = parse_ratio(ratio)
    scale = 2048 / math.sqrt(w * h)  # area 2048²: above every base
    bucket, upscaled = table.assign(round(w * scale), round(h * scale))
    assert (bucket.ratio, bucket.base, upscaled) == (ratio, 1024, False)


def test_every_ratio_from_1_2_to_2_1_goes_to_the_nearest_in_log_space():
    table = BucketTable.lens()
    previous = -math.inf
    for r in np.geomspace(0.5, 2.0, 401):
        width, height = round(1500 * math.sqrt(r)), round(1500 / math.sqrt(r))
        bucket, _ = table.assign(width, height)
        expected = min(LENS_RATIOS, key=lambda q: abs(log_ratio(q) - math.log(width / height)))
        assert bucket.ratio == expected, (width, height)
        assert log_ratio(bucket.ratio) >= previous  # monotone in the image's ratio
        previous = log_ratio(bucket.ratio)
    # beyond 1:2 and 2:1 the extreme buckets take the image
    assert table.assign(300, 1000)[0].ratio == "1:2" and table.assign(1000, 300)[0].ratio == "2:1"


def test_boundaries_sit_at_the_geometric_mean_of_neighbouring_ratios():
    table = BucketTable.lens()
    for lo, hi in zip(LENS_RATIOS, LENS_RATIOS[1:]):
        mid = math.exp((log_ratio(lo) + log_ratio(hi)) / 2)
        h = 100_000
        assert table.nearest_ratio(round(h * mid * 0.999), h) == lo
        assert table.nearest_ratio(round(h * mid * 1.001), h) == hi


def test_base_area_is_the_largest_the_image_reaches_and_small_images_are_upscaled():
    table = BucketTable.lens()
    big = table.get(1024, "1:1")
    assert table.assign(big.width, big.height) == (big, False)
    assert table.assign(big.width - 1, big.height)[0].base == 768
    assert table.assign(600, 600)[0].base == 512
    bucket, upscaled = table.assign(200, 200)
    assert bucket.name == "512x512" and upscaled
    assert table.assign(1920, 1080) == (table.get(1024, "16:9"), False)
    assert table.assign(1280, 720)[0].name == table.get(768, "16:9").name


def test_tiny_demo_table_sends_everything_to_32_squared():
    table = BucketTable((32,), ("1:1",), multiple=4)
    assert [b.name for b in table.buckets] == ["32x32"]
    for size in [(256, 256), (16, 16), (400, 100), (90, 300)]:
        assert table.assign(*size)[0].name == "32x32"
    assert table.assign(16, 16)[1] is True


def test_crop_box_is_centred_with_the_buckets_aspect():
    table = BucketTable.lens()
    bucket = table.get(1024, "1:1")
    assert crop_box(400, 200, bucket) == (100.0, 0.0, 300.0, 200.0)
    assert crop_box(200, 400, bucket) == (0.0, 100.0, 200.0, 300.0)
    wide = table.get(1024, "16:9")
    left, top, right, bottom = crop_box(1000, 1000, wide)
    assert (left, right) == (0.0, 1000.0) and math.isclose((bottom - top), 1000 * wide.height / wide.width)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="W:H"):
        BucketTable((32,), ("square",))
    with pytest.raises(ValueError, match="duplicate sizes"):
        BucketTable((32,), ("1:1", "10:9"), multiple=16)
