"""data_prep.synth_refer: every generated expression is re-checked against the geometry with an independent
implementation of the relations (written here from the module doc, axis by axis, without the module's
vector helpers); files are deterministic and readable by data_prep.refer."""

from __future__ import annotations

import csv
import json
import math

import pytest

from data_prep import refer as R
from data_prep import synth_refer as S

# view -> (lateral axis index, sign of "right"), (depth axis index, sign of "forward"); north = +y, east = +x
VIEW_AXES = {"north": ((0, +1), (1, +1)), "south": ((0, -1), (1, -1)),
             "east": ((1, -1), (0, +1)), "west": ((1, +1), (0, -1))}


def _obj(oid, label, color, center, size, on=None, structural=False):
    return {"object_id": oid, "label": label, "nyu40id": 0, "color_name": color, "color_rgb": [0, 0, 0],
            "center": list(center), "size": list(size), "on_top_of": on, "structural": structural}


def hand_layout():
    a = [_obj(0, "floor", "gray", (3, 3, 0.01), (6, 6, 0.02), structural=True),
         _obj(1, "wall", "white", (0.05, 3, 1.3), (0.1, 6, 2.6), structural=True),
         _obj(2, "table", "brown", (3, 3, 0.38), (1.2, 0.8, 0.76)),
         _obj(3, "chair", "red", (2.0, 3, 0.45), (0.5, 0.5, 0.9)),
         _obj(4, "chair", "red", (4.0, 3, 0.5), (0.7, 0.7, 1.0)),
         _obj(5, "chair", "blue", (3, 1.8, 0.45), (0.45, 0.45, 0.9)),
         _obj(6, "desk", "white", (5.2, 5.2, 0.37), (1.2, 0.6, 0.74)),
         _obj(7, "lamp", "yellow", (5.4, 5.3, 0.94), (0.2, 0.2, 0.4), on=6),
         _obj(8, "door", "brown", (0.12, 5.0, 1.0), (0.05, 0.9, 2.0)),
         _obj(9, "trash can", "gray", (1.0, 1.0, 0.3), (0.3, 0.3, 0.6))]
    b = [_obj(0, "floor", "gray", (2, 2, 0.01), (4, 4, 0.02), structural=True),
         _obj(1, "bed", "white", (2, 2, 0.3), (1.6, 2.0, 0.6)),
         _obj(2, "pillow", "green", (1.6, 2.8, 0.65), (0.5, 0.3, 0.1), on=1),
         _obj(3, "pillow", "green", (2.4, 2.8, 0.65), (0.5, 0.3, 0.1), on=1),
         _obj(4, "nightstand", "brown", (3.3, 2.8, 0.25), (0.4, 0.4, 0.5))]
    return {"seed": 0, "scenes": {"scene5000_00": {"split": "train", "objects": a},
                                  "scene5001_00": {"split": "val", "objects": b}}}


# ------------------------------------------------------------------------------------------------------
# the independent reference
# ------------------------------------------------------------------------------------------------------
def box(o):
    lo = [c - s / 2 for c, s in zip(o["center"], o["size"])]
    hi = [c + s / 2 for c, s in zip(o["center"], o["size"])]
    return lo, hi


def things(objs):
    return [o for o in objs if not o["structural"]]


def denote(objs, label, color=None):
    return [o for o in things(objs) if o["label"] == label and (color is None or o["color_name"] == color)]


def anchor_of(objs, spec):
    found = denote(objs, spec["label"], spec.get("color"))
    assert len(found) == 1, f"anchor {spec} denotes {len(found)} objects"
    return found[0]


def hdist(a, b):
    return math.hypot(a["center"][0] - b["center"][0], a["center"][1] - b["center"][1])


def interval(o, axis, sign):
    lo, hi = box(o)
    return (lo[axis], hi[axis]) if sign > 0 else (-hi[axis], -lo[axis])


def ref_side(op, t, a, view):
    (lat, lsign), (dep, dsign) = VIEW_AXES[view]
    axis, sign = (lat, lsign) if op in ("left", "right") else (dep, dsign)
    (t0, t1), (a0, a1) = interval(t, axis, sign), interval(a, axis, sign)
    m = S.SIDE_MARGIN
    return t1 + m <= a0 if op in ("left", "front") else t0 >= a1 + m


