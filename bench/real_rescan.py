"""The real-rescan experiment's figures (configs/experiment/real_rescan.yaml): referring on scene0000_02's
generated expressions, beside the chance level.

    python bench/real_rescan.py [--rows FILE.jsonl] [--checkpoint RUN] [--mask reconciled] [--vote-turns 4]

scene0000_01 / scene0000_02 are two RESCANS OF ONE ROOM (ScanNet scene0000): a model trained on one and
scored on the other measures rescan generalisation, not generalisation to new rooms.

Chance level: a uniformly random object of the scene (any object with points, as bench/learn_synthetic.py's
baseline), computed exactly as the mean over every object of the scores of "always predict that object"
(no sampling noise). With ``--checkpoint`` the model is scored through scene3d.engine.evaluate (the same path
as ``scene3d eval``), for each of ``--objects`` (``gt``: ground-truth instances; ``proposals``: the geometric
proposals, or with ``--proposal-model`` the learned instance proposals, scored against the ground-truth target
points) and each mask path (reconciled, identifier-only, decoder-only), with a count of the rows with targets
by kind of answer (right, none, the anchor, same class but another object, another class; ``--errors`` lists each
wrong one). ``--vote-turns N`` also scores the answers voted over N quarter turns of the scan
(scene3d.models.turns), after the scan as given in the same run. Without ``--rows`` the rows are generated here
(``--per-op 8``, as the experiment's comment does).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MMDET = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"


def chance(rows, processed_dir) -> dict:
    """Expected overall metrics of a uniformly random object (mean over the objects of each scene)."""
    from scene3d.data.scene import load_processed_scene
    from scene3d.metrics import evaluate_rows

    objs = {sid: [o.id for o in load_processed_scene(Path(processed_dir) / sid).objects if o.num_points > 0]
            for sid in sorted({r["scene_id"] for r in rows})}
    if len(objs) != 1:
        raise SystemExit(f"chance level is computed per scene; the rows span {sorted(objs)}")
    (sid, ids), = objs.items()
    totals: dict = {}
    for oid in ids:
        table = {(r["dataset"], r["scene_id"], str(r["ann_id"])): {"dataset": r["dataset"], "scene_id": sid,
                 "ann_id": r["ann_id"], "pred_object_ids": [int(oid)], "_where": "chance"} for r in rows}
        m = evaluate_rows(table, rows, processed_dir, progress=False).metrics["overall"]
        for k in ("miou", "acc@0.25", "acc@0.5"):
            totals[k] = totals.get(k, 0.0) + m[k] / len(ids)
    return totals | {"objects": len(ids)}


class AnnotatedNames:
    """A stand-in label model that names each point by its annotated class (the nearest annotated point of the
    evaluated scans): ``--names annotated``, a diagnostic that separates wrong predicted names from wrong
    reasoning. Never a result: the printed figures say "annotated names". With ``shuffle_seed`` the classes are
    dealt out at random among each scan's objects first (``--names shuffled``, :func:`shuffled_classes`)."""

    meta = {"trained_on": []}

    def __init__(self, processed_dir, scene_ids, shuffle_seed=None) -> None:
        from scipy.spatial import cKDTree

        from scene3d.data.scene import load_processed_scene
        from scene3d.tokenizer.instance_proposals import NUM_CLASSES, scan_from_scene

        self.num_classes = NUM_CLASSES
        scans = [scan_from_scene(load_processed_scene(Path(processed_dir) / sid)) for sid in scene_ids]
        self.tree = cKDTree(np.concatenate([s.coord for s in scans]))
        if shuffle_seed is not None:
            scans = [shuffled_classes(s, np.random.default_rng(shuffle_seed)) for s in scans]
        self.semantic = np.concatenate([s.semantic for s in scans])

    def point_probs(self, coord, color=None, what: str = "scan") -> np.ndarray:
        cls = self.semantic[self.tree.query(np.asarray(coord, np.float32))[1]]
        out = np.zeros((len(cls), self.num_classes), np.float32)
        out[np.arange(len(cls)), cls] = 1.0
        return out


