"""`scene3d prep scannet`: not built yet (ScanNet preprocessing, issue #3)."""

from __future__ import annotations

from scene3d.cli import NotYetImplemented


def add_parser(sub, name, help_):
    return sub.add_parser(name, help=help_ + " [not implemented yet]")


def run(args) -> int:
    raise NotYetImplemented("prep scannet", "ScanNet preprocessing, issue #3")