def ref_between(t, a, b):
    (px, py), (qx, qy), (cx, cy) = a["center"][:2], b["center"][:2], t["center"][:2]
    dx, dy = qx - px, qy - py
    length = math.hypot(dx, dy)
    if length < 2 * S.BETWEEN_MIN:
        return False
    along = ((cx - px) * dx + (cy - py) * dy) / length
    off = abs((cx - px) * dy - (cy - py) * dx) / length
    return 0 < along < length and off <= S.BETWEEN_MAX_OFFSET


def ref_on(t, a):
    (alo, ahi), (tlo, _) = box(a), box(t)
    cx, cy = t["center"][:2]
    return (t["on_top_of"] == a["object_id"] and alo[0] <= cx <= ahi[0] and alo[1] <= cy <= ahi[1]
            and tlo[2] > alo[2])


def ref_near(t, a):
    (tlo, thi), (alo, ahi) = box(t), box(a)
    gx = max(0.0, alo[0] - thi[0], tlo[0] - ahi[0])
    gy = max(0.0, alo[1] - thi[1], tlo[1] - ahi[1])
    return math.hypot(gx, gy) <= S.NEAR_GAP


def vol(o):
    return o["size"][0] * o["size"][1] * o["size"][2]


def ref_evaluate(p, objs):
    """Target ids of a program + whether its superlative is clear, by the reference semantics."""
    if p["op"] == "attr":
        found = denote(objs, p["label"], p.get("color"))
        clear = True
        if p.get("size") and found:
            ranked = sorted(found, key=vol, reverse=p["size"] == "large")
            found = [o for o in found if vol(o) == vol(ranked[0])]
            if len(ranked) < 2:
                clear = False
            else:
                big, small = (ranked[0], ranked[1]) if p["size"] == "large" else (ranked[1], ranked[0])
                clear = vol(big) / vol(small) >= S.SIZE_RATIO
        return sorted(o["object_id"] for o in found), clear
    anchors = [anchor_of(objs, s) for s in (p["anchors"] if p["op"] == "between" else [p["anchor"]])]
    aid = {a["object_id"] for a in anchors}
    cands = [o for o in denote(objs, p["label"]) if o["object_id"] not in aid]
    a = anchors[0]
    clear = True
    if p["op"] in ("closest", "farthest"):
        ranked = sorted(cands, key=lambda o: hdist(o, a), reverse=p["op"] == "farthest")
        found = [o for o in cands if hdist(o, a) == hdist(ranked[0], a)] if ranked else []
        clear = len(ranked) >= 2 and abs(hdist(ranked[1], a) - hdist(ranked[0], a)) >= S.DIST_MARGIN
    elif p["op"] in ("left", "right", "front", "behind"):
        found = [o for o in cands if ref_side(p["op"], o, a, p["view"])]
    elif p["op"] == "between":
        found = [o for o in cands if ref_between(o, anchors[0], anchors[1])]
    elif p["op"] == "on":
        found = [o for o in cands if ref_on(o, a)]
    elif p["op"] == "near":
        found = [o for o in cands if ref_near(o, a)]
    else:
        raise AssertionError(p)
    return sorted(o["object_id"] for o in found), clear


REL_WORDS = {"closest": "closest to", "farthest": "farthest from", "left": "to the left of",
             "right": "to the right of", "front": "in front of", "behind": "behind", "between": "between",
             "on": "on top of", "near": "next to"}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def check_text(text, p):
    words = text.split()
    assert p["label"].split()[0] in text, (text, p)
    if p.get("color"):
        assert p["color"] in words, text
    if p.get("size"):
        assert p["size"] in words, text
    if p["op"] != "attr":
        assert REL_WORDS[p["op"]] in text, text
        for spec in (p["anchors"] if p["op"] == "between" else [p["anchor"]]):
            assert spec["label"] in text and (spec.get("color") is None or spec["color"] in words), text
    if "view" in p:
        v = p["view"]
        assert f"from the {OPPOSITE[v]} side of the room towards the {v}" in text, text


