"""curation/filters.py: the chain is the one owner of the reasons, their order and the score columns; every hint
names a setting that exists; a missing score never rejects."""

import math
import re

from curation.config import CurateConfig
from curation.filters import CHAIN, REJECT_REASONS, SCORE_COLUMNS, checks, first_reason, hint
from curation.manifest import MANIFEST_SCHEMA
from curation.shard_filter import FILTERED_SCHEMA


def test_reasons_scores_and_schemas_follow_the_chain():
    assert REJECT_REASONS == tuple(f.reason for f in CHAIN) and len(set(REJECT_REASONS)) == len(CHAIN)
    stages = [f.stage for f in CHAIN]
    assert stages == sorted(stages, key=["guard", "download", "decode", "pixel", "model", "dedup"].index)
    for schema in (FILTERED_SCHEMA, MANIFEST_SCHEMA):
        names = [n for n in schema.names if n in SCORE_COLUMNS]
        assert names == list(SCORE_COLUMNS)  # present, and in chain order
    assert checks("pixel") == ("min_area", "aspect", "blur", "entropy", "luminance")


def test_every_hint_names_a_real_setting():
    cfg = CurateConfig()
    assert hint("duplicate", cfg) is None  # what the data is, not a setting
    for f in CHAIN[:-1]:
        refuses, remedy = hint(f.reason, cfg)
        assert refuses and remedy
        for dotted in re.findall(r"curate\.([a-z_.]+[a-z])", remedy):
            value = cfg
            for part in dotted.split("."):
                assert hasattr(value, part), (f.reason, dotted)
                value = getattr(value, part)
    assert hint("no-such-reason", cfg) is None


def test_first_reason_takes_the_chain_order_and_never_rejects_on_a_missing_score():
    cfg = CurateConfig()
    dark = {"width": 1024, "height": 1024, "blur": 0.0, "entropy": 0.0, "luminance": 0.0}
    assert first_reason("pixel", dark, cfg) == "blur"
    assert first_reason("pixel", dark | {"width": 10}, cfg) == "min_area"
    missing = {"width": 1024, "height": 1024, "blur": None, "entropy": math.nan, "luminance": None}
    assert first_reason("pixel", missing, cfg) is None
    assert first_reason("model", {"clip_score": math.nan, "nsfw": 1.0}, cfg.models) == "nsfw"
