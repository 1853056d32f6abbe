"""The `longlive` entry point: help for the command and every subcommand."""
import pytest

from longlive.cli.main import SUBCOMMANDS, main


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help_shows_its_own_options(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"longlive {name}" in out and ("--config" in out or "merge-lora" in out or "--preset" in out)
