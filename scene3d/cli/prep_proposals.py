"""`scene3d prep proposals --processed DIR --scenes ID ... --out MODEL_DIR [--steps N] [--seed N]`: train the
learned instance proposals (``scene3d.tokenizer.instance_proposals``) on annotated processed scenes (or
mmdetection3d exports) and write the model directory (safetensors + config.json). Use it with
``scene3d eval ... --objects proposals --proposal-model MODEL_DIR`` and ``Segmenter(..., proposal_model=)``."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--processed", type=Path, required=True,
                   help="directory of processed scenes (or mmdetection3d exports) with instance labels")
    p.add_argument("--scenes", nargs="+", metavar="ID", required=True, help="the scenes to train on")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--steps", type=int, default=1200, help="U-Net training steps, one augmented scan each (default 1200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(_accepts_overrides=False)
    return p


def run(args) -> int:
    # lazy: `scene3d --help` and the other commands do not load spconv / torch
    from scene3d.data.scene import load_processed_scene
    from scene3d.tokenizer.instance_proposals import scan_from_scene, train_instance_model

    if args.steps < 1:
        print(f"scene3d prep proposals: error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    if not args.processed.is_dir():
        print(f"scene3d prep proposals: error: --processed {args.processed}: not a directory", file=sys.stderr)
        return 2
    # a missing or unannotated scene is a one-line error naming it (load_processed_scene, scan_from_scene)
    scans = [scan_from_scene(load_processed_scene(args.processed / sid)) for sid in args.scenes]
    model = train_instance_model(scans, steps=args.steps, seed=args.seed, progress=not args.no_progress,
                                 log=lambda m: print(m, file=sys.stderr))
    model.save(args.out)
    print(f"wrote instance-proposal model trained on {', '.join(args.scenes)} ({args.steps} steps, "
          f"{model.meta['score_candidates']} scored candidates) to {args.out}")
    return 0
