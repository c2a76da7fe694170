"""`scene3d eval`: not built yet (evaluation CLI, issues #4 and #8)."""

from __future__ import annotations

from scene3d.cli import NotYetImplemented


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_ + " [not implemented yet]")
    p.set_defaults(_accepts_overrides=True)
    return p


def run(args) -> int:
    raise NotYetImplemented("eval", "evaluation CLI, issues #4 and #8")
