"""`scene3d prep scannet RAW_SCANS_DIR OUT_DIR --labels TSV [--scenes ID...] [--split-file F] [--workers N]
[--force]`: raw ScanNet scans -> processed scene directories (logic in ``data_prep.scannet``)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("raw_scans_dir", type=Path, help="directory of <scene_id>/ scan folders as ScanNet lays them out")
    p.add_argument("out_dir", type=Path, help="output root; one <scene_id>/ directory per scene")
    p.add_argument("--labels", type=Path, required=True, help="scannetv2-labels.combined.tsv")
    p.add_argument("--scenes", nargs="+", metavar="ID", help="scene ids to process (default: every scan folder)")
    p.add_argument("--split-file", type=Path, action="append", metavar="F",
                   help="text file of scene ids, one per line (repeatable; joined with --scenes)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--force", action="store_true", help="redo scenes whose outputs are up to date")
    p.add_argument("--allow-unannotated", action="store_true",
                   help="process scans without aggregation.json (ScanNet test scans) as unannotated")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run(args) -> int:
    # lazy: `scene3d --help` and the other commands do not load it
    from data_prep.scannet import PrepConfig, ScanNetFormatError, process_scans, read_scene_list

    if args.workers < 1:
        print(f"scene3d prep scannet: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    scenes = None
    if args.scenes or args.split_file:
        scenes = list(args.scenes or [])
        try:
            for f in args.split_file or []:
                scenes += read_scene_list(f)
        except FileNotFoundError as e:
            print(f"scene3d prep scannet: error: {e}", file=sys.stderr)
            return 2
    try:
        summary = process_scans(args.raw_scans_dir, args.out_dir, args.labels, scenes=scenes, workers=args.workers,
                                force=args.force, config=PrepConfig(allow_unannotated=args.allow_unannotated),
                                progress=not args.no_progress)
    except (FileNotFoundError, ScanNetFormatError) as e:
        print(f"scene3d prep scannet: error: {e}", file=sys.stderr)
        return 2
    print(summary.format(), file=sys.stderr if summary.failed else sys.stdout)
    return 1 if summary.failed else 0