def shuffled_classes(scan, rng):
    """``scan`` (a TrainScan) with its objects' classes dealt out again at random among its objects (each class
    keeps its count; ``--names shuffled``): a model that reads the names in its prompt answers differently, one
    that ignores them answers as with the annotated names."""
    ids = np.unique(scan.instance[scan.instance >= 0])
    cls = np.array([int(scan.semantic[scan.instance == i][0]) for i in ids])
    dealt = dict(zip(ids.tolist(), rng.permutation(cls).tolist()))
    semantic = scan.semantic.copy()
    for i, c in dealt.items():
        semantic[scan.instance == i] = c
    return scan._replace(semantic=semantic)


def encoded_scans(model, processed_dir, scene_ids, names: bool = True):
    """Per scan of ``scene_ids``: (the processed scene, the model's SceneInputs over its ground-truth instances),
    without gradient; with ``names``, a model that writes object names names them with its label model."""
    import torch

    from scene3d.data.referring import scene_to_tensors
    from scene3d.data.scene import load_processed_scene
    from scene3d.structures import PointBatch

    for sid in scene_ids:
        scene = load_processed_scene(Path(processed_dir) / sid)
        pts = PointBatch.from_list([scene_to_tensors(scene)], scene_ids=[sid])
        with torch.no_grad():
            inputs, _ = model.encode(pts, pts.instance, names=names)
        yield scene, inputs


def naming_accuracy(model, processed_dir, scene_ids) -> tuple[int, int]:
    """(objects whose predicted name is their annotated one, objects): over the ground-truth objects with points
    of ``scene_ids``, named as the model names them at inference (its label model)."""
    from scene3d.data.labels import clean_label

    right = total = 0
    for scene, inputs in encoded_scans(model, processed_dir, scene_ids):
        truth = {int(o.id): clean_label(o.label) for o in scene.objects}
        for oid, name in zip(inputs.tokens.object_ids.tolist(), inputs.object_names):
            right += int(name == truth.get(int(oid)))
            total += 1
    return right, total


def turned_export(processed_dir: Path, scene_ids, turns: int, out_dir: Path) -> Path:
    """``out_dir`` holding the mmdet3d exports of ``scene_ids`` turned ``turns`` quarter turns counter-clockwise
    about z (scene3d.data.augment.turn_points: about the middle of the xy extent), labels unchanged: the same
    scan in another of the orientations ScanNet's axis alignment allows."""
    import torch

    from scene3d.data.augment import turn_points
    from scene3d.data.exports import find_mmdet_export
    from scene3d.data.npy import load_npy

    out_dir.mkdir(parents=True, exist_ok=True)
    for sid in scene_ids:
        f = find_mmdet_export(Path(processed_dir) / sid)
        if f is None:
            raise SystemExit(f"{processed_dir}: no mmdet3d export of {sid} to turn")
        vert = load_npy(f.vert).astype(np.float32)
        xyz = turn_points({"coord": torch.from_numpy(np.ascontiguousarray(vert[:, :3]))}, turns)["coord"].numpy()
        np.save(out_dir / f.vert.name, np.concatenate([xyz, vert[:, 3:]], 1))
        for src in (f.ins, f.sem):
            np.save(out_dir / src.name, load_npy(src))
    return out_dir


#: classes the token-naming readout leaves out (the referring rows never name them)
STRUCTURAL = ("wall", "floor", "ceiling")


