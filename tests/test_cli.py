"""The `scene3d` console command: every subcommand has its help and its runner; plain-text help; errors in one line."""

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


def _help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:  # argparse prints the help on stdout and exits 0
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _one_line_helps() -> dict:
    from scene3d.cli.prep import TARGETS

    helps = {(name,): help_ for name, _, help_ in SUBCOMMANDS}
    helps.update({("prep", name): help_ for name, _, help_ in TARGETS})
    return helps


@pytest.mark.parametrize("command", sorted(_one_line_helps()), ids=" ".join)
def test_every_subcommand_has_its_own_help(command, capsys):
    out = _help_of([*command, "--help"], capsys)
    assert out.startswith(f"usage: scene3d {' '.join(command)} ")
    assert _one_line_helps()[command] in " ".join(out.split())  # its description, not the top-level help


def test_top_level_help_is_plain_text(capsys):
    out = _help_of(["--help"], capsys)
    assert "``" not in out and ":func:" not in out
    assert "scene3d: 3D referring segmentation" in out and "--debug" in out


def test_train_help_lists_every_experiment(capsys):
    from scene3d.config import config_dir

    out = _help_of(["train", "--help"], capsys)
    names = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
    assert "synthetic_cpu" in names
    listed = out.split("experiments (experiment=NAME):", 1)[1]
    for name in names:
        assert f"\n  {name} " in listed, name


def test_describe_error_is_one_line_naming_the_file(tmp_path):
    from scene3d.cli import describe_error

    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(FileExistsError) as exc:
        f.mkdir(parents=True, exist_ok=True)
    assert describe_error(exc.value) == f"{f}: exists and is not a directory"
    missing = tmp_path / "x"
    assert describe_error(FileNotFoundError(2, "No such file or directory", str(missing))) == \
        f"{missing}: No such file or directory"
    assert describe_error(ValueError("a.json: bad\n  second line")) == "a.json: bad second line"
    assert describe_error(KeyError("k")) == "KeyError: 'k'"


def test_unknown_arguments_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["synth", "/tmp/x", "--bogus"])
    assert exc.value.code == 2
