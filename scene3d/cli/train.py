"""`scene3d train [--print-config] [hydra overrides]`: the same as ``python -m scene3d.train`` (see scene3d/train.py)."""

from __future__ import annotations

import argparse


def experiments() -> list[tuple[str, str]]:
    """``(name, first description line)`` of each ``configs/experiment/*.yaml`` (``experiment=NAME``)."""
    from scene3d.config import config_dir  # lazy: `scene3d --help` and the other commands do not load it

    out = []
    for f in sorted((config_dir() / "experiment").glob("*.yaml")):
        about = ""
        for line in f.read_text(encoding="utf-8-sig").splitlines():
            text = line.lstrip("#").strip()
            if not line.startswith("#"):
                break
            if text and not text.startswith("@package"):
                about = text.rstrip(":")
                break
        out.append((f.stem, about))
    return out


def _epilog() -> str:
    try:
        found = experiments()
    except OSError as e:  # configs missing: say so in the help instead of failing
        return f"experiments: none found ({e})"
    width = max((len(n) for n, _ in found), default=0)
    lines = ["experiments (experiment=NAME):"] + [f"  {n:<{width}}  {about}" for n, about in found]
    return "\n".join(lines)


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_ + ".\nOverrides are hydra's key=value / group=option "
                       "(configs/train.yaml),\ne.g. experiment=synthetic_cpu trainer.max_steps=200 out_dir=runs/x",
                       epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.set_defaults(_accepts_overrides=True)
    return p


def run(args) -> int:
    from scene3d.train import main  # lazy: `scene3d --help` and the other commands do not load it

    return main((["--print-config"] if args.print_config else []) + list(args.overrides))
