"""`scene3d prep refer --dataset {scanrefer,multi3drefer,nr3d,sr3d} SRC --out OUT.jsonl [--processed DIR]
[--labels TSV]`: a referring dataset -> referring-sample jsonl (row format: data_prep/refer.py).

`scene3d prep refer --dataset generated --processed DIR --out OUT.jsonl [--scenes ID ...] [--seed N]
[--per-op N] [--zero-share F]`: expressions generated on the annotated scenes of DIR (no SRC; data_prep/real_refer.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep import refer
from data_prep.refer import DATASETS
from data_prep.synth_refer import MAX_PER_OP

GENERATED = "generated"


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("src", type=Path, nargs="?", default=None,
                   help="ScanRefer / Multi3DRefer json, or Nr3D / Sr3D csv (none with --dataset generated)")
    p.add_argument("--dataset", required=True, choices=DATASETS + (GENERATED,),
                   help=f"format of SRC; {GENERATED}: expressions generated on the annotated scenes of --processed")
    p.add_argument("--out", required=True, type=Path, help="output jsonl (written atomically)")
    p.add_argument("--processed", type=Path, default=None,
                   help="processed scenes: rows whose scene or objects are missing there are reported and dropped")
    p.add_argument("--labels", type=Path, default=None,
                   help="scannetv2-labels.combined.tsv (required for scanrefer: unique/multiple flags)")
    p.add_argument("--unique-from", choices=["scanrefer", "processed"], default="scanrefer",
                   help="scanrefer (default): count a target's class among the objects SRC describes, as "
                        "ScanRefer does (exact for the full split files); processed: among all objects of "
                        "the processed scene (approximation for subsets; needs --processed)")
    p.add_argument("--scenes", nargs="+", metavar="ID", default=None,
                   help=f"{GENERATED}: only these scenes of --processed (default: all)")
    p.add_argument("--seed", type=int, default=0, help=f"{GENERATED}: sampling seed (default 0)")
    p.add_argument("--per-op", type=int, default=None, metavar="N",
                   help=f"{GENERATED}: expressions per (op, kind) and scene (default {MAX_PER_OP})")
    p.add_argument("--zero-share", type=float, default=None, metavar="F",
                   help=f"{GENERATED}: at most this share of each op's expressions have no target, e.g. 0.5 for "
                        "training rows (default: no cap; absent objects then dominate 'attr' and 'near')")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(_accepts_overrides=False)
    return p


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.no_progress
    if args.processed is not None and not args.processed.is_dir():
        raise SystemExit(f"scene3d prep refer: error: --processed {args.processed}: not a directory")
    if args.dataset == GENERATED:
        return _run_generated(args, progress)
    if args.src is None:
        raise SystemExit(f"scene3d prep refer: error: SRC (the {args.dataset} file) is required")
    if args.scenes is not None or args.per_op is not None or args.zero_share is not None:
        raise SystemExit(f"scene3d prep refer: error: --scenes / --per-op / --zero-share are for --dataset "
                         f"{GENERATED} only")
    if args.dataset == "scanrefer":
        if args.labels is None:
            raise SystemExit("scene3d prep refer: error: --labels TSV is required for --dataset scanrefer "
                             "(ScanRefer's 18-class mapping)")
        raw2nyu = refer.load_label_map(args.labels)
        population = None
        if args.unique_from == "processed":
            if args.processed is None:
                raise SystemExit("scene3d prep refer: error: --unique-from processed needs --processed DIR")
            scenes = {r["scene_id"] for r in refer.load_json_list(args.src)}
            population = refer.processed_population(args.processed, scenes)
        rows = refer.read_scanrefer(args.src, raw2nyu, population=population, progress=progress)
    elif args.dataset == "multi3drefer":
        rows = refer.read_multi3drefer(args.src, progress=progress)
    else:
        rows = refer.read_referit3d(args.src, args.dataset, progress=progress)
    if not rows:
        raise SystemExit(f"scene3d prep refer: error: {args.src}: no {args.dataset} rows; {args.out} not written")
    if args.processed is not None:
        report = refer.filter_against_processed(rows, args.processed)
        rows = report.kept
        if report.dropped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.reasons.items()))
            if not rows:  # an empty jsonl would only fail later, in training or evaluation
                raise SystemExit(f"scene3d prep refer: error: all {len(report.dropped)} rows of {args.src} were "
                                 f"dropped against --processed {args.processed} ({reasons}); {args.out} not "
                                 "written (an earlier one is kept)")
            print(f"dropped {len(report.dropped)} rows: {reasons}")
    n = refer.write_refer_jsonl(rows, args.out)
    print(f"wrote {n} {args.dataset} rows to {args.out}")
    return 0


def _run_generated(args, progress: bool) -> int:
    from data_prep import real_refer  # lazy: only this mode needs it

    if args.src is not None:
        raise SystemExit(f"scene3d prep refer: error: --dataset {GENERATED} takes no SRC ({args.src}); it reads "
                         "the scenes of --processed DIR")
    if args.processed is None:
        raise SystemExit(f"scene3d prep refer: error: --dataset {GENERATED} needs --processed DIR (annotated scenes)")
    per_op = MAX_PER_OP if args.per_op is None else args.per_op
    if per_op < 1:
        raise SystemExit(f"scene3d prep refer: error: --per-op must be >= 1, got {per_op}")
    if args.zero_share is not None and not 0.0 <= args.zero_share < 1.0:
        raise SystemExit(f"scene3d prep refer: error: --zero-share must be in [0, 1), got {args.zero_share}")
    try:
        rep = real_refer.generate_rows(args.processed, args.scenes, seed=args.seed, max_per_op=per_op,
                                       progress=progress, zero_share=args.zero_share)
    except (FileNotFoundError, ValueError) as e:  # RealSceneError is a ValueError naming the scene
        raise SystemExit(f"scene3d prep refer: error: {e}; {args.out} not written") from None
    n = refer.write_refer_jsonl(rep.rows, args.out)
    skipped = sum(rep.skipped_objects.values())
    note = f"; {skipped} objects without a box or with < {real_refer.MIN_POINTS} points left out" if skipped else ""
    print(f"wrote {n} {GENERATED} rows of {len(rep.per_scene)} scenes to {args.out} "
          f"({rep.seconds / len(rep.per_scene):.2f} s per scene{note})")
    return 0