def check_files(paths, layout):
    """Every row of every file: targets = reference evaluation of its program; text says what it means."""
    scenes = layout["scenes"]
    counts = {"scanrefer": 0, "multi3drefer": 0, "sr3d": 0}
    kinds = set()
    for split in ("train", "val"):
        for e in json.loads(paths[f"scanrefer_{split}"].read_text()):
            assert scenes[e["scene_id"]]["split"] == split
            objs = scenes[e["scene_id"]]["objects"]
            ids, clear = ref_evaluate(e["program"], objs)
            assert ids == [int(e["object_id"])] and clear, e
            check_text(e["description"], e["program"])
            counts["scanrefer"] += 1
        for e in json.loads(paths[f"multi3drefer_{split}"].read_text()):
            assert scenes[e["scene_id"]]["split"] == split
            objs = scenes[e["scene_id"]]["objects"]
            ids, clear = ref_evaluate(e["program"], objs)
            assert ids == sorted(e["object_ids"]), e
            n = len(ids)
            same_class = denote(objs, e["program"]["label"])
            expected = ("mt" if n >= 2 else
                        ("st_w_d" if len(same_class) > 1 else "st_wo_d") if n == 1 else
                        ("zt_w_d" if same_class else "zt_wo_d"))
            assert e["eval_type"] == expected, e
            if n == 1:
                assert clear, e
            check_text(e["description"], e["program"])
            p = e["program"]
            anchors = [] if p["op"] == "attr" else [anchor_of(objs, a)["object_id"] for a in (
                p["anchors"] if p["op"] == "between" else [p["anchor"]])]
            assert e["anchor_ids"] == anchors, e  # what anchor supervision trains on
            kinds.add(e["eval_type"])
            counts["multi3drefer"] += 1
    with open(paths["sr3d"], newline="") as f:
        for e in csv.DictReader(f):
            objs = scenes[e["scan_id"]]["objects"]
            p = json.loads(e["program"])
            ids, clear = ref_evaluate(p, objs)
            assert ids == [int(e["target_id"])] and clear, e
            anchors = [anchor_of(objs, s)["object_id"] for s in (p["anchors"] if p["op"] == "between"
                                                                 else [p["anchor"]])]
            assert json.loads(e["anchor_ids"]) == anchors
            distractors = sorted(o["object_id"] for o in denote(objs, p["label"]) if o["object_id"] != ids[0])
            assert json.loads(e["distractor_ids"]) == distractors
            assert (e["is_train"] == "True") == (scenes[e["scan_id"]]["split"] == "train")
            counts["sr3d"] += 1
    return counts, kinds


# ------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------
def test_hand_layout_every_expression_true(tmp_path):
    layout = hand_layout()
    paths = S.write_referring_files(tmp_path, layout, seed=3)
    counts, kinds = check_files(paths, layout)
    assert min(counts.values()) > 0
    assert {"mt", "zt_w_d", "zt_wo_d", "st_w_d", "st_wo_d"} <= kinds
    multi = json.loads(paths["multi3drefer_train"].read_text()) + json.loads(paths["multi3drefer_val"].read_text())
    text = {e["description"]: sorted(e["object_ids"]) for e in multi}
    # spot checks computed by hand from hand_layout()
    ops = {e["program"]["op"] for e in multi}
    assert {"attr", "closest", "farthest", "on", "between", "near"} <= ops and ops & {"left", "right", "front", "behind"}
    for sentence, ids in [("the blue chair", [5]), ("all the red chairs", [3, 4]), ("the lamp on top of the desk", [7]),
                          ("the chair", [])]:
        if sentence in text:  # expressions are sampled (MAX_PER_OP per kind), so not all appear
            assert text[sentence] == ids, sentence
    assert "the pillow on top of the bed" not in text      # two pillows on the bed: not a single target


