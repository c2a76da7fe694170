"""`scene3d train [--print-config] [hydra overrides]`: the same as ``python -m scene3d.train`` (see scene3d/train.py)."""

from __future__ import annotations


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_ + ". Overrides are hydra's key=value / group=option "
                       "(configs/train.yaml), e.g. experiment=synthetic_cpu trainer.max_steps=200 out_dir=runs/x")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.set_defaults(_accepts_overrides=True)
    return p


def run(args) -> int:
    from scene3d.train import main

    return main((["--print-config"] if args.print_config else []) + list(args.overrides))
