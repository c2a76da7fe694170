"""`scene3d query CKPT SCENE "text" [--out DIR] [--device cpu] [--proposal-model DIR]`: segment the points a sentence refers to.

``CKPT`` is a checkpoint dir (or its run dir); ``SCENE`` anything :meth:`scene3d.api.Segmenter.load_scene`
reads (processed / Pointcept / raw ScanNet scan dir, mmdet3d export, mesh or point cloud file). Prints the
answer (objects, scores, boxes, points; how a large scene was downsampled; a ``warning:`` line for every way
the answer is degraded, e.g. every object scored below the threshold) and writes ``<scene>_<query>.ply`` and
``.png`` into ``--out``.
Logic lives in :mod:`scene3d.api` and :mod:`scene3d.viz`.
"""

from __future__ import annotations

import sys
import warnings
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
    p.add_argument("--max-points", type=int, default=None,
                   help="voxel-downsample scenes with more points before the model sees them (default: the API's "
                        "200000; 0: never); masks still cover every point")
    p.add_argument("--proposal-model", type=Path, default=None, metavar="DIR",
                   help="a scan without instances gets the learned instance proposals of this model directory "
                        "(scene3d prep proposals) instead of the geometric ones")
    p.add_argument("--label-model", type=Path, default=None, metavar="DIR",
                   help="for a model whose prompt writes object class names: the instance-proposal model directory "
                        "that names the objects (default: the checkpoint's model.label_model)")
    p.add_argument("--turns", type=int, default=1, metavar="N",
                   help="test-time quarter turns: also answer the scene turned 1..N-1 quarter turns about z (the "
                        "query's compass words with it) and keep the answer most orientations give (1-4; default "
                        "1: the scene as given only)")
    p.set_defaults(_accepts_overrides=False)
    return p


#: how the printed answer names where its objects came from (SegmentResult.source)
SOURCE_WORDS = {"identifiers": "named by the LLM's answer", "decoder": "chosen by the mask decoder's scores"}


def format_result(scene, result) -> str:
    """The printed answer: what was found (never "none" while objects come back), the LLM's own text, one
    line per chosen object, the point count, how the scene was downsampled and every warning of the result."""
    from scene3d.viz import object_names  # lazy: `scene3d --help` and the other commands do not load it

    t = len(result.objects)
    lines = [f'query: "{result.text}"']
    if t:
        lines.append(f"answer: {t} object{'s' if t > 1 else ''} ({SOURCE_WORDS.get(result.source, result.source)})")
    elif result.all_below_threshold:
        lines.append(f"answer: none (every object scored below the threshold; best "
                     f"{float(result.all_scores.max()):.3f})")
    else:
        lines.append("answer: none (the model says no object matches)")
    lines.append(f"llm text: {result.answer!r}")
    if result.turns > 1:
        lines.append(f"orientations: {round(result.agreement * result.turns)} of {result.turns} quarter turns gave this "
                     "answer")
    names = object_names(result, scene)
    for k, name in enumerate(names):
        c, s = result.boxes[k, :3], result.boxes[k, 3:]
        lines.append(f"  {name}: {int(result.object_masks[k].sum())} points, score {float(result.scores[k]):.3f}, "
                     f"box center [{c[0]:.2f}, {c[1]:.2f}, {c[2]:.2f}] size [{s[0]:.2f}, {s[1]:.2f}, {s[2]:.2f}]")
    n = len(result.point_mask)
    lines.append(f"points: {result.num_points} of {n}")
    if result.downsampled:
        lines.append(f"downsampled: the model saw {result.model_points} of {n} points ({result.downsample_voxel:.3g} m "
                     f"voxels); the masks cover all {n}")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def run(args) -> int:
    # lazy: `scene3d --help` and the other commands do not load it
    from scene3d.api import DegradedSceneWarning, Segmenter
    from scene3d.engine.checkpoint import CheckpointError

    text = " ".join(args.text)
    if not text.strip():
        print("scene3d query: error: text: the query is empty", file=sys.stderr)
        return 2
    if args.max_points is not None and args.max_points < 0:
        print("scene3d query: error: --max-points must be >= 0", file=sys.stderr)
        return 2
    try:
        seg = Segmenter.from_pretrained(args.checkpoint, device=args.device, proposal_model=args.proposal_model,
                                        label_model=args.label_model, turns=args.turns)
        if args.max_points is not None:
            seg.max_points = args.max_points or None
        scene = seg.load_scene(args.scene)
        kind = ("instances" if scene.has_instances else "proposals (geometric)" if args.proposal_model is None
                else f"proposals (learned instance model {args.proposal_model})")
        print(f"scene {scene.scene_id} ({scene.source}): {scene.num_points} points, objects from {kind}")
        with warnings.catch_warnings():  # printed below as the result's own "warning:" lines
            warnings.simplefilter("ignore", DegradedSceneWarning)
            result = seg.segment(scene, text)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"scene3d query: error: {e}", file=sys.stderr)
        return 2
    print(format_result(scene, result))
    if not args.no_pictures:
        from scene3d.viz import save_result  # lazy: `scene3d --help` and the other commands do not load it

        saved = save_result(scene, result, args.out)
        print(f"wrote {saved.ply}")
        print(f"wrote {saved.png}")
    return 0
