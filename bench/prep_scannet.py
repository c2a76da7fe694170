"""Benchmark ScanNet preprocessing on a synthetic scene of real ScanNet size.

Prints seconds per scene, vertices per second and peak memory of ``data_prep.scannet.process_scene`` and of a
naive baseline run in the same process (plyfile + json + numpy, with the per-vertex Python loop that reference
exporters use to map segments to vertices), the ratio between them, and checks that both give the same arrays.

    .venv/bin/python bench/prep_scannet.py [--scenes 1] [--repeat 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import scannet as sn  # noqa: E402
from data_prep.scannet_labels import VALID_CLASS_IDS_20, VALID_CLASS_IDS_200  # noqa: E402


def naive_process(raw_dir: Path, out_dir: Path, tsv: Path) -> dict:
    """What a peer script does: plyfile, json, csv, and Python loops over vertices and objects."""
    from plyfile import PlyData

    sid = raw_dir.name
    ply = PlyData.read(str(raw_dir / f"{sid}_vh_clean_2.ply"))
    v = ply["vertex"]
    xyz = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float64)
    rgb = np.stack([v["red"], v["green"], v["blue"]], axis=1)
    faces = np.stack(ply["face"]["vertex_indices"]).astype(np.int64)
    m = np.eye(4)
    for line in open(raw_dir / f"{sid}.txt"):
        if line.startswith("axisAlignment"):
            m = np.array([float(x) for x in line.split("=")[1].split()]).reshape(4, 4)
    pts = np.ones((xyz.shape[0], 4))
    pts[:, :3] = xyz
    coord = (pts @ m.T)[:, :3]
    fn = np.cross(coord[faces[:, 1]] - coord[faces[:, 0]], coord[faces[:, 2]] - coord[faces[:, 0]])
    acc = np.zeros_like(coord)
    for k in range(3):
        np.add.at(acc, faces[:, k], fn)
    norm = np.linalg.norm(acc, axis=1, keepdims=True)
    normal = np.where(norm > 1e-20, acc / np.maximum(norm, 1e-20), [0.0, 0.0, 1.0])
    seg = json.load(open(raw_dir / f"{sid}_vh_clean_2.0.010000.segs.json"))["segIndices"]
    seg_to_verts = {}
    for i, s in enumerate(seg):  # the per-vertex loop of the reference exporters
        seg_to_verts.setdefault(s, []).append(i)
    raw_to = {}
    with open(tsv, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            raw_to[row["raw_category"]] = (int(row["id"]), int(row["nyu40id"]))
    agg = json.load(open(raw_dir / f"{sid}.aggregation.json"))["segGroups"]
    instance = np.full(len(seg), -1, dtype=np.int32)
    seg20 = np.full(len(seg), -1, dtype=np.int16)
    seg200 = np.full(len(seg), -1, dtype=np.int16)
    objects = []
    for g in agg:
        verts = [i for s in g["segments"] for i in seg_to_verts[s]]
        instance[verts] = g["objectId"]
        tid, nyu = raw_to[g["label"]]
        seg20[verts] = VALID_CLASS_IDS_20.index(nyu) if nyu in VALID_CLASS_IDS_20 else -1
        seg200[verts] = VALID_CLASS_IDS_200.index(tid) if tid in VALID_CLASS_IDS_200 else -1
    for g in agg:
        p = coord[instance == g["objectId"]]
        objects.append({"id": g["objectId"], "center": ((p.min(0) + p.max(0)) / 2).tolist(),
                        "size": (p.max(0) - p.min(0)).tolist()})
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"coord": coord.astype(np.float32), "color": rgb, "normal": normal.astype(np.float32),
              "superpoint": np.asarray(seg, np.int32), "segment20": seg20, "segment200": seg200, "instance": instance}
    for k, a in arrays.items():
        np.save(out_dir / f"{k}.npy", a)
    json.dump(objects, open(out_dir / "objects.json", "w"))
    return arrays


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_mib(fn) -> float:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=1, help="synthetic real-size scenes (timed one by one)")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (best of)")
    ap.add_argument("--workers", type=int, default=0, help="also time process_scans with this many workers")
    args = ap.parse_args()
    from data_prep.synth import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        info = generate_dataset(tmp / "raw", num_scenes=args.scenes, seed=0, preset="real")
        print(f"generated {args.scenes} real-size synthetic scene(s) in {time.perf_counter() - t:.1f} s")
        tsv = tmp / "raw" / "scannetv2-labels.combined.tsv"
        lm = sn.read_label_tsv(tsv)
        rows = []
        for sid in info["scenes"]:
            raw = tmp / "raw" / "scans" / sid
            st = info["stats"][sid]
            ours = timed(lambda: sn.process_scene(raw, tmp / "ours" / sid, lm, force=True), args.repeat)
            base = timed(lambda: naive_process(raw, tmp / "naive" / sid, tsv), 1)
            mem_ours = peak_mib(lambda: sn.process_scene(raw, tmp / "ours" / sid, lm, force=True))
            mem_base = peak_mib(lambda: naive_process(raw, tmp / "naive" / sid, tsv))
            ref = {k: np.load(tmp / "naive" / sid / f"{k}.npy") for k in ("coord", "instance", "segment20", "normal")}
            got = {k: np.load(tmp / "ours" / sid / f"{k}.npy") for k in ref}
            same = all(np.array_equal(ref[k], got[k]) for k in ("coord", "instance", "segment20"))
            same &= bool(np.allclose(ref["normal"], got["normal"], atol=1e-5))
            rows.append((sid, st["vertices"], st["faces"], st["objects"], ours, base, mem_ours, mem_base, same))
        print(f"{'scene':14s} {'verts':>7s} {'faces':>7s} {'objs':>4s} {'ours s':>7s} {'naive s':>8s} {'ratio':>6s} "
              f"{'Mvert/s':>8s} {'peak MiB':>9s} {'naive MiB':>9s} same")
        for sid, nv, nf, no, ours, base, mo, mb, same in rows:
            print(f"{sid:14s} {nv:7d} {nf:7d} {no:4d} {ours:7.3f} {base:8.3f} {base / ours:5.1f}x "
                  f"{nv / ours / 1e6:8.2f} {mo:9.1f} {mb:9.1f} {same}")
        print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
              f"(includes the generator); cores: {os.cpu_count()}")
        if args.workers:
            t = time.perf_counter()
            s = sn.process_scans(tmp / "raw" / "scans", tmp / "pool", tsv, workers=args.workers, progress=False)
            dt = time.perf_counter() - t
            print(f"process_scans workers={args.workers}: {len(s.done)} scenes in {dt:.2f} s "
                  f"({dt / max(len(s.done), 1):.3f} s/scene), failed {len(s.failed)}")
        return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
