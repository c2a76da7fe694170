"""The ``scene3d`` console command.

Each subcommand lives in its own module of this package with two functions: ``add_parser(subparsers)``
and ``run(args) -> int``. Parsing is here; logic lives in the library (``data_prep``, ``scene3d.*``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommands in help order: (name, module, one-line help).
SUBCOMMANDS = [
    ("synth", "scene3d.cli.synth", "write synthetic ScanNet-format scenes (raw scans, label tsv, annotations)"),
    ("prep", "scene3d.cli.prep", "preprocess ScanNet scans or referring datasets"),
    ("train", "scene3d.cli.train", "train a model from hydra configs"),
    ("eval", "scene3d.cli.evaluate", "evaluate predictions or a checkpoint"),
    ("query", "scene3d.cli.query", "segment the points a sentence refers to"),
    ("demo", "scene3d.cli.demo", "run the whole pipeline on synthetic scenes"),
]


class NotYetImplemented(SystemExit):
    """Raised by subcommands that are not built yet (exit status 3, message on stderr)."""

    def __init__(self, what: str, issue: str):
        super().__init__(3)
        print(f"scene3d {what}: not implemented yet ({issue}).", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scene3d", description=__doc__.splitlines()[0])
    from scene3d import __version__

    parser.add_argument("--version", action="version", version=f"scene3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module, help_ in SUBCOMMANDS:
        mod = importlib.import_module(module)
        p = mod.add_parser(sub, name, help_)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
