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


@pytest.mark.parametrize(
    "text, message",
    [
        ("curate:\n  min_area: 1\n  min_blur: 2\n  min_area: 5\n",
         "line 4: key 'min_area' appears twice (first on line 2)"),
        ("curate:\n  download:\n    threads: 1\n    threads: 2\n", "line 4: key 'threads' appears twice"),
        ("curate:\n  min_area: 1\ncurate:\n  min_blur: 2\n", "line 3: key 'curate' appears twice (first on line 1)"),
    ],
)
def test_a_key_given_twice_in_the_yaml_is_refused_with_its_line(tmp_path, text, message):
    with pytest.raises(ValueError) as err:  # plain YAML keeps the last one: the first would be lost silently
        load_section("curate", write(tmp_path, text), [])
    assert f"config {tmp_path / 'c.yaml'}, {message}" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="key 'dense' appears twice"):
        apply_override({}, "train.data.captions={dense: 0.5, dense: 0.3}")


def test_an_override_of_a_section_the_command_does_not_read_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"override 'caption.model': a section this command ignores; valid "
                                         r"sections: train$"):
        load_section("train", None, ["train.seed=3", "caption.model=x"], reads=("train",))
    with pytest.raises(ValueError, match=r"override 'trian.seed': unknown section; valid sections: train$"):
        load_section("train", None, ["trian.seed=3"], reads=("train",))
    # `lensforge run` reads every section: any known one may be set
    assert load_section("train", None, ["train.seed=3", "caption.model=x"]).seed == 3


def test_lensforge_train_refuses_another_sections_override_in_one_line(tmp_path, monkeypatch, capsys):
    from pipelines import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["train"])
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "caption.model=gpt-4.1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "lensforge: error: override 'caption.model': a section this command ignores; valid sections: train\n"
