"""The ``scene3d`` console command.

Each subcommand lives in its own module of this package with two functions: ``add_parser(subparsers)``
and ``run(args) -> int``. Parsing is here; logic lives in the library (``data_prep``, ``scene3d.*``).

Errors: an exception a subcommand raises is printed as one line naming the file or argument
(``scene3d <command>: error: ...``) with exit status 1; ``--debug`` (anywhere on the command line) shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from scene3d import __version__

#: The top-level ``--help`` description (plain text; the module docstring is reST for the API docs).
DESCRIPTION = "scene3d: 3D referring segmentation on ScanNet-format scenes."
DEBUG_FLAG = "--debug"

#: Subcommands in help order: (name, module, one-line help).
SUBCOMMANDS = [
    ("synth", "scene3d.cli.synth", "write synthetic ScanNet-format scenes (raw scans, label tsv, annotations)"),
    ("prep", "scene3d.cli.prep", "preprocess ScanNet scans or referring datasets"),
    ("train", "scene3d.cli.train", "train a model from hydra configs"),
    ("eval", "scene3d.cli.evaluate", "evaluate predictions or a checkpoint"),
    ("query", "scene3d.cli.query", "segment the points a sentence refers to"),
    ("demo", "scene3d.cli.demo", "run the whole pipeline on synthetic scenes"),
    ("llm", "scene3d.cli.llm", "convert and list the pretrained LLMs on this machine"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scene3d", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"scene3d {__version__}")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the full traceback of an error (it may also follow the subcommand)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module, help_ in SUBCOMMANDS:
        mod = importlib.import_module(module)
        p = mod.add_parser(sub, name, help_)
        p.set_defaults(_run=mod.run)
    return parser


def describe_error(e: BaseException) -> str:
    """One line for an error: the file and what is wrong with it for OS errors, else the message (with the
    exception's type unless it is a ``ValueError`` / ``OSError``, whose messages here name the file)."""
    if isinstance(e, OSError) and e.filename is not None:
        if isinstance(e, FileExistsError) and not Path(e.filename).is_dir():
            what = "exists and is not a directory"
        else:
            what = e.strerror or str(e)
        msg = f"{e.filename}: {what}" + (f" ({e.filename2})" if e.filename2 is not None else "")
    else:
        msg = str(e).strip()
        if not isinstance(e, (ValueError, OSError)) or not msg:
            msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return " ".join(msg.split())  # one line: hydra / omegaconf messages span several


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Only hydra-driven commands take free-form overrides (key=value); elsewhere unknown args are errors.
    if extra and not getattr(args, "_accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the console's last line of defence: one line, not a traceback
        if debug:
            raise
        command = " ".join(a for a in (args.command, getattr(args, "target", None)) if a)
        print(f"scene3d {command}: error: {describe_error(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
