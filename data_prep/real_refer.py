"""Referring expressions generated on annotated REAL scans: the programs of :mod:`data_prep.synth_refer`
evaluated on a processed scene's own boxes, labels and point colours.

``generate_rows(processed_dir, scenes=None, seed=0)`` -> rows in the common referring format
(:mod:`data_prep.refer`, ``dataset="generated"``, ``program`` kept); ``scene3d prep refer --dataset generated
--processed DIR --out FILE.jsonl`` writes them. Every scene the loader reads works: a scene3d processed
directory (boxes from ``objects.json``), a Pointcept directory or an mmdetection3d / votenet export (boxes from
the loader: min / max of each instance's points, see :mod:`scene3d.data.exports`).

What a real scene contributes, and how
    ===================  =====================================================================================
    part                 rule
    ===================  =====================================================================================
    objects              the loader's objects with a box and at least :data:`MIN_POINTS` points
    label                the object's label (objects.json ``label`` = raw ScanNet category, from the label map
                         at prep time; an export's nyu40 class name from the label list); lower case,
                         ``_`` -> space, ScanNet's misspelling "refridgerator" -> "refrigerator"
    structural           nyu40 wall / floor / ceiling (``STRUCTURE_NYU40_IDS``) or those labels: never
                         targets, anchors or distractors
    unnameable           generic labels (:data:`GENERIC_LABELS`: otherprop, otherfurniture, object, ...): a
                         sentence cannot name them, so they are treated like structure (never targets, anchors
                         or distractors); they stay in the scene the model sees
    colour               :func:`color_names` per point, the object's colour is the name of a strict majority
                         (>= :data:`COLOR_MAJORITY`) of its points, else none (never described by colour)
    on (support)         derived from geometry (:func:`support_of`), real scans record no support
    ===================  =====================================================================================

Support ("on top of") on a real scan
    t rests on a when t's box bottom is within ``[a.top - ON_SINK, a.top + ON_GAP]`` (a few cm above a's top,
    or sunk into it: a pillow into a mattress, a lamp foot into the top of a nightstand's box), t's centre is
    above a's top, t's centre xy lies in a's xy footprint and at least ``ON_OVERLAP`` of t's footprint area
    lies over a's (a curtain hanging behind a desk has its bottom at the desk's top, but mostly beside it). Among several such a, t rests on the one with
    the highest top (the nearest surface below). That object id becomes ``Obj.on_top_of``, so
    :func:`data_prep.synth_refer.on_top_of` then checks the rest of the relation as on synthetic scenes.

Truth checks: the same as on synthetic scenes (a program is kept only with the intended number of targets and,
for superlatives, the margin of :func:`data_prep.synth_refer.is_clear`); ``tests/test_real_refer.py`` re-checks
every row of both real scans with a second, vectorised implementation of the relations.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from data_prep import synth_refer as S
from data_prep.refer import ROW_KEYS
from scene3d.constants import META_FILE, SCENE_ARRAYS
from scene3d.data.exports import find_mmdet_export
from scene3d.data.labels import CLASS_LABELS_20, LABEL_FIXES, STRUCTURE_NYU40_IDS, clean_label
from scene3d.data.npy import SceneFormatError
from scene3d.data.scene import Scene, load_processed_scene

log = logging.getLogger(__name__)

DATASET = "generated"
MIN_POINTS = 20            # objects with fewer points are fragments: left out of the expressions
COLOR_MAJORITY = 0.5       # fraction of an object's points that must share its colour name
ON_GAP = 0.05              # metres: t's bottom at most this far above a's top
ON_SINK = 0.15             # metres: ... or at most this far below it (soft or uneven tops, box corners)
ON_OVERLAP = 0.5           # fraction of t's xy footprint that must lie over a's

STRUCTURAL_LABELS = frozenset({"wall", "floor", "ceiling"})
GENERIC_LABELS = frozenset({"otherprop", "otherfurniture", "otherstructure", "object", "objects", "unknown",
                            "unannotated", "stuff", ""})

#: colour names :func:`color_names` can give (also the vocabulary of zero-target "the <colour> <label>" rows)
COLORS = ("black", "blue", "brown", "gray", "green", "orange", "pink", "purple", "red", "white", "yellow")
#: classes asked about in zero-target rows when absent from a scene (ScanNet-20 objects, fixed so that a
#: scene's rows do not depend on which other scenes are generated in the same run)
ABSENT_CLASSES = tuple(sorted({LABEL_FIXES.get(c, c) for c in CLASS_LABELS_20} - STRUCTURAL_LABELS
                              - GENERIC_LABELS))


class RealSceneError(ValueError):
    """A real scene cannot give referring expressions; the message names the scene."""


# ======================================================================================================
# colour names
# ======================================================================================================
def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """[N, 3] rgb in 0..255 -> [N, 3] (hue degrees 0..360, saturation 0..1, value 0..1).

    Written here (a few vectorised lines) rather than ``colorsys`` per point (80k Python calls per scan) or a
    matplotlib dependency for one function.
    """
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    mx, mn = c.max(axis=1), c.min(axis=1)
    d = mx - mn
    r, g, b = c[:, 0], c[:, 1], c[:, 2]
    safe = np.where(d > 0, d, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(d > 0, h * 60.0, 0.0)
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    return np.stack([h, s, mx], axis=1)


def color_names(rgb: np.ndarray) -> np.ndarray:
    """Colour name index into :data:`COLORS` for each rgb row (0..255).

    Why HSV: a scan's colours are the same surface under uneven light, and lighting moves mostly the value
    (brightness) while the hue stays; thresholds on hue alone name "red" for a red chair in the shade and in
    the sun. Rule, in order: value < 0.2 -> black; saturation < 0.2 -> white (value > 0.75) or gray; hue (deg)
    < 15 or >= 340 red, < 45 orange, < 70 yellow, < 165 green, < 255 blue, < 290 purple, else pink; then
    brown for the orange hues unless vivid (saturation >= 0.65 and value >= 0.75) and for red / yellow hues
    darker than value 0.5. Wood, the most common furniture colour in ScanNet, scans as hue ~32, saturation
    ~0.5, value 0.6-0.8 (the cabinets and doors of scene0000): people call it brown, not orange.
    """
    hsv = rgb_to_hsv(rgb)
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    idx = {n: i for i, n in enumerate(COLORS)}
    hue_bins = np.array([15, 45, 70, 165, 255, 290, 340])
    hue_names = np.array([idx[n] for n in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "red")])
    out = hue_names[np.searchsorted(hue_bins, h, side="right")]
    orange = out == idx["orange"]
    out = np.where(orange & ((s < 0.65) | (v < 0.75)), idx["brown"], out)
    out = np.where(((out == idx["red"]) | (out == idx["yellow"])) & (v < 0.5), idx["brown"], out)
    out = np.where(s < 0.2, np.where(v > 0.75, idx["white"], idx["gray"]), out)
    out = np.where(v < 0.2, idx["black"], out)
    return out.astype(np.int64)


def object_colors(color: np.ndarray, instance: np.ndarray, ids: Sequence[int]) -> dict[int, Optional[str]]:
    """{object id: colour name of a majority (>= COLOR_MAJORITY) of its points, or None}: one count over
    (instance, name) pairs for all objects."""
    sel = instance >= 0
    names = color_names(color[sel])
    inst = instance[sel].astype(np.int64)
    k = len(COLORS)
    counts = np.bincount(inst * k + names, minlength=(int(inst.max()) + 1 if inst.size else 0) * k)
    counts = counts.reshape(-1, k)
    out: dict[int, Optional[str]] = {}
    for oid in ids:
        row = counts[oid] if 0 <= oid < counts.shape[0] else np.zeros(k, np.int64)
        total = int(row.sum())
        best = int(row.argmax())
        out[int(oid)] = COLORS[best] if total and row[best] >= COLOR_MAJORITY * total else None
    return out


# ======================================================================================================
# scene -> objects of synth_refer
# ======================================================================================================
def support_of(objs: Sequence[S.Obj]) -> dict[int, Optional[int]]:
    """{t id: id of the object t rests on, or None} by the geometric rule of the module doc (structural
    objects are neither supported nor supporters)."""
    out: dict[int, Optional[int]] = {}
    for t in objs:
        best = None
        if not t.structural:
            c = t.center
            for a in objs:
                if a is t or a.structural:
                    continue
                top = a.hi[2]
                if not (top - ON_SINK <= t.lo[2] <= top + ON_GAP and c[2] > top
                        and a.lo[0] <= c[0] <= a.hi[0] and a.lo[1] <= c[1] <= a.hi[1]):
                    continue
                inter = np.prod(np.clip(np.minimum(t.hi[:2], a.hi[:2]) - np.maximum(t.lo[:2], a.lo[:2]), 0, None))
                if inter >= ON_OVERLAP * np.prod(t.hi[:2] - t.lo[:2]) and (best is None or top > best.hi[2]):
                    best = a
        out[t.id] = None if best is None else best.id
    return out


class RealScene(NamedTuple):
    scene_id: str
    objects: list          # list[synth_refer.Obj], every object with a box (structural / unnameable flagged)
    skipped: int           # objects left out: no box or fewer than MIN_POINTS points


def _check_files(path: Path, scene_id: str) -> None:
    """The instance file must exist (a clear error naming the scene rather than the loader's)."""
    if path.is_dir():
        if (path / META_FILE).exists():
            return
        if (path / SCENE_ARRAYS["coord"]).exists() and not (path / SCENE_ARRAYS["instance"]).exists():
            raise RealSceneError(f"scene {scene_id}: no instance file {path / SCENE_ARRAYS['instance']} "
                                 "(expressions need annotated objects)")
        return
    f = find_mmdet_export(path)
    if f is not None and not f.ins.exists():
        raise RealSceneError(f"scene {scene_id}: mmdet3d export has no instance file {f.ins} "
                             "(expressions need annotated objects)")


def real_scene_objects(scene: Scene) -> RealScene:
    """The objects of a loaded scene as :class:`data_prep.synth_refer.Obj` (label, colour, box, support)."""
    sid = scene.scene_id
    with_box = [o for o in scene.objects if o.center is not None and o.size is not None]
    if scene.objects and not with_box:
        raise RealSceneError(f"scene {sid}: no object has a box (objects.json center/size missing)")
    kept = [o for o in with_box if o.num_points >= MIN_POINTS]
    colours = object_colors(scene.color, scene.instance, [o.id for o in kept])
    objs = []
    for o in kept:
        c, s = np.asarray(o.center, np.float64), np.asarray(o.size, np.float64)
        if (s < 0).any():
            raise RealSceneError(f"scene {sid}: object {o.id} has a negative box size {list(s)}")
        label = clean_label(o.label)
        structural = o.nyu40_id in STRUCTURE_NYU40_IDS or label in STRUCTURAL_LABELS or label in GENERIC_LABELS
        objs.append(S.Obj(int(o.id), label, colours[int(o.id)] or "", c - s / 2, c + s / 2, None, structural))
    support = support_of(objs)
    objs = [o._replace(on_top_of=support[o.id]) for o in objs]
    nameable = [o for o in objs if not o.structural]
    if len(nameable) < 2:
        raise RealSceneError(f"scene {sid}: {len(nameable)} nameable non-structural object(s) with a box, "
                             "need at least 2 for referring expressions")
    return RealScene(sid, objs, len(scene.objects) - len(kept))


def load_real_scene(processed_dir, scene_id: str) -> RealScene:
    path = Path(processed_dir) / scene_id
    _check_files(path, scene_id)
    try:
        scene = load_processed_scene(path)
    except SceneFormatError as e:
        raise RealSceneError(f"scene {scene_id}: {e}") from None
    return real_scene_objects(scene)


def list_scenes(processed_dir) -> list[str]:
    """Scene ids under ``processed_dir``: scene directories (``meta.json`` or ``coord.npy``) and mmdetection3d
    exports (``<id>_vert[_all].npy``), sorted."""
    root = Path(processed_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"processed directory not found: {root}")
    ids = {p.name for p in root.iterdir()
           if p.is_dir() and ((p / META_FILE).exists() or (p / SCENE_ARRAYS["coord"]).exists())}
    ids |= {f.scene_id for p in root.glob("*_vert*.npy") if (f := find_mmdet_export(p)) is not None}
    return sorted(ids)


# ======================================================================================================
# expressions
# ======================================================================================================
def _mentions_no_color(program: dict) -> bool:
    """True when the program names the empty colour of an object without a clear colour."""
    specs = [program] + ([program["anchor"]] if "anchor" in program else []) + list(program.get("anchors", []))
    return any(sp.get("color") == "" for sp in specs)


def scene_expressions(objs: list, rng: np.random.Generator, max_per_op: int = S.MAX_PER_OP,
                      zero_share: Optional[float] = None) -> list:
    """True, unambiguous expressions of one real scene: :func:`data_prep.synth_refer.candidate_programs` less
    those naming a missing colour, kept by the rules of :func:`data_prep.synth_refer.scene_expressions` (the
    intended number of targets, clear superlatives) and sampled ``max_per_op`` per (op, kind[, w/wo
    distractors]). Written apart from the synthetic one for the colour filter and ``max_per_op``.

    ``zero_share``: at most this share of each op's expressions have no target (None: no cap). Absent
    objects are unlimited while a room has few objects of a class, so without a cap "attr" and "near" are
    mostly zero-target (scene0000_01 at ``max_per_op`` 100: 106 of 145 "attr", 100 of 109 "near"), and a
    model trained on them learns to answer "none" to the op rather than to the scene. The cap keeps a
    random subset of the zero-target ones, drawn after all other sampling, so the rest are unchanged; a
    dropped one is None in the list, so that the rows keep their ids."""
    if zero_share is not None and not 0.0 <= zero_share < 1.0:
        raise ValueError(f"zero_share must be in [0, 1), got {zero_share}")
    pools: dict[tuple, list] = {}
    for p in S.candidate_programs(objs, list(ABSENT_CLASSES), list(COLORS)):
        if _mentions_no_color(p):
            continue
        targets = S.evaluate(p, objs)
        if p.get("all", False):
            kind = "multi" if len(targets) >= 2 else ("zero" if not targets else None)
        else:
            kind = "single" if len(targets) == 1 else ("zero" if not targets and p["op"] == "attr" else None)
        if kind is None or (kind == "single" and not S.is_clear(p, objs)) or (kind == "zero" and p.get("size")):
            continue
        sub = ("w_d" if S.select(objs, p["label"]) else "wo_d") if kind == "zero" else ""
        pools.setdefault((p["op"], kind, sub), []).append(S.Expression(p, targets, S.render(p), kind))
    out = []
    for key in sorted(pools):
        pool = sorted(pools[key], key=lambda e: json.dumps(e.program, sort_keys=True))
        out.extend(pool[i] for i in sorted(rng.permutation(len(pool))[:max_per_op]))
    if zero_share is None:
        return out
    zero: dict[str, list[int]] = {}  # op -> indices of its zero-target expressions in ``out``
    positive: dict[str, int] = {}  # op -> number of its expressions with targets
    for i, e in enumerate(out):
        op = e.program["op"]
        zero.setdefault(op, [])
        if e.kind == "zero":
            zero[op].append(i)
        else:
            positive[op] = positive.get(op, 0) + 1
    drop = set()
    for op in sorted(zero):
        keep = int(np.floor(zero_share / (1.0 - zero_share) * positive.get(op, 0) + 1e-9))
        if len(zero[op]) > keep:
            drop.update(zero[op][i] for i in rng.permutation(len(zero[op]))[keep:])
    # None marks a dropped one, so the kept ones keep the row ids (ann_id) they have without the cap
    return [None if i in drop else e for i, e in enumerate(out)]


def scene_rows(real: RealScene, seed: int = 0, max_per_op: int = S.MAX_PER_OP,
               zero_share: Optional[float] = None) -> list[dict]:
    """Common-format rows of one scene; a function of (scene, seed) only (the generator is seeded by the
    scene id, so a scene gives the same rows alone or among others)."""
    objs = real.objects
    rng = np.random.default_rng([seed, zlib.crc32(real.scene_id.encode())])
    rows = []
    for i, e in enumerate(scene_expressions(objs, rng, max_per_op, zero_share)):
        if e is None:  # zero-target, dropped by zero_share
            continue
        p, label = e.program, e.program["label"]
        same = sorted(o.id for o in S.select(objs, label))
        distractors = [o for o in same if o not in e.targets]
        if e.kind == "zero":
            eval_type = "zt_w_d" if same else "zt_wo_d"
        elif e.kind == "multi":
            eval_type = "mt"
        else:
            eval_type = "st_w_d" if distractors else "st_wo_d"
        anchors = [S.resolve_anchor(objs, a).id for a in S.program_anchors(p)] or None
        unique = (not distractors) if e.kind == "single" else None
        row = {k: None for k in ROW_KEYS}
        row.update(dataset=DATASET, ann_id=f"gen{i:04d}", scene_id=real.scene_id, targets=list(e.targets),
                   text=e.text, object_name=label, unique=unique, multiple=None if unique is None else not unique,
                   eval_type=eval_type, view_dep="view" in p, distractors=distractors, anchors=anchors, program=p)
        rows.append(row)
    return rows


class GenerateReport(NamedTuple):
    rows: list
    per_scene: dict        # scene id -> number of rows
    skipped_objects: dict  # scene id -> objects left out (no box / too few points)
    seconds: float


def generate_rows(processed_dir, scenes: Optional[Iterable[str]] = None, seed: int = 0,
                  max_per_op: int = S.MAX_PER_OP, progress: bool = True,
                  zero_share: Optional[float] = None) -> GenerateReport:
    """Rows for ``scenes`` (default: every scene of ``processed_dir``, :func:`list_scenes`). Raises
    :class:`RealSceneError` naming the scene on bad input, ``FileNotFoundError`` for a missing scene.
    ``zero_share``: see :func:`scene_expressions`."""
    t0 = time.perf_counter()
    available = list_scenes(processed_dir)
    wanted = available if scenes is None else sorted(set(scenes))
    missing = [s for s in wanted if s not in available]
    if missing:
        raise FileNotFoundError(f"scenes {missing[:5]} not found in {processed_dir} (has {len(available)} scenes)")
    if not wanted:
        raise FileNotFoundError(f"no processed scenes or mmdet3d exports in {processed_dir}")
    rows, per_scene, skipped = [], {}, {}
    for sid in tqdm(wanted, desc="generate expressions", unit="scene", disable=not progress):
        real = load_real_scene(processed_dir, sid)
        got = scene_rows(real, seed, max_per_op, zero_share)
        if not got:
            raise RealSceneError(f"scene {sid}: no expression passed the truth checks")
        rows += got
        per_scene[sid] = len(got)
        skipped[sid] = real.skipped
    return GenerateReport(rows, per_scene, skipped, time.perf_counter() - t0)


__all__ = ["COLORS", "DATASET", "GenerateReport", "RealScene", "RealSceneError", "color_names", "generate_rows",
           "list_scenes", "load_real_scene", "object_colors", "real_scene_objects", "rgb_to_hsv", "scene_rows",
           "support_of"]