def token_naming_accuracy(model, processed_dir, scene_ids) -> tuple[int, int]:
    """(objects whose token names their class, objects): each ground-truth object's LLM input embedding (the
    projector over its 3D token) against the LLM's embeddings of the scan's annotated class names, nearest by
    cosine, as the object-name alignment (``referring.name_weight``, ``stage=tokens``) trains it. Structural
    classes are left out. A readout of how well the 3D tokens of a scan tell the classes apart."""
    import torch
    import torch.nn.functional as F

    from scene3d.data.labels import clean_label

    seg = model.segmenter
    right = total = 0
    for scene, inputs in encoded_scans(model, processed_dir, scene_ids, names=False):
        t = inputs.tokens
        truth = {int(o.id): clean_label(o.label) for o in scene.objects if o.label not in STRUCTURAL}
        vocab = sorted(set(truth.values()))
        with torch.no_grad():
            emb = F.normalize(seg.object_embeds(t, t.feat).float(), dim=-1)
            words = F.normalize(seg.name_embeddings(vocab).to(emb.device).float(), dim=-1)
        best = (emb @ words.T).argmax(1).tolist()
        for oid, b in zip(t.object_ids.tolist(), best):
            if int(oid) in truth:
                right += int(vocab[b] == truth[int(oid)])
                total += 1
    return right, total


def descriptor_features(processed_dir: Path, scene_id: str) -> tuple[list, np.ndarray]:
    """(labels, ``[K, 11]`` features) of a scan's non-structural objects: the tokenizer's rescan-stable
    descriptors (``model.tokenizer.descriptors``) and its colour mean / std, no learning involved."""
    import torch

    from scene3d.data.labels import clean_label
    from scene3d.data.referring import scene_to_tensors
    from scene3d.data.scene import load_processed_scene
    from scene3d.structures.points import PointBatch
    from scene3d.tokenizer.pooling import object_descriptors, pool_objects, pooled_parts

    scene = load_processed_scene(Path(processed_dir) / scene_id)
    pts = PointBatch.from_list([scene_to_tensors(scene)])
    pooled = pool_objects(torch.zeros(pts.num_points, 1), pts, pts.instance)
    colour = pooled_parts(pooled, 1)["stats"][:, 6:12]  # stats: centre | size | colour mean | colour std | count
    feat = torch.cat([object_descriptors(pts, pooled), colour], 1).numpy()
    truth = {int(o.id): clean_label(o.label) for o in scene.objects if o.label not in STRUCTURAL}
    rows = [i for i, oid in enumerate(pooled.object_ids.tolist()) if int(oid) in truth]
    return [truth[int(pooled.object_ids[i])] for i in rows], feat[rows]


def descriptor_nn(processed_dir: Path, train_id: str, scene_ids) -> tuple[int, int]:
    """(objects named right, objects): a reference for the token readout, each object of the evaluated scans
    named by its nearest object of the training scan (``train_id``) in the standardised descriptor + colour
    features."""
    train_labels, a = descriptor_features(processed_dir, train_id)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    right = total = 0
    for sid in scene_ids:
        labels, b = descriptor_features(processed_dir, sid)
        d = ((((b - mu) / sd)[:, None] - ((a - mu) / sd)[None]) ** 2).sum(-1)
        right += sum(train_labels[j] == t for j, t in zip(d.argmin(1), labels))
        total += len(labels)
    return right, total


def descriptor_nn_line(processed_dir: Path, train_id: str, scene_ids) -> str:
    right, total = descriptor_nn(processed_dir, train_id, scene_ids)
    return (f"reference, no model: the nearest object of {train_id} by descriptors and colour names {right} of the "
            f"{total} ground-truth objects ({right / max(total, 1):.0%})")


def by_program(rows, per_sample) -> dict:
    """``{"op, kind": (rows, mIoU)}``: the scores of generated rows grouped by their program's op and target
    count (kind: none, one, several); rows without a program are grouped as "other"."""
    iou = {(s["scene_id"], str(s["ann_id"])): s["iou"] for s in per_sample}
    groups: dict = {}
    for r in rows:
        prog = r.get("program")
        op = prog.get("op", "other") if isinstance(prog, dict) else "other"
        n = len(r.get("targets") or [])
        groups.setdefault(f"{op}, {'none' if n == 0 else 'one' if n == 1 else 'several'}", []).append(
            iou[(r["scene_id"], str(r["ann_id"]))])
    return {k: (len(v), float(np.mean(v))) for k, v in sorted(groups.items())}


