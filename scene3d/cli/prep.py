"""`scene3d prep {scannet,refer,proposals}`: wiring only; each target lives in its own module."""

from __future__ import annotations

import importlib

TARGETS = [
    ("scannet", "scene3d.cli.prep_scannet", "raw ScanNet scans -> processed scene directories"),
    ("refer", "scene3d.cli.prep_refer", "ScanRefer / Multi3DRefer / Nr3D / Sr3D -> referring-sample jsonl"),
    ("proposals", "scene3d.cli.prep_proposals", "train learned instance proposals on annotated scenes"),
]


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    for tname, module, thelp in TARGETS:
        mod = importlib.import_module(module)
        tp = mod.add_parser(targets, tname, thelp)
        tp.set_defaults(_run=mod.run)
    return p


def run(args) -> int:  # replaced by the target's run through set_defaults
    raise AssertionError("unreachable")
