"""`scene3d eval PREDICTIONS.jsonl --gt REFER.jsonl --processed DIR [--strict] [--out metrics.json]`.

Predictions-file mode (format: docs/predictions_format.md); metrics: scene3d/metrics.py.
"""

from __future__ import annotations

import math
from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("predictions", type=Path, help="predictions jsonl (docs/predictions_format.md)")
    p.add_argument("--gt", required=True, type=Path, help="referring samples jsonl (scene3d prep refer)")
    p.add_argument("--processed", required=True, type=Path, help="processed scene directories")
    p.add_argument("--strict", action="store_true",
                   help="count IoU > threshold (3D-STMN / TGNN) instead of >= (ScanRefer / Multi3DRefer)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score referring rows without a prediction as empty predictions instead of failing")
    p.add_argument("--out", type=Path, default=None, help="write metrics (+ per-sample scores) as json")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(_accepts_overrides=False)
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


def run(args) -> int:
    return evaluate_predictions_file(args)