#: the kinds of answer :func:`answer_kinds` tells apart on a row with targets, in the order it prints them
ANSWER_KINDS = ("right", "none", "the anchor", "same class, wrong object", "another class")


def answer_kinds(rows, predictions, per_sample, processed_dir: Path) -> list:
    """Per row with targets: ``(kind, text, [target classes], [picked classes])``, what a run got wrong and how.
    Each predicted mask is read as the ground-truth instance that holds most of its points (so this also reads
    answers over proposals); kind (:data:`ANSWER_KINDS`) is "right" where the row's IoU is >= 0.5, else "none"
    (nothing picked), "the anchor" (a picked object is one of the row's anchors, whatever its class), "same
    class, wrong object" (a picked object shares a target's class) or "another class". Zero-target rows are left
    out: their answer is right or not, and nothing tells more."""
    from scene3d.data.labels import clean_label
    from scene3d.data.scene import load_processed_scene

    scenes: dict = {}
    iou = {(s["scene_id"], str(s["ann_id"])): s["iou"] for s in per_sample}
    pred = {(p["scene_id"], str(p["ann_id"])): p for p in predictions}
    out = []
    for r in rows:
        if not r.get("targets"):
            continue
        sid = r["scene_id"]
        if sid not in scenes:
            sc = load_processed_scene(Path(processed_dir) / sid)
            scenes[sid] = (sc.instance, {int(o.id): clean_label(o.label) for o in sc.objects})
        instance, label = scenes[sid]
        picked = []
        for m in pred[(sid, str(r["ann_id"]))].get("pred_masks", []):
            ids = instance[np.asarray(m, dtype=np.int64)]
            ids = ids[ids >= 0]
            if ids.size:
                picked.append(int(np.bincount(ids).argmax()))
        want = [label.get(int(t), "?") for t in r["targets"]]
        got = [label.get(i, "?") for i in picked]
        if iou[(sid, str(r["ann_id"]))] >= 0.5:
            kind = "right"
        elif not picked:
            kind = "none"
        elif set(picked) & {int(a) for a in (r.get("anchors") or [])}:
            kind = "the anchor"
        elif set(got) & set(want):
            kind = "same class, wrong object"
        else:
            kind = "another class"
        out.append((kind, r["text"], want, got))
    return out


def answer_kinds_line(kinds) -> str:
    counts = {k: sum(1 for x in kinds if x[0] == k) for k in ANSWER_KINDS}
    return (f"    {len(kinds)} rows with targets: " + ", ".join(f"{n} {k}" for k, n in counts.items()))


def frame_line(processed_dir: Path, scene_ids) -> str:
    """Each scan's canonical frame (model.canonical_frame): the quarter turns that reach it and how far (degrees)
    its median direction lies from a quadrant boundary."""
    from scene3d.data.augment import canonical_turns, frame_margin
    from scene3d.data.scene import load_processed_scene

    parts = []
    for sid in scene_ids:
        coord = load_processed_scene(Path(processed_dir) / sid).coord
        parts.append(f"{sid} {canonical_turns(coord)} quarter turn(s), {frame_margin(coord):.0f} deg from a boundary")
    return "canonical frame: " + "; ".join(parts)


