"""data_prep.real_refer: expressions generated on annotated real scans.

Every generated row of both real mmdetection3d exports (scene0000_01 / scene0000_02, rescans of one room) is
re-checked by a SECOND implementation written here differently: boxes recomputed from the points, colours
through ``colorsys``, every relation as a numpy matrix over all objects at once (the module loops over
object pairs with the helpers of data_prep.synth_refer). A hand-made scene pins support, colour and the bad
inputs; the CLI writes the common format that the readers and the processed-scene filter accept."""

from __future__ import annotations

import colorsys
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from data_prep import real_refer as RR
from data_prep import refer as R
from data_prep import synth_refer as S
from scene3d.cli import main
from scene3d.constants import PROCESSED_FORMAT_VERSION
from scene3d.data.augment import turn_points, turn_row
from scene3d.data.scene import load_processed_scene

MMDET = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"
REAL_SCENES = ("scene0000_01", "scene0000_02")
VIEW = {"north": (0.0, 1.0), "south": (0.0, -1.0), "east": (1.0, 0.0), "west": (-1.0, 0.0)}


# ------------------------------------------------------------------------------------------------------
# the independent reference
# ------------------------------------------------------------------------------------------------------
def ref_color(rgb_points: np.ndarray):
    """The colour rule of the module doc, per point with colorsys, then a majority vote."""
    names = []
    for r, g, b in (rgb_points / 255.0).tolist():
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        h *= 360
        if v < 0.2:
            n = "black"
        elif s < 0.2:
            n = "white" if v > 0.75 else "gray"
        else:
            n = ("red" if h < 15 or h >= 340 else "orange" if h < 45 else "yellow" if h < 70 else
                 "green" if h < 165 else "blue" if h < 255 else "purple" if h < 290 else "pink")
            if n == "orange" and (s < 0.65 or v < 0.75):
                n = "brown"
            if n in ("red", "yellow") and v < 0.5:
                n = "brown"
        names.append(n)
    values, counts = np.unique(names, return_counts=True)
    top = counts.max()
    winners = sorted(values[counts == top])
    return winners[0] if top >= RR.COLOR_MAJORITY * len(names) else ""


