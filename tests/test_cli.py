"""The `scene3d` console command: subcommands exist; unfinished ones say so and exit non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scene3d.cli import SUBCOMMANDS, build_parser, main


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name, _, _ in SUBCOMMANDS:
        assert name in text


def test_console_script_runs_from_any_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scene3d", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "synth" in out.stdout


def test_not_yet_implemented_says_so_and_exits_nonzero(capsys):
    from scene3d.cli import NotYetImplemented

    with pytest.raises(SystemExit) as exc:
        raise NotYetImplemented("thing", "issue #99")
    assert exc.value.code == 3
    assert "scene3d thing: not implemented yet (issue #99)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--help"], ["eval", "--help"], ["query", "--help"], ["demo", "--help"],
                                  ["prep", "scannet", "--help"], ["prep", "refer", "--help"]])
def test_every_subcommand_is_implemented(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 0
    assert "not implemented" not in capsys.readouterr().out


def test_unknown_arguments_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["synth", "/tmp/x", "--bogus"])
    assert exc.value.code == 2
