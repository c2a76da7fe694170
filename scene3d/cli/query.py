"""`scene3d query CKPT SCENE "text" [--out DIR] [--device cpu]`: segment the points a sentence refers to.

``CKPT`` is a checkpoint dir (or its run dir); ``SCENE`` anything :meth:`scene3d.api.Segmenter.load_scene`
reads (processed / Pointcept / raw ScanNet scan dir, mmdet3d export, mesh or point cloud file). Prints the
answer (objects, scores, boxes, points) and writes ``<scene>_<query>.ply`` and ``.png`` into ``--out``.
Logic lives in :mod:`scene3d.api` and :mod:`scene3d.viz`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("checkpoint", type=Path, help="checkpoint dir, its checkpoints/ parent or the training run dir")
    p.add_argument("scene", type=Path, help="scene dir (processed, Pointcept, raw ScanNet scan), mmdet3d export, "
                                            "or a mesh / point cloud file (ply, obj, pcd, ...)")
    p.add_argument("text", nargs="+", help="the query (several words may be given unquoted)")
    p.add_argument("--out", type=Path, default=Path("query_out"), help="output folder (default ./query_out)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-pictures", action="store_true", help="print the answer only, write no PLY/PNG")
    p.set_defaults(_accepts_overrides=False)
    return p


def format_result(scene, result) -> str:
    """The printed answer: one line per chosen object, then the point count."""
    from scene3d.viz import object_names

    lines = [f'query: "{result.text}"', f"answer: {result.answer}  (objects from {result.source})"]
    if not len(result.objects):
        lines.append("objects: none (the model says no object matches)")
    names = object_names(result, scene)
    for t, name in enumerate(names):
        c, s = result.boxes[t, :3], result.boxes[t, 3:]
        lines.append(f"  {name}: {int(result.object_masks[t].sum())} points, box center "
                     f"[{c[0]:.2f}, {c[1]:.2f}, {c[2]:.2f}] size [{s[0]:.2f}, {s[1]:.2f}, {s[2]:.2f}]")
    lines.append(f"points: {result.num_points} of {len(result.point_mask)}")
    return "\n".join(lines)


def run(args) -> int:
    from scene3d.api import Segmenter
    from scene3d.engine.checkpoint import CheckpointError

    text = " ".join(args.text)
    if not text.strip():
        print("scene3d query: error: text: the query is empty", file=sys.stderr)
        return 2
    try:
        seg = Segmenter.from_pretrained(args.checkpoint, device=args.device)
        scene = seg.load_scene(args.scene)
        kind = "instances" if scene.has_instances else "proposals"
        print(f"scene {scene.scene_id} ({scene.source}): {scene.num_points} points, objects from {kind}")
        result = seg.segment(scene, text)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"scene3d query: error: {e}", file=sys.stderr)
        return 2
    print(format_result(scene, result))
    if not args.no_pictures:
        from scene3d.viz import save_result

        saved = save_result(scene, result, args.out)
        print(f"wrote {saved.ply}")
        print(f"wrote {saved.png}")
    return 0