class Boxes:
    """All objects of a scene as arrays: boxes from the points, label / colour / nameable per object."""

    def __init__(self, scene):
        objs = [o for o in scene.objects if o.num_points >= RR.MIN_POINTS]
        self.ids = np.array([o.id for o in objs])
        inst = scene.instance
        self.lo = np.stack([scene.coord[inst == i].min(0) for i in self.ids]).astype(np.float64)
        self.hi = np.stack([scene.coord[inst == i].max(0) for i in self.ids]).astype(np.float64)
        self.c = (self.lo + self.hi) / 2
        fix = {"refridgerator": "refrigerator"}
        self.label = np.array([fix.get(o.label.lower(), o.label.lower()) for o in objs])
        self.nameable = np.array([o.nyu40_id not in (1, 2, 22) and not o.label.startswith("other") for o in objs])
        self.color = np.array([ref_color(scene.color[inst == i].astype(np.float64)) for i in self.ids])
        self.index = {int(i): k for k, i in enumerate(self.ids)}
        n = len(self.ids)
        xy = self.c[:, :2]
        self.dist = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))                 # [t, a]
        gap = np.maximum(0, np.maximum(self.lo[None, :, :2] - self.hi[:, None, :2],
                                       self.lo[:, None, :2] - self.hi[None, :, :2]))
        self.near = np.sqrt((gap ** 2).sum(-1)) <= S.NEAR_GAP
        # support: bottom near the top, centre over the footprint, centre above the top, half the footprint over
        top = self.hi[None, :, 2]
        bottom = self.lo[:, None, 2]
        inside = ((self.lo[None, :, :2] <= xy[:, None, :]) & (xy[:, None, :] <= self.hi[None, :, :2])).all(-1)
        inter = np.clip(np.minimum(self.hi[:, None, :2], self.hi[None, :, :2])
                        - np.maximum(self.lo[:, None, :2], self.lo[None, :, :2]), 0, None).prod(-1)
        area = (self.hi[:, :2] - self.lo[:, :2]).prod(-1)
        cand = ((bottom >= top - RR.ON_SINK) & (bottom <= top + RR.ON_GAP) & (self.c[:, None, 2] > top) & inside
                & (inter >= RR.ON_OVERLAP * area[:, None]) & self.nameable[None, :] & self.nameable[:, None]
                & ~np.eye(n, dtype=bool))
        self.support = np.where(cand.any(1), np.argmax(np.where(cand, top, -np.inf), axis=1), -1)

    def denote(self, label, color=None):
        m = self.nameable & (self.label == label)
        return m & (self.color == color) if color is not None else m

    def anchor(self, spec):
        m = self.denote(spec["label"], spec.get("color"))
        assert m.sum() == 1, f"anchor {spec} denotes {int(m.sum())} objects"
        return int(np.flatnonzero(m)[0])

    def side(self, op, view):
        """[t, a] matrix of left / right / front / behind for an observer looking towards ``view``."""
        fx, fy = VIEW[view]
        axis = np.array([fy, -fx]) if op in ("left", "right") else np.array([fx, fy])
        # extent of an axis-aligned box along a unit axis: the corner products' min / max
        lo = np.where(axis > 0, self.lo[:, :2], self.hi[:, :2]) @ axis
        hi = np.where(axis > 0, self.hi[:, :2], self.lo[:, :2]) @ axis
        if op in ("left", "front"):
            return hi[:, None] + S.SIDE_MARGIN <= lo[None, :]
        return lo[:, None] >= hi[None, :] + S.SIDE_MARGIN

    def between(self, a, b):
        p, q = self.c[a, :2], self.c[b, :2]
        d = q - p
        if np.hypot(*d) < 2 * S.BETWEEN_MIN:
            return np.zeros(len(self.ids), bool)
        rel = self.c[:, :2] - p
        s = rel @ d / (d @ d)
        off = np.abs(rel[:, 0] * d[1] - rel[:, 1] * d[0]) / np.hypot(*d)
        return (s > 0) & (s < 1) & (off <= S.BETWEEN_MAX_OFFSET)

    def evaluate(self, p):
        """(sorted target ids, superlative clear?) of a program."""
        vol = (self.hi - self.lo).prod(-1)
        if p["op"] == "attr":
            m = self.denote(p["label"], p.get("color"))
            clear = True
            if p.get("size") and m.any():
                v = np.where(m, vol, -np.inf if p["size"] == "large" else np.inf)
                best = v.max() if p["size"] == "large" else v.min()
                ranked = np.sort(vol[m])[::-1] if p["size"] == "large" else np.sort(vol[m])
                clear = len(ranked) >= 2 and max(ranked[:2]) / min(ranked[:2]) >= S.SIZE_RATIO
                m = m & (vol == best)
            return sorted(self.ids[m].tolist()), clear
        specs = p["anchors"] if p["op"] == "between" else [p["anchor"]]
        anchors = [self.anchor(s) for s in specs]
        cand = self.denote(p["label"])
        cand[anchors] = False
        a = anchors[0]
        clear = True
        if p["op"] in ("closest", "farthest"):
            d = np.where(cand, self.dist[:, a], np.nan)
            best = np.nanmax(d) if p["op"] == "farthest" else np.nanmin(d)
            m = cand & (d == best)
            ranked = np.sort(d[cand])[::-1] if p["op"] == "farthest" else np.sort(d[cand])
            clear = len(ranked) >= 2 and abs(ranked[1] - ranked[0]) >= S.DIST_MARGIN
        elif p["op"] in S.VIEW_OPS:
            m = cand & self.side(p["op"], p["view"])[:, a]
        elif p["op"] == "between":
            m = cand & self.between(anchors[0], anchors[1])
        elif p["op"] == "on":
            m = cand & (self.support == a)
        elif p["op"] == "near":
            m = cand & self.near[:, a]
        else:
            raise AssertionError(p)
        return sorted(self.ids[m].tolist()), clear


