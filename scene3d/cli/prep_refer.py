"""`scene3d prep refer`: not built yet (referring datasets, issue #4)."""

from __future__ import annotations

from scene3d.cli import NotYetImplemented


def add_parser(sub, name, help_):
    return sub.add_parser(name, help=help_ + " [not implemented yet]")


def run(args) -> int:
    raise NotYetImplemented("prep refer", "referring datasets, issue #4")
