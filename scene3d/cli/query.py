"""`scene3d query`: not built yet (query API, issue #9)."""

from __future__ import annotations

from scene3d.cli import NotYetImplemented


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_ + " [not implemented yet]")
    p.set_defaults(_accepts_overrides=True)
    return p


def run(args) -> int:
    raise NotYetImplemented("query", "query API, issue #9")
