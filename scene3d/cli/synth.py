"""`scene3d synth OUT_DIR --scenes N --seed S [--preset tiny|real]`: synthetic ScanNet-format scenes."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("out_dir", type=Path, help="output directory (scans/<scene_id>/ and the label tsv go here)")
    p.add_argument("--scenes", type=int, default=4, help="number of scenes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument("--preset", choices=["tiny", "real"], default="tiny",
                   help="tiny: a few thousand vertices per scene; real: ScanNet density (~150k vertices)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="fraction of scenes in the val split")
    return p


def run(args) -> int:
    from data_prep.synth import generate_dataset  # lazy: `scene3d --help` and the other commands do not load it

    if args.scenes < 1:
        raise SystemExit(f"--scenes must be >= 1, got {args.scenes}")
    summary = generate_dataset(args.out_dir, num_scenes=args.scenes, seed=args.seed, preset=args.preset,
                               val_fraction=args.val_fraction, progress=True)
    print(f"wrote {len(summary['scenes'])} scenes to {args.out_dir / 'scans'}")
    for key, path in summary["files"].items():
        print(f"  {key}: {path}")
    return 0
