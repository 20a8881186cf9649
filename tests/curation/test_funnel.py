"""The funnel's hint: when nothing is kept, or one check removes nearly everything that reached it, one line names
the check, its threshold and the setting to change."""

import pandas as pd

from curation.config import CurateConfig
from curation.funnel import funnel, funnel_hint


def manifest(**reasons: int) -> pd.DataFrame:
    """Rows rejected per reason (`kept=` rows kept)."""
    kept = reasons.pop("kept", 0)
    rows = [r for reason, n in reasons.items() for r in [reason] * n] + [None] * kept
    return pd.DataFrame({"status": "ok", "keep": [r is None for r in rows], "reject_reason": rows})


def test_nothing_kept_names_the_check_that_removed_most_its_threshold_and_setting():
    hint = funnel_hint(funnel(manifest(failed_download=4, min_area=130)), CurateConfig())
    assert hint == ("curate: kept 0 of 134: min_area rejected 130 (images below 147456 px = 384²); lower "
                    "curate.min_area to keep them; also failed_download 4")


def test_thresholds_and_settings_come_from_the_config():
    cfg = CurateConfig(min_blur=7.5, models={"min_clip_score": 0.3})
    assert "Laplacian variance below 7.5); lower curate.min_blur" in funnel_hint(funnel(manifest(blur=9)), cfg)
    hint = funnel_hint(funnel(manifest(clip_score=3)), cfg)
    assert "CLIP score below 0.3); lower curate.models.min_clip_score" in hint
    assert "below 1000 px);" in funnel_hint(funnel(manifest(min_area=2)), CurateConfig(min_area=1000))  # not square


def test_nothing_kept_for_a_reason_no_setting_explains_still_says_so():
    hint = funnel_hint(funnel(manifest(failed_download=5)), CurateConfig())
    assert hint.startswith("curate: kept 0 of 5: failed_download rejected 5 (see the manifest's error column)")


def test_one_check_removing_nearly_all_it_saw_gets_a_hint_even_with_some_kept():
    # 100 rows: 50 fail to download; of the 50 that reach min_area it removes 46 (92 %)
    hint = funnel_hint(funnel(manifest(failed_download=50, min_area=46, kept=4)), CurateConfig())
    assert hint == ("curate: min_area rejected 46 of the 50 rows that reached it (images below 147456 px = 384²); "
                    "lower curate.min_area to keep them")


def test_no_hint_for_an_ordinary_funnel_or_a_few_rows():
    assert funnel_hint(funnel(manifest(min_area=10, blur=5, kept=85)), CurateConfig()) is None
    assert funnel_hint(funnel(manifest(duplicate=95, kept=5)), CurateConfig()) is None  # dedup has no threshold
    assert funnel_hint(funnel(manifest(min_area=8, kept=1)), CurateConfig()) is None  # 9 rows: too few to tell