def check_rows(rows, scenes: dict) -> set:
    """Every row: targets, flags, anchors and distractors as the reference computes them; text says it."""
    ops = set()
    for r in rows:
        b = scenes[r["scene_id"]]
        p = r["program"]
        ids, clear = b.evaluate(p)
        assert ids == r["targets"], (r, ids)
        n = len(ids)
        same = sorted(b.ids[b.denote(p["label"])].tolist())
        expected = ("mt" if n >= 2 else ("st_w_d" if len(same) > 1 else "st_wo_d") if n == 1 else
                    ("zt_w_d" if same else "zt_wo_d"))
        assert r["eval_type"] == expected, r
        assert (n >= 2) == bool(p.get("all")) or n == 0, r
        if n == 1:
            assert clear, r
        assert r["distractors"] == [i for i in same if i not in ids], r
        if p["op"] != "attr":
            specs = p["anchors"] if p["op"] == "between" else [p["anchor"]]
            assert r["anchors"] == [int(b.ids[b.anchor(s)]) for s in specs], r
            assert not set(r["anchors"]) & set(ids)
        words = r["text"].split()
        assert p["label"].split()[-1] in r["text"] and (p.get("color") is None or p["color"] in words), r
        for obj_id in ids:  # a target is never structure or an unnameable class
            assert b.nameable[b.index[obj_id]]
        ops.add(p["op"])
    return ops


# ------------------------------------------------------------------------------------------------------
# real scans
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(real_data):
    root = real_data / MMDET
    rep = RR.generate_rows(root, progress=False)
    scenes = {sid: Boxes(load_processed_scene(root / sid)) for sid in REAL_SCENES}
    return root, rep, scenes


def test_every_row_of_both_real_scans_is_true(real):
    root, rep, scenes = real
    assert set(rep.per_scene) == set(REAL_SCENES) and all(v >= 20 for v in rep.per_scene.values()), rep.per_scene
    ops = check_rows(rep.rows, scenes)
    # each program kind occurs on these two scans (between / on / a view op / near / superlatives / attr)
    assert {"attr", "closest", "farthest", "between", "on", "near"} <= ops and ops & set(S.VIEW_OPS), ops
    kinds = {r["eval_type"] for r in rep.rows}
    assert {"mt", "st_w_d", "st_wo_d", "zt_w_d", "zt_wo_d"} <= kinds, kinds


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_rows_stay_true_on_a_turned_scan(real, turns):
    """Training's rotation augmentation (scene3d.data.augment): the scan turned by quarter turns about z and
    each row's compass words turned with it; the reference re-check, on boxes recomputed from the turned
    points, finds every row still true (the viewpoint rows' sides included), and a view row's text changed."""
    root, rep, _ = real
    changed = 0
    for sid in REAL_SCENES:
        scene = load_processed_scene(root / sid)
        pts = turn_points({"coord": torch.from_numpy(scene.coord.astype(np.float32))}, turns)
        turned = dataclasses.replace(scene, coord=pts["coord"].numpy().astype(np.float64))
        rows = [r for r in rep.rows if r["scene_id"] == sid]
        moved = [turn_row(r, turns) for r in rows]
        check_rows(moved, {sid: Boxes(turned)})
        changed += sum(m["text"] != r["text"] for m, r in zip(moved, rows))
        assert all(m["program"].get("view") != r["program"].get("view") for m, r in zip(moved, rows)
                   if r["program"]["op"] in S.VIEW_OPS)
    assert changed > 0


