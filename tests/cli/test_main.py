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


_ENTRY_SCRIPT = """
import atexit, sys
import longlive.cli.main as cli

def fake_main():
    if sys.argv[1] == "pg":
        from longlive.parallel.mesh import init_parallel
        init_parallel(1, device="cpu").close()
    print("work done", end="")  # buffered (a pipe), so it is lost unless entry() flushes
    return 3

atexit.register(lambda: print(" | finalised", end=""))
cli.main = fake_main
cli.entry()
"""


@pytest.mark.parametrize("started", [True, False])
def test_entry_skips_interpreter_teardown_only_after_a_process_group(started):
    """After a process group, `longlive` flushes and leaves with os._exit (no finalisation, so no gloo
    worker can abort the finished run); otherwise it exits normally. The status comes through both ways."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _ENTRY_SCRIPT, "pg" if started else "plain"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout == ("work done" if started else "work done | finalised")
