"""`scene3d demo`: not built yet (demo, issue #9)."""

from __future__ import annotations

from scene3d.cli import NotYetImplemented


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_ + " [not implemented yet]")
    p.set_defaults(_accepts_overrides=True)
    return p


def run(args) -> int:
    raise NotYetImplemented("demo", "demo, issue #9")
