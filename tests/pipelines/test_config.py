"""One YAML file, a section per stage; dotted overrides; flags win; errors are one line."""

import pytest
import yaml

from pipelines.config import apply_override, load_section, save_resolved


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_file_then_overrides_then_flags(tmp_path):
    config = write(tmp_path, "curate:\n  min_area: 100\n  download:\n    threads: 8\n")
    cfg = load_section("curate", config, ["curate.download.threads=4", "curate.min_blur=2.5"],
                       allow_hosts=["127.0.0.1"])
    assert (cfg.min_area, cfg.download.threads, cfg.min_blur, cfg.allow_hosts) == (100, 4, 2.5, ["127.0.0.1"])
    assert load_section("curate", config, [], allow_hosts=None).allow_hosts == []  # None flags do not override


def test_each_command_reads_only_its_section(tmp_path):
    config = write(tmp_path, "scenes:\n  n: 7\ncurate:\n  min_area: 1\n")
    assert load_section("scenes", config, []).n == 7


def test_resolved_section_is_written_next_to_the_output(tmp_path):
    cfg = load_section("curate", None, ["curate.min_area=147456"])
    path = save_resolved(cfg, "curate", tmp_path / "out")
    saved = yaml.safe_load(path.read_text())
    assert saved["curate"]["min_area"] == 147456 and "download" in saved["curate"]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("curat:\n  min_area: 1\n", [], "unknown section(s) ['curat']"),
        ("curate: [1, 2\n", [], "unreadable config"),
        ("- a\n- b\n", [], "must be a mapping"),
        ("", ["curate.min_area=-5"], "curate.min_area"),
        ("", ["curate.download.nope=1"], "curate.download.nope"),
        ("", ["nosection.x=1"], "unknown section"),
        ("", ["curate.min_area"], "is not SECTION.KEY=VALUE"),
        ("", ["curate.min_aspect=3"], "min_aspect 3.0 must be below max_aspect"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, text, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_section("curate", write(tmp_path, text), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_section("curate", str(tmp_path / "none.yaml"), [])


def test_override_parses_values_as_yaml():
    raw = {}
    apply_override(raw, "curate.allow_hosts=[127.0.0.1, localhost]")
    apply_override(raw, "curate.models.clip_model=")
    assert raw == {"curate": {"allow_hosts": ["127.0.0.1", "localhost"], "models": {"clip_model": None}}}
