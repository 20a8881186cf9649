import pandas as pd
import pytest
import yaml

from pipelines.cli import main


def test_scenes_render_cli(tmp_path, capsys):
    config = tmp_path / "lf.yaml"
    config.write_text(yaml.safe_dump({"scenes": {"n": 99, "size": 32, "faults": 0.5}}))
    out = tmp_path / "web"
    code = main(["scenes", "render", "--n", "22", "--out", str(out), "--config", str(config), "--seed", "4",
                 "--base-url", "http://127.0.0.1:9999"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("rendered 22 rows") and "broken_link=1" in line and "11 faulty" in line
    table = pd.read_parquet(out / "urls.parquet")
    assert len(table) == 22 and table["url"].str.startswith("http://127.0.0.1:9999/").all()
    resolved = yaml.safe_load((out / "config.scenes.yaml").read_text())["scenes"]
    assert resolved["n"] == 22 and resolved["size"] == 32 and resolved["seed"] == 4


@pytest.mark.parametrize("argv,message", [
    (["scenes", "render", "--n", "0", "--out", "X"], "invalid config"),
    (["serve-web", "/nonexistent/dir"], "no such folder"),
    (["serve-web", "X", "--host", "8.8.8.8"], "not a loopback"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path) if a == "X" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