def test_real_objects_labels_colours_support(real):
    root, rep, scenes = real
    for sid in REAL_SCENES:
        objs = RR.load_real_scene(root, sid).objects
        b = scenes[sid]
        for o in objs:
            k = b.index[o.id]
            np.testing.assert_allclose(o.lo, b.lo[k], atol=1e-5)  # the loader's boxes = min / max of the points
            np.testing.assert_allclose(o.hi, b.hi[k], atol=1e-5)
            assert o.color == b.color[k], (sid, o)
            assert o.structural == (not b.nameable[k]), (sid, o)
            assert (o.on_top_of is None) == (b.support[k] < 0) or o.structural
            if o.on_top_of is not None:
                assert o.on_top_of == int(b.ids[b.support[k]])
        labels = {o.label for o in objs}
        assert "refrigerator" in labels and "refridgerator" not in labels
        assert not any(o.label in ("wall", "floor", "ceiling") and not o.structural for o in objs)
    # the one pillow of each rescan rests on the bed (read off the two scans by hand)
    for sid, pillow, bed in (("scene0000_01", 46, 53), ("scene0000_02", 51, 12)):
        by_id = {o.id: o for o in RR.load_real_scene(root, sid).objects}
        assert by_id[pillow].label == "pillow" and by_id[bed].label == "bed"
        assert by_id[pillow].on_top_of == bed


def test_scene_rows_do_not_depend_on_the_other_scenes(real, tmp_path, capsys):
    root, rep, _ = real
    alone = RR.generate_rows(root, ["scene0000_02"], progress=False).rows
    assert alone == [r for r in rep.rows if r["scene_id"] == "scene0000_02"]
    other_seed = RR.generate_rows(root, ["scene0000_02"], seed=1, progress=False).rows
    assert other_seed != alone
    more = RR.generate_rows(root, ["scene0000_02"], max_per_op=6, progress=False).rows
    assert len(more) > len(alone)


def _by_op(rows):
    zero, positive = {}, {}
    for r in rows:
        table = positive if r["targets"] else zero
        table[r["program"]["op"]] = table.get(r["program"]["op"], 0) + 1
    return zero, positive


@pytest.mark.parametrize("share", [0.5, 0.2, 0.0])
def test_zero_share_caps_the_zero_target_rows_of_each_op(real, share, tmp_path, capsys):
    root = real[0]
    full = RR.generate_rows(root, ["scene0000_01"], max_per_op=100, progress=False).rows
    zero, positive = _by_op(full)
    # the imbalance the cap is for: absent objects are unlimited, objects of a room are not
    assert zero["attr"] > 2 * positive["attr"] and zero["near"] > 2 * positive["near"]
    capped = RR.generate_rows(root, ["scene0000_01"], max_per_op=100, zero_share=share, progress=False).rows
    by_id = {r["ann_id"]: r for r in full}
    assert all(by_id[r["ann_id"]] == r for r in capped)  # a subset, ids kept
    assert [r for r in full if r["targets"]] == [r for r in capped if r["targets"]]  # every positive row kept
    czero, cpositive = _by_op(capped)
    for op, n in czero.items():
        assert n <= share * (n + cpositive[op]) + 1e-9, (op, n, cpositive[op])
        assert n + 1 > share * (n + 1 + cpositive[op]), (op, n)  # as many as the cap allows
    assert sum(czero.values()) > 0 if share else not czero
    out = tmp_path / "capped.jsonl"
    assert main(["prep", "refer", "--dataset", "generated", "--processed", str(root), "--scenes", "scene0000_01",
                 "--per-op", "100", "--zero-share", str(share), "--out", str(out), "--no-progress"]) == 0
    assert [r["ann_id"] for r in R.read_refer_jsonl(out)] == [r["ann_id"] for r in capped]