def line(name: str, m: dict) -> str:
    return f"{name:<34s} mIoU {m['miou']:.4f}   Acc@0.25 {m['acc@0.25']:.4f}   Acc@0.5 {m['acc@0.5']:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    real_root = Path(os.environ.get("SCENE3D_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
    ap.add_argument("--processed", type=Path, default=real_root / MMDET, help="the mmdet3d export directory")
    ap.add_argument("--rows", type=Path, default=None, help="generated rows of scene0000_02 (default: made here)")
    ap.add_argument("--checkpoint", default=None, help="a run / checkpoint of experiment=real_rescan to score")
    ap.add_argument("--mask", default="reconciled,identifier,decoder",
                    help="comma-separated mask paths of a prediction to score")
    ap.add_argument("--objects", default="gt,proposals", help="comma-separated object sources: gt, proposals")
    ap.add_argument("--proposal-model", type=Path, default=None,
                    help="proposals from this learned instance-proposal model (scene3d prep proposals; trained "
                         "without scene0000_02) instead of the geometric ones")
    ap.add_argument("--label-model", type=Path, default=None,
                    help="for a checkpoint whose prompt writes object class names (model.referring.object_labels): "
                         "the instance-proposal model that names the objects (default: --proposal-model, else the "
                         "checkpoint's model.label_model)")
    ap.add_argument("--names", choices=("predicted", "annotated", "shuffled"), default="predicted",
                    help="for such a checkpoint: the label model's names (the result), the annotated ones (a "
                         "diagnostic upper bound, printed as such) or the annotated classes dealt out at random "
                         "among the objects (a diagnostic: does the run read the names at all?)")
    ap.add_argument("--turns", type=int, default=0, choices=range(4),
                    help="score the scan turned this many quarter turns counter-clockwise about z, the rows' compass "
                         "words turned with it (a robustness check: ScanNet leaves each scan's orientation "
                         "arbitrary; written to a temporary directory)")
    ap.add_argument("--vote-turns", type=int, default=1, choices=range(1, 5),
                    help="test-time quarter turns (eval.turns): also answer the scan turned 1..N-1 quarter turns, the "
                         "rows' compass words with it, and keep the answer most orientations give; with N > 1 the "
                         "scan as given (N = 1) is scored first, as the baseline, in the same run")
    ap.add_argument("--by-program", action="store_true",
                    help="also print each mask path's mIoU per generated program op and target count (none / one / "
                         "several); with the training scan's rows (--rows of scene0000_01) it shows what the run "
                         "fits there")
    ap.add_argument("--errors", action="store_true",
                    help="also list every wrong row with targets: its text, the targets' classes and the classes of "
                         "what the run picked (the count by kind of answer is always printed)")
    args = ap.parse_args(argv)
    from data_prep import real_refer
    from scene3d.data.referring import read_jsonl

    if args.rows is None:
        t0 = time.perf_counter()
        rows = real_refer.generate_rows(args.processed, ["scene0000_02"], max_per_op=8, progress=False).rows
        print(f"generated {len(rows)} rows of scene0000_02 in {time.perf_counter() - t0:.2f} s")
    else:
        rows = read_jsonl(args.rows)
    evaluated = sorted({r["scene_id"] for r in rows})  # turning the scan (--turns) keeps its id
    print(f"{len(rows)} rows of {evaluated} (rescan of the training scan's room: "
          "rescan generalisation, not new rooms)")
    tmp = None
    if args.turns:
        import tempfile

        from scene3d.data.augment import turn_row

        tmp = tempfile.TemporaryDirectory(prefix="real_rescan_turned_")
        args.processed = turned_export(args.processed, evaluated, args.turns, Path(tmp.name))
        rows = [turn_row(r, args.turns) for r in rows]
        print(f"the scan and its rows turned {args.turns} quarter turn(s) counter-clockwise about z")
    c = chance(rows, args.processed)
    print(line(f"chance (random object of {c['objects']})", c))
    print(frame_line(args.processed, evaluated))
    if "scene0000_01" not in evaluated and ((args.processed / "scene0000_01_vert.npy").exists()
                                            or (args.processed / "scene0000_01").is_dir()):
        print(descriptor_nn_line(args.processed, "scene0000_01", evaluated))
    proposer = None
    if args.proposal_model is not None:
        from scene3d.tokenizer.instance_proposals import InstanceProposer

        proposer = InstanceProposer.load(args.proposal_model)
        trained_on = proposer.meta.get("trained_on", [])
        if set(trained_on) & set(evaluated):
            raise SystemExit(f"{args.proposal_model} was trained on an evaluated scan ({trained_on})")
    if args.checkpoint:
        import torch

        from scene3d.engine.evaluate import evaluate_model_masks
        from scene3d.models.loading import load_model

        model = load_model(Path(args.checkpoint).expanduser(), device="cuda" if torch.cuda.is_available() else "cpu")
        if model.model.config.referring.object_labels:
            namer = args.label_model or args.proposal_model
            if args.names in ("annotated", "shuffled"):
                shuffled = args.names == "shuffled"
                model.model.set_label_model(AnnotatedNames(args.processed, evaluated,
                                                           shuffle_seed=0 if shuffled else None))
                namer = ("ANNOTATED CLASSES SHUFFLED AMONG THE OBJECTS (diagnostic: does the run read the names?)"
                         if shuffled else "ANNOTATED NAMES (diagnostic, not a result)")
            elif namer is not None:
                model.model.set_label_model(namer)
            who = namer or model.model.config.label_model
            trained_on = model.model.label_model.meta.get("trained_on", []) if model.model.label_model else []
            if set(trained_on) & set(evaluated):
                raise SystemExit(f"label model {who} was trained on an evaluated scan ({trained_on})")
            print(f"object names in the prompt: predicted by {who} (trained on {', '.join(trained_on) or '?'})")
            right, total = naming_accuracy(model.model, args.processed, evaluated)
            print(f"  names right on {right} of the {total} ground-truth objects ({right / max(total, 1):.0%}; "
                  "annotated names cleaned as the expressions write them)")
        right, total = token_naming_accuracy(model.model, args.processed, evaluated)
        print(f"object tokens nearest their own class name: {right} of {total} ground-truth objects "
              f"({right / max(total, 1):.0%}; the scan's annotated classes, wall / floor / ceiling left out)")
        masks = [m.strip() for m in args.mask.split(",") if m.strip()]
        for objects in [o.strip() for o in args.objects.split(",") if o.strip()]:
            t0 = time.perf_counter()
            pm = proposer if objects == "proposals" else None
            what = ("ground-truth objects" if objects == "gt" else
                    "geometric proposals" if pm is None else f"learned instance proposals ({args.proposal_model})")
            for turns in sorted({1, args.vote_turns}):
                res = evaluate_model_masks(model.model, args.processed, rows, masks, progress=False,
                                           objects=objects, proposal_model=pm, turns=turns)
                counts = ", ".join(f"{sid}: {v['num_objects']}" for sid, v in sorted(res[masks[0]].objects.items()))
                how = "" if turns == 1 else f", answers voted over {turns} quarter turns"
                print(f"-- {what} ({counts}{how}; {time.perf_counter() - t0:.0f} s)")
                t0 = time.perf_counter()
                for m in masks:
                    print(line(f"model, {m}", res[m].metrics["overall"]))
                    if args.by_program:
                        for name, (n, miou) in by_program(rows, res[m].per_sample).items():
                            print(f"    {name:<24} {n:4d} rows  mIoU {miou:.3f}")
                    kinds = answer_kinds(rows, res[m].predictions, res[m].per_sample, args.processed)
                    print(answer_kinds_line(kinds))
                    if args.errors:
                        for kind, text, want, got in kinds:
                            if kind != "right":
                                print(f"      [{kind}] {text!r}: targets {want}, picked {got or 'nothing'}")
                if turns > 1:  # how far the agreement of the orientations tells a reliable answer
                    # the model stack: only a --checkpoint run loads it
                    from scene3d.evaluate import agreement_line, agreement_summary

                    r = res[masks[0]]
                    print(f"  {masks[0]}, {agreement_line(agreement_summary(r.predictions, r.per_sample), turns)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
