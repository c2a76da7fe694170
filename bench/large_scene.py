"""Peak memory of ``load_scene`` + ``segment`` on large synthetic clouds (1 M and 5 M points by default).

Each size runs in a fresh subprocess (so one size's peak cannot hide in another's), which builds a room-like
cloud (floor, four walls and furniture boxes with instance ids, colours, 5 mm noise), loads it through
:meth:`scene3d.api.Segmenter.load_scene` as arrays and answers two queries with :meth:`Segmenter.segment`.
The model is the tiny CPU model of ``experiment=synthetic_cpu`` (random weights), or ``--checkpoint``.
Peak RSS is the child's ``getrusage(RUSAGE_SELF).ru_maxrss``; ``base`` is its RSS peak before the scene was
made (python + torch + the model), so ``peak - base`` is what the scene cost. Prints figures; asserts
nothing about memory or time except that every mask covers every input point.

    .venv/bin/python bench/large_scene.py                        # 1M and 5M points, the API's default cap
    .venv/bin/python bench/large_scene.py --max-points 0         # no cap: the model sees every point
    .venv/bin/python bench/large_scene.py --sizes 1000000 --proposals
    .venv/bin/python bench/large_scene.py --scale 3              # a hall: the cap (not the voxel) decides
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def room_cloud(n: int, seed: int = 0, objects: int = 24, scale: float = 1.0):
    """``n`` points on the surfaces of an 8 x 6 x 3 m room with ``objects`` boxes, all lengths times
    ``scale``: coord [n, 3] float32, color [n, 3] uint8, instance [n] int64 (walls and floor -1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lo = rng.uniform([0.3, 0.3, 0.0], [6.5, 4.7, 0.0], (objects, 3))
    size = rng.uniform([0.4, 0.4, 0.4], [1.6, 1.2, 1.5], (objects, 3))
    # surfaces: floor, 4 walls, then the 5 visible faces of each box; points spread by area
    area = [8 * 6, 8 * 3, 8 * 3, 6 * 3, 6 * 3]
    area += [float(s[0] * s[1] + 2 * s[2] * (s[0] + s[1])) for s in size]
    share = np.asarray(area) / sum(area)
    counts = rng.multinomial(n, share)
    coord = np.empty((n, 3), np.float32)
    instance = np.full(n, -1, np.int64)
    color = np.empty((n, 3), np.uint8)
    at = 0
    for k, c in enumerate(counts):
        u = rng.random((c, 3), dtype=np.float32)
        if k == 0:
            p = u * np.array([8, 6, 0], np.float32)
        elif k <= 4:
            p = u * np.array([[8, 0, 3], [8, 0, 3], [0, 6, 3], [0, 6, 3]][k - 1], np.float32)
            p += np.array([[0, 0, 0], [0, 6, 0], [0, 0, 0], [8, 0, 0]][k - 1], np.float32)
        else:
            j = k - 5
            p = lo[j] + u * size[j]
            face = rng.integers(0, 5, c)  # snap one axis to a face: top, -x, +x, -y, +y
            axis = np.array([2, 0, 0, 1, 1])[face]
            side = np.array([1, 0, 1, 0, 1])[face]
            p[np.arange(c), axis] = (lo[j] + side[:, None] * size[j])[np.arange(c), axis]
            instance[at : at + c] = j
        coord[at : at + c] = p
        color[at : at + c] = rng.integers(40, 230, 3) if k > 4 else 128
        at += c
    coord *= np.float32(scale)
    coord += rng.normal(0, 0.005, coord.shape).astype(np.float32)
    return coord, color, instance


def child(args) -> None:
    """One measurement, in this (fresh) process; prints one json line."""
    import numpy as np
    import torch

    from scene3d.api import Segmenter

    torch.manual_seed(0)
    if args.checkpoint:
        seg = Segmenter.from_pretrained(args.checkpoint)
    else:
        from scene3d.config import compose, pipeline_config
        from scene3d.models.pipeline import Scene3DModel

        seg = Segmenter(Scene3DModel(pipeline_config(compose("train", ["experiment=synthetic_cpu"]).model)))
    if args.max_points >= 0:
        seg.max_points = args.max_points or None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    coord, color, instance = room_cloud(args.points, scale=args.scale)
    t0 = time.perf_counter()
    scene = seg.load_scene(coord=coord, color=color, instance=None if args.proposals else instance)
    del coord, color, instance
    results = seg.segment(scene, ["the largest box", "the box next to the wall"])
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r = results[0]
    assert r.point_mask.shape == (scene.num_points,) and r.object_masks.shape[1] == scene.num_points
    print(json.dumps({"points": scene.num_points, "model_points": int(getattr(r, "model_points", scene.num_points)),
                      "objects": int(len(r.all_scores)),
                      "voxel": getattr(r, "downsample_voxel", None), "base": base, "peak": peak, "seconds": secs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--max-points", type=int, default=-1,
                    help="Segmenter.max_points for the run (-1: the API default, 0: no cap)")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint instead of the random tiny model")
    ap.add_argument("--proposals", action="store_true", help="no instance ids: objects from the proposal head")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="room size factor (3: a 24 x 18 m hall, more occupied voxels than max_points)")
    ap.add_argument("--points", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.points:
        child(args)
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    rows = []
    sizes = tqdm(args.sizes, desc="sizes", unit="run") if tqdm else args.sizes
    for n in sizes:
        cmd = [sys.executable, __file__, "--points", str(n), "--max-points", str(args.max_points)]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        if args.proposals:
            cmd.append("--proposals")
        cmd += ["--scale", str(args.scale)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{n} points: the run failed (exit {out.returncode}):\n{out.stderr[-3000:]}", file=sys.stderr)
            rows.append((n, None))
            continue
        rows.append((n, json.loads(out.stdout.strip().splitlines()[-1])))
    cap = {-1: "API default", 0: "none"}.get(args.max_points, str(args.max_points))
    source = "proposals" if args.proposals else "instances"
    print(f"\nmax_points: {cap}; room scale {args.scale:g}; objects from {source}; "
          f"model: {args.checkpoint or 'tiny synthetic_cpu (random)'}")
    print(f"{'input points':>12} | {'model points':>12} | {'objects':>7} | {'voxel m':>7} | {'base GiB':>8} | {'peak GiB':>8} | "
          f"{'scene GiB':>9} | {'seconds':>7}")
    for n, r in rows:
        if r is None:
            print(f"{n:>12,} | failed")
            continue
        vox = "-" if r["voxel"] is None else f"{r['voxel']:.3f}"
        print(f"{r['points']:>12,} | {r['model_points']:>12,} | {r['objects']:>7} | {vox:>7} | {r['base'] / GIB:>8.2f} | "
              f"{r['peak'] / GIB:>8.2f} | {(r['peak'] - r['base']) / GIB:>9.2f} | {r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
