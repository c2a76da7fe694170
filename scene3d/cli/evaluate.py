"""`scene3d eval` in two modes, chosen by the first argument:

* predictions-file mode: ``scene3d eval PREDICTIONS.jsonl --gt REFER.jsonl --processed DIR [--strict]
  [--out metrics.json]`` (format: docs/predictions_format.md; metrics: scene3d/metrics.py);
* checkpoint mode: ``scene3d eval CKPT [hydra overrides]`` where CKPT is a checkpoint directory, its
  ``checkpoints/`` parent or a run directory: runs the model over a referring split (configs/eval.yaml, e.g.
  ``eval.split=val eval.max_samples=100 data=scanrefer data.processed_dir=...``) and writes
  ``predictions.jsonl`` + ``metrics.json`` (scene3d.engine.evaluate.run_checkpoint_eval).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("predictions", type=Path, metavar="PREDICTIONS_OR_CKPT",
                   help="predictions jsonl (docs/predictions_format.md), or a checkpoint / run directory "
                        "followed by hydra overrides (configs/eval.yaml)")
    p.add_argument("--gt", type=Path, help="referring samples jsonl (scene3d prep refer); predictions mode")
    p.add_argument("--processed", type=Path, help="processed scene directories; predictions mode")
    p.add_argument("--strict", action="store_true",
                   help="count IoU > threshold (3D-STMN / TGNN) instead of >= (ScanRefer / Multi3DRefer)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score referring rows without a prediction as empty predictions instead of failing")
    p.add_argument("--out", type=Path, default=None, help="write metrics (+ per-sample scores) as json")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(_accepts_overrides=True)  # checkpoint mode only; predictions mode rejects them in run()
    return p


def _jsonable(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def evaluate_predictions_file(args) -> int:
    """The predictions-file mode (a checkpoint mode is added separately)."""
    from scene3d.metrics import evaluate_files, format_metrics
    from scene3d.utils.io import write_json_atomic

    ev = evaluate_files(args.predictions, args.gt, args.processed, strict=args.strict,
                        allow_missing=args.allow_missing, progress=not args.no_progress)
    print(f"threshold convention: IoU {'>' if args.strict else '>='} k")
    if ev.missing:
        print(f"{ev.missing} referring rows had no prediction (scored as empty)")
    print(format_metrics(ev.metrics))
    if args.out is not None:
        write_json_atomic(args.out, _jsonable({"strict": args.strict, "missing": ev.missing,
                                               "metrics": ev.metrics, "per_sample": ev.per_sample}))
        print(f"wrote {args.out}")
    return 0


def is_checkpoint_target(path: Path) -> bool:
    """A directory holding a checkpoint (checkpoint dir, ``checkpoints/`` dir or run dir)."""
    from scene3d.engine.checkpoint import resolve_checkpoint

    return path.is_dir() and resolve_checkpoint(path) is not None


def evaluate_checkpoint(args) -> int:
    """The checkpoint mode: compose configs/eval.yaml with the overrides and run the model."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from scene3d.config import compose, to_objects
    from scene3d.engine.evaluate import run_checkpoint_eval
    from scene3d.metrics import format_metrics

    given = [name for name, v in (("--gt", args.gt), ("--processed", args.processed), ("--out", args.out)) if v]
    if given or args.allow_missing:
        raise SystemExit(f"scene3d eval: {', '.join(given + (['--allow-missing'] if args.allow_missing else []))} "
                         "belong to the predictions-file mode; in checkpoint mode use overrides such as "
                         "eval.samples=FILE.jsonl eval.processed_dir=DIR out_dir=DIR")
    chosen = any(o.lstrip("+~").startswith("data=") for o in args.overrides)
    data_keys = [o for o in args.overrides if o.lstrip("+~").startswith("data.")]
    if data_keys and not chosen:
        # configs/eval.yaml has no data node unless one is chosen (the checkpoint's own data is used); hydra
        # would fail on it with "Unexpected type for root: NoneType"
        raise SystemExit(f"scene3d eval: error: {data_keys[0]}: data.* overrides need a data option first (e.g. "
                         "data=scanrefer data.processed_dir=DIR data.val=FILE.jsonl); to score another jsonl "
                         "with the checkpoint's data use eval.samples=FILE.jsonl [eval.processed_dir=DIR]")
    overrides = [f"checkpoint={args.predictions.resolve()}"] + list(args.overrides)
    if args.strict:
        overrides.append("eval.strict=true")
    if args.no_progress:
        overrides.append("eval.progress=false")
    try:
        cfg = to_objects(compose("eval", overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"scene3d eval: config error: {e}", file=sys.stderr)
        return 2
    res = run_checkpoint_eval(cfg)
    print(f"checkpoint {res.checkpoint} (step {res.step}); threshold convention: IoU "
          f"{'>' if cfg.eval.strict else '>='} k")
    print(format_metrics(res.metrics))
    print(f"wrote {res.predictions}\nwrote {res.metrics_file}")
    return 0


def run(args) -> int:
    target = args.predictions
    if not target.exists():
        raise SystemExit(f"scene3d eval: error: PREDICTIONS_OR_CKPT {target}: no such file or directory")
    if is_checkpoint_target(target):
        return evaluate_checkpoint(args)
    if target.is_dir():
        raise SystemExit(f"scene3d eval: {target} is a directory without a checkpoint (expected "
                         "model.safetensors + meta.json, a checkpoints/ dir or a run dir)")
    if args.overrides:
        raise SystemExit(f"scene3d eval: unrecognized arguments: {' '.join(args.overrides)} (hydra overrides "
                         "only apply to the checkpoint mode)")
    missing = [n for n, v in (("--gt", args.gt), ("--processed", args.processed)) if v is None]
    if missing:
        raise SystemExit(f"scene3d eval: the predictions-file mode needs {' and '.join(missing)}")
    return evaluate_predictions_file(args)