def test_hand_computed_relations():
    objs = S.scene_objects(hand_layout()["scenes"]["scene5000_00"])
    by_id = {o.id: o for o in objs}
    # chair 3 at x=2 is west of the table (x 2.4..3.6): left for an observer looking north, right looking south
    assert S.side_relation("left", by_id[3], by_id[2], "north") and S.side_relation("right", by_id[3], by_id[2], "south")
    # chair 5 (y 1.575..2.025) is south of the table (y 2.6..3.4): in front looking north, behind looking south
    assert S.side_relation("front", by_id[5], by_id[2], "north") and S.side_relation("behind", by_id[5], by_id[2], "south")
    # looking east, right = south: chair 5 is right of the table
    assert S.side_relation("right", by_id[5], by_id[2], "east")
    assert S.between(by_id[2], by_id[3], by_id[4]) and not S.between(by_id[9], by_id[3], by_id[4])
    assert S.on_top_of(by_id[7], by_id[6]) and not S.on_top_of(by_id[6], by_id[7])
    assert S.evaluate({"op": "closest", "label": "chair", "anchor": {"label": "trash can", "color": None}}, objs) == [5]
    assert S.evaluate({"op": "attr", "label": "chair", "color": "red", "size": "large", "all": False}, objs) == [4]
    assert S.evaluate({"op": "near", "label": "chair", "anchor": {"label": "table", "color": None}, "all": True},
                      objs) == [3, 4]  # chair 5 is 0.575 m from the table
    with pytest.raises(ValueError, match="exactly one"):
        S.evaluate({"op": "on", "label": "lamp", "anchor": {"label": "chair", "color": None}}, objs)


def test_deterministic_and_seeded(tmp_path):
    layout = hand_layout()
    p1 = S.write_referring_files(tmp_path / "a", layout, seed=11)
    p2 = S.write_referring_files(tmp_path / "b", layout, seed=11)
    assert set(p1) == set(p2)
    for k in p1:
        assert p1[k].read_bytes() == p2[k].read_bytes(), k
    p3 = S.write_referring_files(tmp_path / "c", layout, seed=12)
    assert any(p1[k].read_bytes() != p3[k].read_bytes() for k in p1)


def test_files_readable_by_refer_readers(tmp_path):
    layout = hand_layout()
    paths = S.write_referring_files(tmp_path, layout, seed=0)
    labels = {"chair": 5, "table": 7, "desk": 14, "lamp": 35, "door": 8, "trash can": 39, "bed": 4, "pillow": 18,
              "nightstand": 32}
    rows = R.read_scanrefer(paths["scanrefer_train"], labels, dataset="synth_scanrefer")
    assert rows and all(r["program"] for r in rows)
    # three chairs, one table: unique exactly where the target's class occurs once among described objects
    m = R.read_multi3drefer(paths["multi3drefer_val"], dataset="synth_multi3drefer")
    assert {r["scene_id"] for r in m} == {"scene5001_00"}
    for r in m + rows:  # the anchors travel into the rows; attribute rows name none
        assert (r["anchors"] is None) == (r["program"]["op"] == "attr"), r
    assert any(r["anchors"] for r in m)
    sr = R.read_sr3d(paths["sr3d"])
    assert sr and all(r["program"] for r in sr)
    assert any(r["view_dep"] for r in sr)
    for r in sr:
        assert r["easy"] == (len(r["distractors"]) <= 1)


def test_bad_layouts(tmp_path):
    layout = hand_layout()
    layout["scenes"]["scene5000_00"]["split"] = "test"
    with pytest.raises(ValueError, match="split"):
        S.write_referring_files(tmp_path, layout, seed=0)
    layout = hand_layout()
    layout["scenes"]["scene5000_00"]["objects"][3]["center"] = [float("nan"), 0, 0]
    with pytest.raises(ValueError, match="center"):
        S.write_referring_files(tmp_path, layout, seed=0)
    with pytest.raises(ValueError, match="scenes"):
        S.write_referring_files(tmp_path, {"scenes": {}}, seed=0)


def test_generated_synthetic_dataset(synth_root):
    """The scenes of data_prep.synth (via the shared fixture): every expression is true of their layout."""
    layout = json.loads((synth_root / "synth_layout.json").read_text())
    ref = synth_root / "referring"
    paths = {f"{d}_{s}": ref / f"synth_{d}_{s}.json" for d in ("scanrefer", "multi3drefer") for s in ("train", "val")}
    paths["sr3d"] = ref / "synth_sr3d.csv"
    assert all(p.is_file() for p in paths.values())
    counts, kinds = check_files(paths, layout)
    assert counts["scanrefer"] > 10 and counts["multi3drefer"] > counts["scanrefer"] and counts["sr3d"] > 0
    assert {"st_wo_d", "zt_w_d"} <= kinds
