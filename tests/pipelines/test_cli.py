"""`lensforge --help` and every command's `--help` render (argparse %-formats help strings)."""

import pytest

from pipelines import cli


def test_help_of_lensforge_and_of_every_command(capsys):
    for argv in [["--help"]] + [[name.replace("_", "-"), "--help"] for name in cli.COMMAND_MODULES]:
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0, argv
    out = capsys.readouterr().out
    assert "95 % CIs" in out and "export" in out
