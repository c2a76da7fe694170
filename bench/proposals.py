"""Class-agnostic proposal quality and time: geometric proposals vs the learned proposal head.

Prints AP@0.5, AP@0.25 and recall@0.5 (:mod:`scene3d.proposal_metrics`: ScanNet's instance-benchmark
conventions, wall / floor / ceiling excluded, GT instances and proposals of fewer than 100 points ignored,
IoU > t) for

* held-out synthetic scenes (``data_prep.synthetic.prepare_synthetic``, ``--preset`` / ``--seed``; never
  seen by the geometric parameters nor by the learned head, which trains on other seeds);
* the real mmdetection3d exports scene0000_01 (the scan the geometric parameters were chosen on, and with
  ``--train-real`` one the learned head trains on, marked *tuned*) and scene0000_02 (held out: nothing was
  chosen or trained on it). They are rescans of one room: a head trained on one measures rescan
  generalisation, not a new room.

Methods: ``geometric`` (:mod:`scene3d.tokenizer.geometric_proposals`, overlapping proposals ranked by their
stability), ``geometric-flat`` (the same made disjoint, as the model gets them), ``merge``
(:mod:`scene3d.tokenizer.merge_proposals`: the geometric front end over-segments, a small learned pair
classifier merges, a learned objectness scores; trained here, in ``--merge-rounds`` rounds, on the
``--train-scenes`` synthetic training scenes plus scene0000_01 weighing ``--merge-real-weight`` synthetic
scenes, or with ``--merge-synthetic-only`` on the synthetic ones alone; scene0000_02 is never trained on) and
``learned`` (the tokenizer's offset-voting head trained here for ``--learned-steps`` steps on synthetic
scenes of ``--preset`` with the CPU tokenizer of ``configs/tokenizer/small.yaml``, or loaded from
``--checkpoint``; its clusters have no confidence, so every score is 1).

Time: seconds per scene of each method on scene0000_02 at ``--sizes`` points (random subsample below its
86 001 points; above, every point plus random copies jittered by 5 mm), median of ``--repeats`` runs after a
warm-up (imports and open3d's first call are not counted). Taken on shared CPUs while other work runs: read
the ratios, not the absolute values.

    .venv/bin/python bench/proposals.py                      # everything (about 8 min on 2 loaded cores)
    .venv/bin/python bench/proposals.py --learned-steps 0    # geometric and merge only
    .venv/bin/python bench/proposals.py --learned-steps 0 --no-merge   # geometric only
    .venv/bin/python bench/proposals.py --learned-steps 0 --no-merge --instance-model DIR   # + learned instance
    .venv/bin/python bench/proposals.py --learned-steps 0 --no-merge --instance-steps 1200  # trained here

``instance``: the learned instance proposals (:mod:`scene3d.tokenizer.instance_proposals`: a spconv U-Net's
classes and centre votes, grouped, scored by a learned IoU estimate, NMS), trained on scene0000_01 (with
``--instance-synthetic`` also on the synthetic training scenes), or loaded with ``--instance-model``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scene3d.constants import REAL_DATA_ENV  # noqa: E402
from scene3d.proposal_metrics import SCANNET_MIN_POINTS, STRUCTURAL_NYU40, SceneProposals, proposal_ap  # noqa: E402

EXPORTS = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"
REAL = (("scene0000_01", "tuned"), ("scene0000_02", "held out"))


class Scan:
    def __init__(self, name, coord, color, instance, classes, superpoint=None):
        self.name, self.coord, self.color, self.instance = name, coord, color, instance
        self.classes, self.superpoint = classes, superpoint


def synthetic_scans(root: Path, n: int, seed: int, preset: str) -> list[Scan]:
    from data_prep.synthetic import prepare_synthetic
    from scene3d.data.scene import load_processed_scene

    syn = prepare_synthetic(root, num_scenes=n, seed=seed, preset=preset, val_fraction=0.0, progress=False)
    out = []
    for sid in sorted(os.listdir(syn.processed)):
        s = load_processed_scene(syn.processed / sid)
        out.append(Scan(sid, s.coord, s.color, s.instance.astype(np.int64), {o.id: o.nyu40_id for o in s.objects},
                        s.superpoint))
    return out


def real_scans() -> list[Scan]:
    from scene3d.data.exports import read_mmdet_export

    root = Path(os.environ.get(REAL_DATA_ENV, Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    out = []
    for sid, _ in REAL:
        prefix = root / EXPORTS / sid
        if not (root / EXPORTS / f"{sid}_vert_all.npy").exists():
            print(f"real scan {sid} not found under {root} (set {REAL_DATA_ENV}); its rows are left out")
            continue
        d = read_mmdet_export(prefix)
        a = d["arrays"]
        out.append(Scan(sid, a["coord"], a["color"], a["instance"].astype(np.int64),
                        {o["id"]: o["nyu40_id"] for o in d["objects"]}))
    return out


# ------------------------------------------------------------------------------------------------ methods
def geometric(scan: Scan):
    from scene3d.tokenizer.geometric_proposals import geometric_proposals

    g = geometric_proposals(scan.coord, scan.color)
    return g.masks, g.scores


def geometric_flat(scan: Scan):
    from scene3d.proposal_metrics import labels_to_masks
    from scene3d.tokenizer.geometric_proposals import proposal_objects

    p = proposal_objects(scan.coord, scan.color)
    return labels_to_masks(p.labels), p.scores


def train_merge(train: list[Scan], real: list[Scan], args):
    """The merge model (:func:`scene3d.tokenizer.merge_proposals.train_merge_model`) on the synthetic training
    scenes plus scene0000_01 (never scene0000_02)."""
    from scene3d.tokenizer.merge_proposals import TrainScene, train_merge_model

    scenes = [TrainScene(s.name, s.coord, s.color, s.instance, s.classes) for s in train]
    weights = [1.0] * len(scenes)
    if not args.merge_synthetic_only:
        tuned = [s for s in real if s.name == REAL[0][0]]
        scenes += [TrainScene(s.name, s.coord, s.color, s.instance, s.classes) for s in tuned]
        weights += [args.merge_real_weight] * len(tuned)
    assert all(s.name != REAL[1][0] for s in scenes), "the held-out scan must not be trained on"
    t = time.perf_counter()
    model = train_merge_model(scenes, rounds=args.merge_rounds, seed=args.merge_seed, weights=weights)
    print(f"merge model: trained on {[s.name for s in scenes]} (weights {weights}) in {time.perf_counter() - t:.0f} s")
    if args.save_merge:
        model.save(args.save_merge)
    return model


def merge_fn(model):
    from scene3d.tokenizer.merge_proposals import merge_proposals

    def run(scan: Scan):
        g = merge_proposals(scan.coord, scan.color, model)
        return g.masks, g.scores

    return run


def instance_fn(model):
    def run(scan: Scan):
        p = model.propose(scan.coord, scan.color, scan.name)
        return p.masks, p.scores

    return run


def train_instance(real: list[Scan], train: list[Scan], args):
    """The learned instance proposals (:mod:`scene3d.tokenizer.instance_proposals`) trained on scene0000_01
    (and with ``--instance-synthetic`` the synthetic training scenes; never scene0000_02)."""
    from scene3d.tokenizer.instance_proposals import TrainScan, semantic_of, train_instance_model

    def as_train(s: Scan) -> TrainScan:
        return TrainScan(s.name, s.coord, s.color, s.instance, semantic_of(s.instance, s.classes))

    scans = [as_train(s) for s in real if s.name == REAL[0][0]]
    if not scans:
        raise SystemExit(f"--instance-steps: {REAL[0][0]} not found")
    if args.instance_synthetic:
        scans += [as_train(s) for s in train]
    assert all(s.name != REAL[1][0] for s in scans), "the held-out scan must not be trained on"
    t = time.perf_counter()
    model = train_instance_model(scans, steps=args.instance_steps, seed=args.seed)
    print(f"instance proposals: {args.instance_steps} steps on {[s.name for s in scans]} in "
          f"{time.perf_counter() - t:.0f} s")
    if args.save_instance:
        model.save(args.save_instance)
    return model


def _points(scan: Scan, with_instance: bool):
    import torch

    from scene3d.structures import PointBatch

    f = {"coord": torch.from_numpy(np.ascontiguousarray(scan.coord, np.float32)),
         "color": torch.from_numpy(np.asarray(scan.color, np.float32) / 255.0)}
    if scan.superpoint is not None:
        f["superpoint"] = torch.from_numpy(np.asarray(scan.superpoint, np.int64))
    if with_instance:
        f["instance"] = torch.from_numpy(scan.instance)
    return PointBatch.from_list([f], scene_ids=[scan.name])


def train_learned(scans: list[Scan], steps: int, max_points: int, seed: int):
    """The tokenizer (CPU size, configs/tokenizer/small.yaml) trained on its offset loss alone."""
    import torch
    from tqdm.auto import tqdm

    from scene3d.tokenizer.backbone import BackboneConfig
    from scene3d.tokenizer.model import IN_CHANNELS, ObjectTokenizer, ObjectTokenizerConfig
    from scene3d.tokenizer.proposals import offset_loss
    from scene3d.tokenizer.relation import RelationConfig

    torch.manual_seed(seed)
    cfg = ObjectTokenizerConfig(voxel_size=0.06, out_dim=64, geometry_dim=32, geometry_voxel_size=0.04,
                                backbone=BackboneConfig(in_channels=IN_CHANNELS, channels=(16, 32)),
                                relation=RelationConfig(dim=64, heads=4, layers=1))
    tok = ObjectTokenizer(cfg).train()
    opt = torch.optim.AdamW(list(tok.backbone.parameters()) + list(tok.proposal_head.parameters()), lr=2e-3)
    rng = np.random.default_rng(seed)
    for step in tqdm(range(steps), desc="train learned head", unit="step"):
        s = scans[step % len(scans)]
        keep = np.sort(rng.choice(len(s.coord), min(max_points, len(s.coord)), replace=False))
        sub = Scan(s.name, s.coord[keep], s.color[keep], s.instance[keep], s.classes,
                   None if s.superpoint is None else s.superpoint[keep])
        pts = _points(sub, True)
        feat, _ = tok.point_features(pts)
        loss = offset_loss(tok.proposal_head(feat), pts).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tok.eval()


def learned_fn(tok):
    import torch

    from scene3d.tokenizer.proposals import cluster_proposals
    from scene3d.proposal_metrics import labels_to_masks

    @torch.no_grad()
    def run(scan: Scan):
        pts = _points(scan, False)
        feat, _ = tok.point_features(pts)
        labels = cluster_proposals(pts, tok.proposal_head(feat), tok.cfg.proposal).numpy()
        m = labels_to_masks(labels)
        return m, np.ones(len(m))

    return run


def load_learned(path: str):
    from scene3d.models.loading import load_model

    return load_model(Path(path), "cpu").model.tokenizer3d.eval()


# ------------------------------------------------------------------------------------------------ bench
def score(fn, scans: list[Scan]) -> dict:
    parts, secs = [], []
    for s in scans:
        t = time.perf_counter()
        masks, scores = fn(s)
        secs.append(time.perf_counter() - t)
        parts.append(SceneProposals(masks, scores, s.instance, s.classes))
    r = proposal_ap(parts, thresholds=(0.5, 0.25), names=[s.name for s in scans])
    return {**r.summary(), "s_per_scene": float(np.mean(secs))}


def resized(scan: Scan, n: int, rng) -> Scan:
    """``scan`` at ``n`` points: a random subsample, or every point plus jittered (5 mm) random copies."""
    if n <= len(scan.coord):
        idx = np.sort(rng.choice(len(scan.coord), n, replace=False))
        jitter = np.zeros((n, 3), np.float32)
    else:
        extra = rng.choice(len(scan.coord), n - len(scan.coord), replace=True)
        idx = np.concatenate([np.arange(len(scan.coord)), extra])
        jitter = np.concatenate([np.zeros((len(scan.coord), 3)), rng.normal(0, 0.005, (len(extra), 3))])
    return Scan(f"{scan.name}@{n}", (scan.coord[idx] + jitter).astype(np.float32), scan.color[idx],
                scan.instance[idx], scan.classes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "scene3d_bench_proposals")
    ap.add_argument("--preset", default="real", help="synthetic preset (data_prep/synth.py PRESETS)")
    ap.add_argument("--scenes", type=int, default=3, help="held-out synthetic scenes")
    ap.add_argument("--seed", type=int, default=901, help="seed of the held-out synthetic scenes")
    ap.add_argument("--learned-steps", type=int, default=150, help="0: no learned head (unless --checkpoint)")
    ap.add_argument("--train-scenes", type=int, default=4)
    ap.add_argument("--train-points", type=int, default=12_000, help="points per training step (subsample)")
    ap.add_argument("--train-real", action="store_true",
                    help="the learned head also trains on scene0000_01 (every other step); scene0000_02 stays held out")
    ap.add_argument("--no-merge", action="store_true", help="leave out the learned-merge proposals")
    ap.add_argument("--merge-rounds", type=int, default=2, help="agglomeration rounds of the merge model's training")
    ap.add_argument("--merge-real-weight", type=float, default=4.0,
                    help="scene0000_01's weight in the merge model's losses (a synthetic scene weighs 1)")
    ap.add_argument("--merge-synthetic-only", action="store_true",
                    help="the merge model trains on synthetic scenes only")
    ap.add_argument("--merge-seed", type=int, default=901, help="seed of the merge model's MLPs (not of the scenes)")
    ap.add_argument("--save-merge", type=Path, default=None, help="write the trained merge model (safetensors) here")
    ap.add_argument("--checkpoint", default=None, help="take the learned head from this scene3d checkpoint")
    ap.add_argument("--instance-model", type=Path, default=None,
                    help="learned instance proposals: a model directory (scene3d prep proposals)")
    ap.add_argument("--instance-steps", type=int, default=0,
                    help="train the learned instance proposals here on scene0000_01 for this many steps (0: no)")
    ap.add_argument("--instance-synthetic", action="store_true",
                    help="the instance proposals also train on the synthetic training scenes")
    ap.add_argument("--save-instance", type=Path, default=None, help="write the trained instance model here")
    ap.add_argument("--sizes", default="20000,80000,300000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as json")
    args = ap.parse_args(argv)

    print(f"conventions: class-agnostic, nyu40 {STRUCTURAL_NYU40} (wall, floor, ceiling) excluded, GT instances and "
          f"proposals of < {SCANNET_MIN_POINTS} points ignored, IoU > t, each GT matched once (ScanNet evaluator)")
    held = synthetic_scans(args.work / f"heldout_{args.preset}_s{args.seed}_n{args.scenes}", args.scenes, args.seed,
                           args.preset)
    real = real_scans()
    groups = [(f"synthetic {args.preset} x{len(held)} (held out)", held)]
    groups += [(f"{s.name} ({dict(REAL)[s.name]})", [s]) for s in real]
    methods = {"geometric": geometric, "geometric-flat": geometric_flat}
    train = None
    if not args.no_merge:
        train = synthetic_scans(args.work / f"train_{args.preset}_s{args.seed + 1}_n{args.train_scenes}",
                                args.train_scenes, args.seed + 1, args.preset)
        methods["merge"] = merge_fn(train_merge(train, real, args))
    if args.instance_model is not None:
        from scene3d.tokenizer.instance_proposals import InstanceProposer

        im = InstanceProposer.load(args.instance_model)
        if REAL[1][0] in im.meta.get("trained_on", []):
            raise SystemExit(f"{args.instance_model} was trained on the held-out {REAL[1][0]}")
        print(f"instance proposals: {args.instance_model} (trained on {im.meta.get('trained_on')}, "
              f"{im.meta.get('steps')} steps)")
        methods["instance"] = instance_fn(im)
    elif args.instance_steps > 0:
        if args.instance_synthetic and train is None:
            train = synthetic_scans(args.work / f"train_{args.preset}_s{args.seed + 1}_n{args.train_scenes}",
                                    args.train_scenes, args.seed + 1, args.preset)
        methods["instance"] = instance_fn(train_instance(real, train or [], args))
    if args.checkpoint:
        methods["learned"] = learned_fn(load_learned(args.checkpoint))
    elif args.learned_steps > 0:
        train = train or synthetic_scans(args.work / f"train_{args.preset}_s{args.seed + 1}_n{args.train_scenes}",
                                args.train_scenes, args.seed + 1, args.preset)
        what = f"{len(train)} synthetic {args.preset} scenes"
        if args.train_real:
            tuned = [s for s in real if s.name == REAL[0][0]]
            if not tuned:
                raise SystemExit(f"--train-real: {REAL[0][0]} not found")
            train = [x for pair in zip(train, tuned * len(train)) for x in pair]  # every other step
            what += f" + {REAL[0][0]} (every other step)"
        t = time.perf_counter()
        tok = train_learned(train, args.learned_steps, args.train_points, args.seed)
        print(f"learned head: {args.learned_steps} steps on {what} ({args.train_points} points a step) in "
              f"{time.perf_counter() - t:.0f} s")
        methods["learned"] = learned_fn(tok)
    geometric(real[0] if real else held[0])  # warm-up: imports, open3d's first call
    rows = []
    print(f"\n{'scenes':38s} {'method':15s} {'AP@0.5':>7s} {'AP@0.25':>8s} {'R@0.5':>6s} {'GT':>4s} {'props':>6s} "
          f"{'s/scene':>8s}")
    for gname, scans in groups:
        for mname, fn in methods.items():
            r = score(fn, scans)
            rows.append({"scenes": gname, "method": mname, **r})
            print(f"{gname:38s} {mname:15s} {r['ap@0.5']:7.3f} {r['ap@0.25']:8.3f} {r['recall@0.5']:6.3f} "
                  f"{r['num_gt']:4d} {r['num_proposals']:6d} {r['s_per_scene']:8.2f}")
    timing = []
    if real:
        base = real[-1]
        rng = np.random.default_rng(0)
        sizes = [int(x) for x in args.sizes.split(",")]
        print(f"\ntime per scene on {base.name} ({len(base.coord)} points; fewer: subsample, more: jittered copies), "
              f"median of {args.repeats}")
        first = None
        for n in sizes:
            scan = resized(base, n, rng)
            for mname, fn in methods.items():
                if mname == "geometric-flat":
                    continue
                secs = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    masks, scores = fn(scan)
                    secs.append(time.perf_counter() - t)
                r = proposal_ap([SceneProposals(masks, scores, scan.instance, scan.classes)], thresholds=(0.5,))
                med = float(np.median(secs))
                if mname == "geometric" and first is None:
                    first = med
                timing.append({"points": n, "method": mname, "s": med, "ap@0.5": r.ap[0.5],
                               "recall@0.5": r.recall[0.5]})
                ratio = f" ({med / first:.2f}x the geometric time at {sizes[0]})" if first else ""
                print(f"  {n:>8d} points  {mname:10s} {med:6.2f} s{ratio}  AP@0.5 {r.ap[0.5]:.3f} "
                      f"R@0.5 {r.recall[0.5]:.3f}")
    if args.out:
        from scene3d.utils.io import write_json_atomic

        write_json_atomic(args.out, {"rows": rows, "timing": timing, "args": {k: str(v) for k, v in vars(args).items()}})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