def test_cli_writes_the_common_format(real, tmp_path, capsys):
    root, rep, scenes = real
    out = tmp_path / "gen.jsonl"
    assert main(["prep", "refer", "--dataset", "generated", "--processed", str(root), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(rep.rows)} generated rows of 2 scenes" in printed and "s per scene" in printed
    rows = R.read_refer_jsonl(out)
    assert [{k: r[k] for k in R.ROW_KEYS} for r in rows] == rep.rows
    assert all(set(r) == set(R.ROW_KEYS) and r["program"] and r["dataset"] == "generated" for r in rows)
    assert len({(r["scene_id"], r["ann_id"]) for r in rows}) == len(rows)
    assert not R.filter_against_processed(rows, root).dropped  # targets, distractors, anchors all exist
    one = tmp_path / "one.jsonl"
    assert main(["prep", "refer", "--dataset", "generated", "--processed", str(root), "--scenes", "scene0000_01",
                 "--out", str(one), "--no-progress"]) == 0
    assert {r["scene_id"] for r in R.read_refer_jsonl(one)} == {"scene0000_01"}


# ------------------------------------------------------------------------------------------------------
# a hand-made scene3d scene
# ------------------------------------------------------------------------------------------------------
def _box_points(rng, lo, hi, n, rgb):
    pts = rng.uniform(lo, hi, size=(n, 3))
    pts[:2] = lo, hi  # the box is exactly lo..hi
    return pts.astype(np.float32), np.tile(np.asarray(rgb, np.uint8), (n, 1))


def write_hand_scene(root, scene_id, objects, boxes=True):
    """A scene3d processed directory from (id, label, nyu40, lo, hi, rgb) tuples."""
    rng = np.random.default_rng(0)
    d = root / scene_id
    d.mkdir(parents=True)
    coord, color, inst, rows = [], [], [], []
    for oid, label, nyu, lo, hi, rgb in objects:
        p, c = _box_points(rng, lo, hi, 60, rgb)
        coord.append(p), color.append(c), inst.append(np.full(len(p), oid, np.int32))
        row = {"id": oid, "label": label, "nyu40_id": nyu, "num_points": len(p)}
        if boxes:
            row.update(center=((np.array(lo) + hi) / 2).tolist(), size=(np.array(hi) - lo).tolist())
        rows.append(row)
    coord, color, inst = np.concatenate(coord), np.concatenate(color), np.concatenate(inst)
    n = len(coord)
    arrays = {"coord": coord, "color": color, "normal": np.tile(np.float32([0, 0, 1]), (n, 1)),
              "superpoint": np.arange(n, dtype=np.int32), "segment20": np.full(n, -1, np.int16),
              "segment200": np.full(n, -1, np.int16), "instance": inst}
    for k, a in arrays.items():
        np.save(d / f"{k}.npy", a)
    (d / "objects.json").write_text(json.dumps({"scene_id": scene_id, "objects": rows}))
    (d / "meta.json").write_text(json.dumps({"format_version": PROCESSED_FORMAT_VERSION, "scene_id": scene_id}))
    return d


HAND = [(0, "floor", 2, (0, 0, -0.02), (5, 5, 0.0), (128, 128, 128)),
        (1, "table", 7, (1, 1, 0), (2.2, 1.8, 0.75), (110, 70, 30)),        # dark wood -> brown
        (2, "box", 29, (1.3, 1.2, 0.70), (1.7, 1.5, 1.0), (230, 20, 20)),   # sunk 5 cm into the table top: on it
        (3, "chair", 5, (3.0, 1.0, 0), (3.5, 1.5, 0.9), (30, 40, 200)),
        (4, "chair", 5, (0.2, 3.5, 0), (0.7, 4.0, 0.9), (30, 200, 40)),
        (5, "curtain", 16, (0.5, 0.7, 0.74), (2.5, 0.9, 2.4), (240, 240, 240)),  # bottom at the table top, beside it
        (6, "otherprop", 40, (4, 4, 0), (4.3, 4.3, 0.3), (0, 0, 0))]


def test_hand_scene_support_colours_and_rows(tmp_path):
    write_hand_scene(tmp_path, "scene0100_00", HAND)
    real = RR.load_real_scene(tmp_path, "scene0100_00")
    by_id = {o.id: o for o in real.objects}
    assert [by_id[i].color for i in range(1, 6)] == ["brown", "red", "blue", "green", "white"]
    assert by_id[2].on_top_of == 1 and by_id[5].on_top_of is None and by_id[3].on_top_of is None
    assert by_id[0].structural and by_id[6].structural and not by_id[2].structural
    rows = RR.scene_rows(real, max_per_op=50)
    text = {r["text"]: r["targets"] for r in rows}
    assert text.get("the box on top of the table") == [2]
    assert text.get("the blue chair") == [3] and text.get("all the chairs next to the table") in (None, [])
    assert not any("otherprop" in t or "floor" in t for t in text)
    check_rows(rows, {"scene0100_00": Boxes(load_processed_scene(tmp_path / "scene0100_00"))})


@pytest.mark.parametrize("rgb,name", [((250, 250, 250), "white"), ((10, 10, 10), "black"), ((128, 128, 128), "gray"),
                                      ((220, 30, 30), "red"), ((250, 140, 10), "orange"), ((140, 90, 40), "brown"),
                                      ((240, 230, 30), "yellow"), ((40, 180, 60), "green"), ((40, 60, 200), "blue"),
                                      ((130, 40, 200), "purple"), ((240, 80, 190), "pink")])
def test_color_names(rgb, name):
    assert RR.COLORS[int(RR.color_names(np.array([rgb]))[0])] == name
    assert ref_color(np.array([rgb], np.float64)) == name


# ------------------------------------------------------------------------------------------------------
# bad input: one line naming the scene
# ------------------------------------------------------------------------------------------------------
def _cli_error(argv, capsys) -> str:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        assert isinstance(e.code, str), e.code
        print(e.code, file=sys.stderr)
        rc = 1
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("scene3d prep refer: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_names_the_scene(tmp_path, real_data, capsys):
    no_boxes = tmp_path / "no_boxes"
    write_hand_scene(no_boxes, "scene0101_00", HAND, boxes=False)
    one_object = tmp_path / "one_object"
    write_hand_scene(one_object, "scene0102_00", [HAND[0], HAND[1], HAND[6]])
    export = tmp_path / "export"  # an mmdet3d export without its instance file
    export.mkdir()
    for part in ("vert", "sem_label"):
        (export / f"scene0000_01_{part}_all.npy").symlink_to(real_data / MMDET / f"scene0000_01_{part}_all.npy")
    cases = [(no_boxes, ["scene0101_00", "no object has a box"]),
             (one_object, ["scene0102_00", "1 nameable", "at least 2"]),
             (export, ["scene0000_01", "no instance file", "scene0000_01_ins_label_all.npy"])]
    for processed, needles in cases:
        out = tmp_path / "x.jsonl"
        line = _cli_error(["prep", "refer", "--dataset", "generated", "--processed", processed, "--out", out,
                           "--no-progress"], capsys)
        assert all(n in line for n in needles), (needles, line)
        assert not out.exists()
    line = _cli_error(["prep", "refer", "--dataset", "generated", "--processed", one_object, "--scenes",
                       "scene9999_00", "--out", tmp_path / "x.jsonl"], capsys)
    assert "scene9999_00" in line
    line = _cli_error(["prep", "refer", "--dataset", "generated", "--out", tmp_path / "x.jsonl"], capsys)
    assert "--processed" in line
    line = _cli_error(["prep", "refer", "--dataset", "nr3d", "--out", tmp_path / "x.jsonl"], capsys)
    assert "SRC" in line
    for share in ("1.0", "-0.1"):
        line = _cli_error(["prep", "refer", "--dataset", "generated", "--processed", real_data / MMDET,
                           "--zero-share", share, "--out", tmp_path / "x.jsonl"], capsys)
        assert "--zero-share" in line and share in line
    line = _cli_error(["prep", "refer", "nr3d.csv", "--dataset", "nr3d", "--zero-share", "0.5", "--out",
                       tmp_path / "x.jsonl"], capsys)
    assert "--zero-share" in line and "generated" in line
    with pytest.raises(ValueError, match="zero_share"):
        RR.generate_rows(real_data / MMDET, ["scene0000_01"], zero_share=1.0, progress=False)
