"""`scene3d demo [--quick] [--out DIR]`: the whole pipeline on synthetic ScanNet-format scenes (scene3d.demo)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute; used by CI)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 500; --quick: 8)")
    p.add_argument("--llm", choices=["auto", "smollm2", "tiny"], default="auto",
                   help="the LLM to train: auto (default) takes the pretrained SmolLM2 wherever set-up installed "
                        "it (`scene3d llm list`), else the tiny random model")
    return p


def run(args) -> int:
    from scene3d.demo import run_demo  # lazy: `scene3d --help` and the other commands do not load it

    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    run_demo(args.out, quick=args.quick, seed=args.seed, max_steps=args.steps, llm=args.llm)
    return 0
