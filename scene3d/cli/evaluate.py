"""`scene3d eval` in two modes, chosen by the first argument:

* predictions-file mode: ``scene3d eval PREDICTIONS.jsonl --gt REFER.jsonl --processed DIR [--mask-acc OP]
  [--box-acc OP] [--f1 OP] [--multi-mask-box first|union] [--out metrics.json]`` (format:
  docs/predictions_format.md; metrics and their default conventions: scene3d/metrics.py);
* checkpoint mode: ``scene3d eval CKPT [hydra overrides]`` where CKPT is a checkpoint directory, its
  ``checkpoints/`` parent or a run directory: runs the model over a referring split (configs/eval.yaml, e.g.
  ``eval.split=val eval.max_samples=100 data=scanrefer data.processed_dir=...``) and writes
  ``predictions.jsonl`` + ``metrics.json`` (scene3d.evaluate.run_checkpoint_eval). ``--objects proposals``
  takes the objects from geometric proposals instead of the ground-truth instances; masks are still scored
  against the ground-truth target points (scene3d.engine.evaluate).
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("predictions", type=Path, metavar="PREDICTIONS_OR_CKPT",
                   help="predictions jsonl (docs/predictions_format.md), or a checkpoint / run directory "
                        "followed by hydra overrides (configs/eval.yaml)")
    p.add_argument("--gt", type=Path, help="referring samples jsonl (scene3d prep refer); predictions mode")
    p.add_argument("--processed", type=Path, help="processed scene directories; predictions mode")
    conv = p.add_argument_group(
        "metric conventions (predictions mode; defaults follow the evaluators of the published tables; "
        "OP is '>' or '>=', also spelled gt / ge)")
    conv.add_argument("--mask-acc", metavar="OP", default=None,
                      help="point-mask Acc@k counts IoU OP k (default '>': 3D-STMN tools/test.py, "
                           "MDIN tools/test_3dgres.py)")
    conv.add_argument("--box-acc", metavar="OP", default=None,
                      help="box Acc@k counts IoU OP k (default '>=': ScanRefer, M3DRef-CLIP scanrefer_evaluator.py)")
    conv.add_argument("--f1", metavar="OP", default=None,
                      help="Multi3DRefer box F1@k and mask F1@k count IoU OP k (default '>=': M3DRef-CLIP "
                           "multi3drefer_evaluator.py)")
    conv.add_argument("--multi-mask-box", metavar="first|union", default=None,
                      help="box of a single-target row with several predicted masks: the first mask's "
                           "(default, M3DRef-CLIP scores aabb_bound[0]) or the union's")
    conv.add_argument("--strict", action="store_true",
                      help="deprecated, changes nothing: point-mask Acc@k already counts IoU > k by default, "
                           "box metrics keep >= (use --box-acc / --f1 to change those)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score referring rows without a prediction as empty predictions instead of failing")
    p.add_argument("--out", type=Path, default=None, help="write metrics (+ per-sample scores) as json")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--objects", metavar="gt|proposals", default=None,
                   help="checkpoint mode: where the objects come from: the scene's ground-truth instances (gt, "
                        "default) or geometric proposals (proposals; predicted masks are scored against the "
                        "ground-truth target points, as Chat-Scene on Mask3D proposals)")
    p.add_argument("--proposal-model", type=Path, default=None, metavar="DIR",
                   help="with --objects proposals: take the learned instance proposals of this model directory "
                        "(scene3d prep proposals) instead of the geometric ones")
    p.add_argument("--label-model", type=Path, default=None, metavar="DIR",
                   help="for a model whose prompt writes object class names (model.referring.object_labels): the "
                        "instance-proposal model directory that names the objects (default: the checkpoint's "
                        "model.label_model)")
    p.add_argument("--turns", type=int, default=None, metavar="N",
                   help="checkpoint mode: test-time quarter turns: also answer each scene turned 1..N-1 quarter turns "
                        "about z (the texts' compass words with it) and keep the answer most orientations give "
                        "(1-4; the same as eval.turns=N)")
    p.set_defaults(_accepts_overrides=True)  # checkpoint mode only; predictions mode rejects them in run()
    return p


#: (flag, Conventions field) of the convention options.
CONVENTION_FLAGS = (("--mask-acc", "mask_acc"), ("--box-acc", "box_acc"), ("--f1", "f1"),
                    ("--multi-mask-box", "multi_mask_box"))
STRICT_NOTE = ("note: --strict is deprecated and changes nothing: point-mask Acc@k counts IoU > k by default "
               "(3D-STMN, MDIN); box Acc@k and F1@k keep >= (ScanRefer, M3DRef-CLIP)")


def conventions_from_args(args):
    """The :class:`~scene3d.metrics.Conventions` of the flags; a bad value exits with a line naming its flag."""
    from scene3d.metrics import Conventions, parse_op  # lazy: `scene3d --help` and the other commands do not load it

    given = {}
    for flag, field in CONVENTION_FLAGS:
        value = getattr(args, field)
        if value is None:
            continue
        if field == "multi_mask_box":
            if value not in ("first", "union"):
                raise SystemExit(f"scene3d eval: {flag}: expected 'first' or 'union', got {value!r}")
            given[field] = value
        else:
            try:
                given[field] = parse_op(value, flag)
            except ValueError as e:
                raise SystemExit(f"scene3d eval: {e}") from None
    if args.strict and given.get("mask_acc", ">") != ">":
        raise SystemExit(f"scene3d eval: --strict contradicts --mask-acc {args.mask_acc} (--strict is deprecated; "
                         "drop it)")
    return Conventions(**given)


def evaluate_predictions_file(args) -> int:
    """The predictions-file mode."""
    # lazy: `scene3d --help` and the other commands do not load it
    from scene3d.metrics import TABLE_LEGEND, evaluate_files, format_metrics
    from scene3d.utils.io import jsonable, write_json_atomic

    conventions = conventions_from_args(args)
    if args.strict:
        print(STRICT_NOTE)
    ev = evaluate_files(args.predictions, args.gt, args.processed, conventions,
                        allow_missing=args.allow_missing, progress=not args.no_progress)
    print(f"conventions: {conventions.describe()}")
    if ev.missing:
        print(f"{ev.missing} referring rows had no prediction (scored as empty)")
    print(format_metrics(ev.metrics))
    print(TABLE_LEGEND)
    if args.out is not None:
        write_json_atomic(args.out, jsonable({"conventions": conventions.as_dict(), "missing": ev.missing,
                                              "metrics": ev.metrics, "per_sample": ev.per_sample}))
        print(f"wrote {args.out}")
    return 0


def is_checkpoint_target(path: Path) -> bool:
    """A directory holding a checkpoint (checkpoint dir, ``checkpoints/`` dir or run dir)."""
    # lazy: `scene3d --help` and the other commands do not load it
    from scene3d.engine.checkpoint import resolve_checkpoint

    return path.is_dir() and resolve_checkpoint(path) is not None


def evaluate_checkpoint(args) -> int:
    """The checkpoint mode: compose configs/eval.yaml with the overrides and run the model."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from scene3d.config import compose, to_objects  # lazy: `scene3d --help` and the other commands do not load it
    from scene3d.evaluate import agreement_line, run_checkpoint_eval
    from scene3d.metrics import TABLE_LEGEND, Conventions, format_metrics

    given = [name for name, v in (("--gt", args.gt), ("--processed", args.processed), ("--out", args.out)) if v]
    if given or args.allow_missing:
        raise SystemExit(f"scene3d eval: {', '.join(given + (['--allow-missing'] if args.allow_missing else []))} "
                         "belong to the predictions-file mode; in checkpoint mode use overrides such as "
                         "eval.samples=FILE.jsonl eval.processed_dir=DIR out_dir=DIR")
    if args.objects is not None:
        from scene3d.engine.evaluate import OBJECT_SOURCES  # lazy, as above

        if args.objects not in OBJECT_SOURCES:
            raise SystemExit(f"scene3d eval: --objects: expected one of {', '.join(OBJECT_SOURCES)}, "
                             f"got {args.objects!r}")
    flags = [flag for flag, field in CONVENTION_FLAGS if getattr(args, field) is not None]
    if flags:
        raise SystemExit(f"scene3d eval: {', '.join(flags)} belong to the predictions-file mode; checkpoint mode "
                         "scores with the default conventions (re-score its predictions.jsonl with "
                         "scene3d eval predictions.jsonl --gt ... --processed ... to change them)")
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
        print(STRICT_NOTE)
        overrides.append("eval.strict=true")
    if args.no_progress:
        overrides.append("eval.progress=false")
    if args.objects is not None:
        overrides.append(f"eval.objects={args.objects}")
    if args.proposal_model is not None:
        if args.objects != "proposals":
            raise SystemExit("scene3d eval: --proposal-model needs --objects proposals")
        if not args.proposal_model.is_dir():
            raise SystemExit(f"scene3d eval: --proposal-model {args.proposal_model}: not a directory")
        overrides.append(f"eval.proposal_model={args.proposal_model.resolve()}")
    if args.turns is not None:
        overrides.append(f"eval.turns={args.turns}")
    if args.label_model is not None:
        if not args.label_model.is_dir():
            raise SystemExit(f"scene3d eval: --label-model {args.label_model}: not a directory")
        overrides.append(f"eval.label_model={args.label_model.resolve()}")
    try:
        cfg = to_objects(compose("eval", overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"scene3d eval: config error: {e}", file=sys.stderr)
        return 2
    res = run_checkpoint_eval(cfg)
    print(f"checkpoint {res.checkpoint} (step {res.step}); conventions: {Conventions().describe()}")
    if cfg.eval.objects == "proposals":
        per = list(res.objects.values())
        counts = [o["num_objects"] for o in per]
        kind = "learned instance" if cfg.eval.proposal_model else "geometric"
        print(f"objects: {kind} proposals ({min(counts)}-{max(counts)} per scene over {len(per)} scenes); "
              "masks scored against the ground-truth target points")
    print(format_metrics(res.metrics))
    if cfg.eval.turns > 1:
        print(agreement_line(res.agreement, cfg.eval.turns))
    print(TABLE_LEGEND)
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
    for flag, value in (("--objects", args.objects), ("--turns", args.turns)):
        if value is not None:
            raise SystemExit(f"scene3d eval: {flag} belongs to the checkpoint mode (a predictions file already "
                             "holds its masks)")
    if args.overrides:
        raise SystemExit(f"scene3d eval: unrecognized arguments: {' '.join(args.overrides)} (hydra overrides "
                         "only apply to the checkpoint mode)")
    missing = [n for n, v in (("--gt", args.gt), ("--processed", args.processed)) if v is None]
    if missing:
        raise SystemExit(f"scene3d eval: the predictions-file mode needs {' and '.join(missing)}")
    return evaluate_predictions_file(args)
