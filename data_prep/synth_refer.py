"""Synthetic referring expressions that are TRUE of the synthetic scenes' geometry (data_prep/synth.py).

``write_referring_files(out_dir, layout, seed)`` writes, for the scenes of ``synth_layout.json``::

    out_dir/referring/synth_scanrefer_{train,val}.json     ScanRefer format, single target, + "program"
    out_dir/referring/synth_multi3drefer_{train,val}.json  Multi3DRefer format: zero / single / multi target
                                                           (both + "anchor_ids": the program's anchors'
                                                           object ids, [] for attributes, as Sr3D names them)
    out_dir/referring/synth_sr3d.csv                       Sr3D columns (+ "program"), is_train per scene split

and returns their paths. Each expression comes from a machine-readable ``program`` (a dict, below) whose
meaning is :func:`evaluate` in the relations section; the generator keeps a program only when its result has
the intended number of targets (and, for superlatives, a clear margin), and renders the text from it.

Frame and viewpoint
    The layout is in ScanNet's ALIGNED frame: z up, floor at z = 0. Compass words name the axes:
    **north = +y, south = -y, east = +x, west = -x**. A viewpoint ``"view": V`` (V in north/south/east/west)
    is an observer standing on the opposite side of the room and looking towards V ("looking from the south
    side of the room towards the north" for V = north). For that observer ``forward`` is the unit vector of V
    and ``right`` is forward turned 90 degrees clockwise seen from above, ``right = (f_y, -f_x)``.

Relations (all on axis-aligned boxes ``lo``/``hi``, ``center``, xy = horizontal part)
    ===============  ==========================================================================================
    relation         definition
    ===============  ==========================================================================================
    distance(a, b)   Euclidean distance of the box centres' xy
    closest          among the objects of the label (anchor excluded), the strictly smallest distance to the
                     anchor; generated only when the runner-up is >= DIST_MARGIN farther
    farthest         the same with the largest distance
    left_of(t,a,V)   t's box ends before a's box starts along ``-right``: max(t·right) + SIDE_MARGIN <=
                     min(a·right); right_of mirrors it; in_front_of: t entirely nearer the observer along
                     ``forward`` (max(t·f) + SIDE_MARGIN <= min(a·f)); behind: entirely farther
    between(t,a,b)   t's centre xy projects inside the open segment between the anchors' centres
                     (0 < s < 1) at a perpendicular distance <= BETWEEN_MAX_OFFSET; anchors >= 2·BETWEEN_MIN
                     apart
    on(t, a)         the layout records t.on_top_of == a, t's centre xy lies in a's xy footprint and t's
                     box bottom is above a's box bottom
    next_to(t, a)    the gap between the xy rectangles of the boxes is <= NEAR_GAP
    large / small    largest / smallest box volume among the selected objects; generated only with a
                     ratio >= SIZE_RATIO to the runner-up
    ===============  ==========================================================================================

Programs (``label``/``color`` are layout ``label`` / ``color_name``; an ANCHOR is ``{"label", "color"}``
and must denote exactly one non-structural object)::

    {"op": "attr", "label", "color"|None, "size": "large"|"small"|None, "all": bool}
    {"op": "closest"|"farthest", "label", "anchor": ANCHOR}
    {"op": "left"|"right"|"front"|"behind", "label", "anchor": ANCHOR, "view": V}
    {"op": "between", "label", "anchors": [ANCHOR, ANCHOR]}
    {"op": "on", "label", "anchor": ANCHOR}
    {"op": "near", "label", "anchor": ANCHOR, "all": true}

Structural objects (wall, floor) are never targets or anchors. Everything is a deterministic function of
``(layout, seed)``: the same inputs write the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from scene3d.utils.io import write_json_atomic, write_text_atomic
from scene3d.utils.text import plural

DIST_MARGIN = 0.3          # metres between the closest (farthest) and the runner-up
SIDE_MARGIN = 0.05         # metres of clear separation for left / right / front / behind
BETWEEN_MAX_OFFSET = 0.6   # metres from the segment joining the anchors
BETWEEN_MIN = 0.5          # half the minimum anchor separation, metres
NEAR_GAP = 0.5             # metres between box footprints for "next to"
SIZE_RATIO = 1.25          # volume ratio for large / small
MAX_PER_OP = 3             # expressions per op kind and scene (sampled with the seed)

VIEWS = {"north": (0.0, 1.0), "south": (0.0, -1.0), "east": (1.0, 0.0), "west": (-1.0, 0.0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
VIEW_OPS = ("left", "right", "front", "behind")
SR3D_TYPES = {  # op -> (coarse_reference_type, reference_type) as Sr3D names them
    "closest": ("horizontal", "closest"), "farthest": ("horizontal", "farthest"),
    "between": ("between", "between"), "on": ("support", "supported-by"),
    "left": ("allocentric", "left"), "right": ("allocentric", "right"),
    "front": ("allocentric", "front"), "behind": ("allocentric", "back"),
}
SR3D_COLUMNS = ["scan_id", "target_id", "distractor_ids", "utterance", "stimulus_id", "coarse_reference_type",
                "reference_type", "instance_type", "anchors_types", "anchor_ids", "tokens", "dataset",
                "mentions_target_class", "correct_guess", "is_train", "program"]


class Obj(NamedTuple):
    id: int
    label: str
    color: str
    lo: np.ndarray      # [3]
    hi: np.ndarray      # [3]
    on_top_of: Optional[int]
    structural: bool

    @property
    def center(self) -> np.ndarray:
        return (self.lo + self.hi) / 2

    @property
    def volume(self) -> float:
        return float(np.prod(self.hi - self.lo))


def scene_objects(scene: dict) -> list[Obj]:
    """Layout objects of one scene -> :class:`Obj` (validated: finite boxes, non-negative sizes, unique ids)."""
    out, seen = [], set()
    for i, o in enumerate(scene.get("objects", [])):
        c = np.asarray(o["center"], dtype=np.float64)
        s = np.asarray(o["size"], dtype=np.float64)
        if c.shape != (3,) or s.shape != (3,) or not (np.isfinite(c).all() and np.isfinite(s).all()) or (s < 0).any():
            raise ValueError(f"layout object {i}: bad center/size {o.get('center')} / {o.get('size')}")
        oid = int(o["object_id"])
        if oid in seen:
            raise ValueError(f"layout: duplicate object_id {oid}")
        seen.add(oid)
        out.append(Obj(oid, str(o["label"]), str(o["color_name"]), c - s / 2, c + s / 2,
                       None if o.get("on_top_of") is None else int(o["on_top_of"]), bool(o.get("structural"))))
    return out


# ======================================================================================================
# relations: pure functions of the layout geometry
# ======================================================================================================
def distance(a: Obj, b: Obj) -> float:
    return float(np.linalg.norm(a.center[:2] - b.center[:2]))


def footprint_gap(a: Obj, b: Obj) -> float:
    gap = np.maximum(0.0, np.maximum(a.lo[:2] - b.hi[:2], b.lo[:2] - a.hi[:2]))
    return float(np.linalg.norm(gap))


def view_axes(view: str) -> tuple[np.ndarray, np.ndarray]:
    """(forward, right) unit xy vectors of an observer looking towards ``view``."""
    f = np.asarray(VIEWS[view])
    return f, np.array([f[1], -f[0]])


def _extent(o: Obj, axis: np.ndarray) -> tuple[float, float]:
    corners = np.array([[x, y] for x in (o.lo[0], o.hi[0]) for y in (o.lo[1], o.hi[1])]) @ axis
    return float(corners.min()), float(corners.max())


def side_relation(op: str, t: Obj, a: Obj, view: str) -> bool:
    """left / right / front / behind of ``t`` relative to ``a`` for an observer looking towards ``view``."""
    f, r = view_axes(view)
    axis, before = {"left": (r, True), "right": (r, False), "front": (f, True), "behind": (f, False)}[op]
    t_lo, t_hi = _extent(t, axis)
    a_lo, a_hi = _extent(a, axis)
    return t_hi + SIDE_MARGIN <= a_lo if before else t_lo >= a_hi + SIDE_MARGIN


def between(t: Obj, a: Obj, b: Obj) -> bool:
    p, q, c = a.center[:2], b.center[:2], t.center[:2]
    d = q - p
    length2 = float(d @ d)
    if length2 < (2 * BETWEEN_MIN) ** 2:
        return False
    s = float((c - p) @ d) / length2
    offset = abs(float(d[0] * (c - p)[1] - d[1] * (c - p)[0])) / np.sqrt(length2)
    return 0.0 < s < 1.0 and offset <= BETWEEN_MAX_OFFSET


def on_top_of(t: Obj, a: Obj) -> bool:
    c = t.center
    return (t.on_top_of == a.id and bool(np.all(a.lo[:2] <= c[:2]) and np.all(c[:2] <= a.hi[:2]))
            and t.lo[2] > a.lo[2])


def next_to(t: Obj, a: Obj) -> bool:
    return footprint_gap(t, a) <= NEAR_GAP


def select(objs: list[Obj], label: str, color: Optional[str] = None) -> list[Obj]:
    return [o for o in objs if not o.structural and o.label == label and (color is None or o.color == color)]


def program_anchors(program: dict) -> list[dict]:
    """The anchor specs of a program, in order (none for ``attr``)."""
    if program["op"] == "between":
        return list(program["anchors"])
    return [program["anchor"]] if "anchor" in program else []


def resolve_anchor(objs: list[Obj], spec: dict) -> Optional[Obj]:
    """The one object an anchor spec denotes, or None when it denotes zero or several."""
    found = select(objs, spec["label"], spec.get("color"))
    return found[0] if len(found) == 1 else None


def _extreme(cands: list[Obj], key, largest: bool) -> list[Obj]:
    if not cands:
        return []
    vals = [key(o) for o in cands]
    best = max(vals) if largest else min(vals)
    return [o for o, v in zip(cands, vals) if v == best]


def evaluate(program: dict, objs: list[Obj]) -> list[int]:
    """The object ids a program denotes (sorted). Raises ValueError if an anchor is not exactly one object."""
    op = program["op"]
    if op == "attr":
        found = select(objs, program["label"], program.get("color"))
        if program.get("size"):
            found = _extreme(found, lambda o: o.volume, program["size"] == "large")
        return sorted(o.id for o in found)
    resolved = [resolve_anchor(objs, a) for a in program_anchors(program)]
    if any(a is None for a in resolved):
        raise ValueError(f"anchor of {program} does not denote exactly one object")
    ids = {a.id for a in resolved}
    cands = [o for o in select(objs, program["label"]) if o.id not in ids]
    a = resolved[0]
    if op in ("closest", "farthest"):
        found = _extreme(cands, lambda o: distance(o, a), op == "farthest")
    elif op in VIEW_OPS:
        found = [o for o in cands if side_relation(op, o, a, program["view"])]
    elif op == "between":
        found = [o for o in cands if between(o, resolved[0], resolved[1])]
    elif op == "on":
        found = [o for o in cands if on_top_of(o, a)]
    elif op == "near":
        found = [o for o in cands if next_to(o, a)]
    else:
        raise ValueError(f"unknown program op {op!r}")
    return sorted(o.id for o in found)


def is_clear(program: dict, objs: list[Obj]) -> bool:
    """Margins of the superlatives: closest / farthest / large / small beat the runner-up clearly."""
    op = program["op"]
    if op in ("closest", "farthest"):
        a = resolve_anchor(objs, program["anchor"])
        d = sorted(distance(o, a) for o in select(objs, program["label"]) if o.id != a.id)
        if op == "farthest":
            d = d[::-1]
        return len(d) >= 2 and abs(d[1] - d[0]) >= DIST_MARGIN
    if op == "attr" and program.get("size"):
        v = sorted((o.volume for o in select(objs, program["label"], program.get("color"))),
                   reverse=program["size"] == "large")
        return len(v) >= 2 and min(v[0], v[1]) > 0 and max(v[0], v[1]) / min(v[0], v[1]) >= SIZE_RATIO
    return True


# ======================================================================================================
# text
# ======================================================================================================
def noun_phrase(spec: dict) -> str:
    return "the " + " ".join(w for w in (spec.get("color"), spec["label"]) if w)


def render(program: dict) -> str:
    """The sentence of a program (words per op: module doc)."""
    op, label = program["op"], program["label"]
    if op == "attr":
        words = [program.get("size"), program.get("color")]
        noun = plural(label) if program.get("all") else label
        return ("all the " if program.get("all") else "the ") + " ".join([w for w in words if w] + [noun])
    if op == "closest":
        return f"the {label} closest to {noun_phrase(program['anchor'])}"
    if op == "farthest":
        return f"the {label} farthest from {noun_phrase(program['anchor'])}"
    if op in VIEW_OPS:
        v = program["view"]
        rel = {"left": "to the left of", "right": "to the right of", "front": "in front of",
               "behind": "behind"}[op]
        return (f"looking from the {OPPOSITE[v]} side of the room towards the {v}, "
                f"the {label} {rel} {noun_phrase(program['anchor'])}")
    if op == "between":
        a, b = program["anchors"]
        return f"the {label} between {noun_phrase(a)} and {noun_phrase(b)}"
    if op == "on":
        return f"the {label} on top of {noun_phrase(program['anchor'])}"
    if op == "near":
        return f"all the {plural(label)} next to {noun_phrase(program['anchor'])}"
    raise ValueError(f"unknown program op {op!r}")


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


# ======================================================================================================
# generation
# ======================================================================================================
def anchor_spec(objs: list[Obj], o: Obj) -> Optional[dict]:
    """The shortest description (label, else colour + label) that denotes exactly ``o``."""
    for spec in ({"label": o.label, "color": None}, {"label": o.label, "color": o.color}):
        if resolve_anchor(objs, spec) is o:
            return spec
    return None


def candidate_programs(objs: list[Obj], vocabulary: list[str], colors: list[str]) -> list[dict]:
    """Every program considered for a scene (before checking the number of targets)."""
    things = [o for o in objs if not o.structural]
    labels = sorted({o.label for o in things})
    anchors = [(o, s) for o in things if (s := anchor_spec(objs, o)) is not None]
    progs: list[dict] = []
    for label in labels:
        present = sorted({o.color for o in select(objs, label)})
        for color in [None] + present:
            for size in (None, "large", "small"):
                progs.append({"op": "attr", "label": label, "color": color, "size": size, "all": False})
            if color is not None:
                progs.append({"op": "attr", "label": label, "color": color, "size": None, "all": True})
        for color in colors:
            if color not in present:  # zero target with distractors of the class
                progs.append({"op": "attr", "label": label, "color": color, "size": None, "all": False})
        for a, spec in anchors:
            for op in ("closest", "farthest", "on", "near"):
                p = {"op": op, "label": label, "anchor": spec}
                if op == "near":
                    p["all"] = True
                progs.append(p)
            for op in VIEW_OPS:
                for view in VIEWS:
                    progs.append({"op": op, "label": label, "anchor": spec, "view": view})
        for i, (a, sa) in enumerate(anchors):
            for b, sb in anchors[i + 1:]:
                progs.append({"op": "between", "label": label, "anchors": [sa, sb]})
    for label in vocabulary:  # zero target without distractors: a class absent from the scene
        if label not in labels:
            progs.append({"op": "attr", "label": label, "color": None, "size": None, "all": False})
    return progs


class Expression(NamedTuple):
    program: dict
    targets: list       # object ids
    text: str
    kind: str           # "single" | "multi" | "zero"


def scene_expressions(objs: list[Obj], vocabulary: list[str], colors: list[str],
                      rng: np.random.Generator) -> list[Expression]:
    """True, unambiguous expressions of one scene, at most MAX_PER_OP per (op, kind[, w/wo distractors]), sampled with ``rng``."""
    pools: dict[tuple, list[Expression]] = {}
    for p in candidate_programs(objs, vocabulary, colors):
        targets = evaluate(p, objs)
        multi = p.get("all", False)
        if multi:
            kind = "multi" if len(targets) >= 2 else ("zero" if not targets else None)
        else:
            kind = "single" if len(targets) == 1 else ("zero" if not targets and p["op"] == "attr" else None)
        if kind is None or (kind == "single" and not is_clear(p, objs)):
            continue
        if kind == "zero" and p.get("size"):
            continue
        # zero-target expressions with and without distractors of the class are sampled separately
        sub = ("w_d" if select(objs, p["label"]) else "wo_d") if kind == "zero" else ""
        pools.setdefault((p["op"], kind, sub), []).append(Expression(p, targets, render(p), kind))
    out = []
    for key in sorted(pools):
        pool = sorted(pools[key], key=lambda e: json.dumps(e.program, sort_keys=True))
        pick = rng.permutation(len(pool))[:MAX_PER_OP]
        out.extend(pool[i] for i in sorted(pick))
    return out


def _distractor_class_present(objs: list[Obj], label: str, targets: list) -> bool:
    return any(o.id not in targets for o in select(objs, label))


def write_referring_files(out_dir, layout: dict, seed: int) -> dict[str, Path]:
    """Write the ScanRefer / Multi3DRefer / Sr3D files for ``layout["scenes"]`` under ``out_dir/referring``
    (atomically) and return {name: path}. See the module doc for formats and relations."""
    out_dir = Path(out_dir) / "referring"
    scenes = layout.get("scenes")
    if not isinstance(scenes, dict) or not scenes:
        raise ValueError("layout must have a non-empty 'scenes' mapping")
    all_objs = {sid: scene_objects(scenes[sid]) for sid in sorted(scenes)}
    vocabulary = sorted({o.label for objs in all_objs.values() for o in objs if not o.structural})
    colors = sorted({o.color for objs in all_objs.values() for o in objs if not o.structural})
    seeds = np.random.SeedSequence(seed).spawn(len(all_objs))
    scanrefer = {"train": [], "val": []}
    multi = {"train": [], "val": []}
    sr3d_rows = []
    for (sid, objs), ss in zip(all_objs.items(), seeds):
        split = scenes[sid].get("split")
        if split not in ("train", "val"):
            raise ValueError(f"layout scene {sid}: split must be 'train' or 'val', got {split!r}")
        rng = np.random.default_rng(ss)
        ann_per_object: dict[int, int] = {}
        for m_id, e in enumerate(scene_expressions(objs, vocabulary, colors, rng)):
            label = e.program["label"]
            tokens = tokenize(e.text)
            anchor_objs = [resolve_anchor(objs, a) for a in program_anchors(e.program)]
            anchor_ids = [a.id for a in anchor_objs]
            if e.kind == "zero":
                eval_type = "zt_w_d" if select(objs, label) else "zt_wo_d"
            elif e.kind == "multi":
                eval_type = "mt"
            else:
                eval_type = "st_w_d" if _distractor_class_present(objs, label, e.targets) else "st_wo_d"
            multi[split].append({"scene_id": sid, "object_name": label.replace(" ", "_"), "ann_id": str(m_id),
                                 "description": e.text, "object_ids": e.targets, "eval_type": eval_type,
                                 "anchor_ids": anchor_ids, "program": e.program})
            if e.kind != "single":
                continue
            t = e.targets[0]
            ann = ann_per_object.get(t, 0)
            ann_per_object[t] = ann + 1
            scanrefer[split].append({"scene_id": sid, "object_id": str(t), "object_name": label.replace(" ", "_"),
                                     "ann_id": str(ann), "description": e.text, "token": tokens,
                                     "anchor_ids": anchor_ids, "program": e.program})
            if e.program["op"] in SR3D_TYPES:
                distractors = sorted(o.id for o in select(objs, label) if o.id != t)
                coarse, ref = SR3D_TYPES[e.program["op"]]
                stimulus = "-".join([sid, label.replace(" ", "_"), str(1 + len(distractors)), str(t)]
                                    + [str(d) for d in distractors])
                sr3d_rows.append({
                    "scan_id": sid, "target_id": t, "distractor_ids": str(distractors), "utterance": e.text,
                    "stimulus_id": stimulus, "coarse_reference_type": coarse, "reference_type": ref,
                    "instance_type": label, "anchors_types": str([a.label for a in anchor_objs]),
                    "anchor_ids": str(anchor_ids), "tokens": str(tokens), "dataset": "sr3d",
                    "mentions_target_class": True, "correct_guess": True, "is_train": split == "train",
                    "program": json.dumps(e.program, sort_keys=True)})
    paths: dict[str, Path] = {}
    for split in ("train", "val"):
        paths[f"scanrefer_{split}"] = out_dir / f"synth_scanrefer_{split}.json"
        write_json_atomic(paths[f"scanrefer_{split}"], scanrefer[split])
        paths[f"multi3drefer_{split}"] = out_dir / f"synth_multi3drefer_{split}.json"
        write_json_atomic(paths[f"multi3drefer_{split}"], multi[split])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SR3D_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sr3d_rows)
    paths["sr3d"] = out_dir / "synth_sr3d.csv"
    write_text_atomic(paths["sr3d"], buf.getvalue())
    return paths
