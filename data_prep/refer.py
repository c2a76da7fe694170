"""Referring datasets (ScanRefer, Multi3DRefer, Nr3D, Sr3D) read into one row format.

Every reader returns a list of plain dicts, one per referring sample, with the same keys
(``None`` where the source does not define a field):

================  ================  ==========================================================================
key               type              meaning
================  ================  ==========================================================================
``dataset``       str               ``scanrefer`` | ``multi3drefer`` | ``nr3d`` | ``sr3d`` (or a synthetic
                                    variant such as ``synth_scanrefer``, see ``dataset=`` of the readers)
``ann_id``        str               source id. ScanRefer: ``"<object_id>_<ann_id>"`` (ScanRefer's ann_id
                                    counts per object, so alone it is not unique in a scene). Multi3DRefer:
                                    its ``ann_id``. Nr3D / Sr3D: ``"<stimulus_id>#<row>"`` with ``row``
                                    the 0-based data row of the csv (a stimulus has several utterances).
``scene_id``      str               ``sceneXXXX_XX``
``targets``       list[int]         ScanNet objectIds referred to; empty for Multi3DRefer zero-target rows
``text``          str               the description / utterance
``object_name``   str               target class as the source names it (raw ScanNet category, spaces)
``unique``        bool | None       ScanRefer: target's 18-class label occurs once in the scene (see below)
``multiple``      bool | None       ``not unique`` where ``unique`` is defined
``eval_type``     str | None        Multi3DRefer: ``zt_w_d``, ``zt_wo_d``, ``st_w_d``, ``st_wo_d``, ``mt``
``easy``          bool | None       Nr3D / Sr3D: at most one same-class distractor (referit3d's rule)
``view_dep``      bool | None       Nr3D / Sr3D: the tokens contain a view-dependent word (referit3d's list)
``distractors``   list[int] | None  Nr3D: from ``stimulus_id``; Sr3D: ``distractor_ids``
``anchors``       list[int] | None  Sr3D: ``anchor_ids``; ScanRefer / Multi3DRefer files that carry an
                                    ``anchor_ids`` list (the synthetic ones do; the released ones do not)
``program``       dict | None       synthetic datasets only: the machine-readable expression
================  ================  ==========================================================================

ScanRefer unique / multiple
    ScanRefer's own code (``lib/dataset.py``, ``_get_unique_multiple_lookup``) maps each raw category to the
    18 detection classes (cabinet, bed, chair, sofa, table, door, window, bookshelf, picture, counter, desk,
    curtain, refrigerator, shower curtain, toilet, sink, bathtub by nyu40 class, everything else "others")
    and counts, per scene, the objects that are DESCRIBED IN THE SCANREFER SPLIT FILE, not all objects of
    the scan. We do the same by default (``population=None``: the population is the ScanRefer file being
    read, which is exact for the released ScanRefer_filtered_{train,val}.json). Checked against 3D-STMN's
    published ``lookup.json``: this rule agrees on 929/929 annotations of the 17 scenes where our real
    subsets give every described object a label, while counting all objects of the scan (a processed scene's
    ``objects.json``) contradicts the published flags 33 times (e.g. a door is "unique" in lookup.json while
    the scan has a second door nobody described). ``population`` may still be given explicitly, e.g. from
    processed scenes (:func:`processed_population`), for subsets of ScanRefer; that is an approximation.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Optional

from tqdm.auto import tqdm

from scene3d.constants import OBJECTS_FILE
from scene3d.data.scene import load_processed_scene
from scene3d.utils.io import write_jsonl_atomic

log = logging.getLogger(__name__)

DATASETS = ("scanrefer", "multi3drefer", "nr3d", "sr3d")
EVAL_TYPES = ("zt_w_d", "zt_wo_d", "st_w_d", "st_wo_d", "mt")

#: nyu40 ids of ScanRefer's / votenet's 18 detection classes (the 18th is "others").
SCANREFER_NYU40 = {
    3: "cabinet", 4: "bed", 5: "chair", 6: "sofa", 7: "table", 8: "door", 9: "window", 10: "bookshelf",
    11: "picture", 12: "counter", 14: "desk", 16: "curtain", 24: "refrigerator", 28: "shower curtain",
    33: "toilet", 34: "sink", 36: "bathtub",
}
SCANREFER_OTHERS = "others"

#: referit3d's view-dependent words (``is_explicitly_view_dependent`` in referit3d/analysis).
VIEW_DEPENDENT_WORDS = frozenset(
    {"front", "behind", "back", "right", "left", "facing", "leftmost", "rightmost", "looking", "across"})

ROW_KEYS = ("dataset", "ann_id", "scene_id", "targets", "text", "object_name", "unique", "multiple",
            "eval_type", "easy", "view_dep", "distractors", "anchors", "program")

_SCENE_RE = re.compile(r"^scene\d{4}_\d{2}$")


class ReferFormatError(ValueError):
    """A referring-dataset file is malformed (the message names the file and the row)."""


def _anchor_ids(entry: Mapping, where: str) -> Optional[list[int]]:
    """An entry's optional ``anchor_ids`` (a list of object ids) -> sorted ids; None where it has none (an
    empty list too: the row names no anchor)."""
    ids = entry.get("anchor_ids")
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise ReferFormatError(f"{where}: anchor_ids must be a list, got {ids!r}")
    return sorted({_int(a, where, "anchor_ids[]") for a in ids}) or None


def _row(**kw) -> dict:
    row = {k: None for k in ROW_KEYS}
    unknown = set(kw) - set(ROW_KEYS)
    if unknown:
        raise AssertionError(f"unknown row keys {sorted(unknown)}")
    row.update(kw)
    return row


def _check_scene(scene_id, where: str) -> str:
    if not isinstance(scene_id, str) or not _SCENE_RE.match(scene_id):
        raise ReferFormatError(f"{where}: bad scene id {scene_id!r} (expected sceneXXXX_XX)")
    return scene_id


def _int(value, where: str, what: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ReferFormatError(f"{where}: {what} must be an integer, got {value!r}") from None
    if out < 0 or str(out) != str(value).strip():
        raise ReferFormatError(f"{where}: {what} must be a non-negative integer, got {value!r}")
    return out


def _read_json(path: Path, what: str):
    """Parsed JSON of ``path``; a missing file or bad JSON raises an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ReferFormatError(f"{path}: not valid JSON ({e})") from None


def load_json_list(path: Path) -> list:
    path = Path(path)
    data = _read_json(path, "annotation file")
    if not isinstance(data, list):
        raise ReferFormatError(f"{path}: expected a JSON list of annotations, got {type(data).__name__}")
    return data


def _require(entry, keys, where: str) -> None:
    if not isinstance(entry, dict):
        raise ReferFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ReferFormatError(f"{where}: missing keys {missing}")


# ------------------------------------------------------------------------------------------------------
# Label map and ScanRefer's unique / multiple
# ------------------------------------------------------------------------------------------------------
def load_label_map(tsv: str | Path) -> dict[str, int]:
    """``scannetv2-labels.combined.tsv`` -> {raw_category: nyu40id} (universal newlines: the Pointcept copy
    mixes CRLF and CR)."""
    tsv = Path(tsv)
    if not tsv.is_file():
        raise FileNotFoundError(f"label map not found: {tsv}")
    with open(tsv, newline=None, encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or "raw_category" not in reader.fieldnames or "nyu40id" not in reader.fieldnames:
            raise ReferFormatError(f"{tsv}: expected columns raw_category and nyu40id, got {reader.fieldnames}")
        out = {}
        for i, r in enumerate(reader):
            out[r["raw_category"]] = _int(r["nyu40id"], f"{tsv} row {i + 2}", "nyu40id")
    if not out:
        raise ReferFormatError(f"{tsv}: no rows")
    return out


def scanrefer_class(raw_label: str, raw2nyu: Mapping[str, int]) -> str:
    """The ScanRefer 18-class name of a raw category (``object_name`` underscores count as spaces);
    unknown categories are "others", as in ScanRefer."""
    nyu = raw2nyu.get(raw_label.replace("_", " "))
    return SCANREFER_NYU40.get(nyu, SCANREFER_OTHERS)


def unique_objects(population: Mapping[str, Mapping[int, str]], raw2nyu: Mapping[str, int]) -> dict:
    """{scene_id: {object_id: True if its 18-class label occurs once among the scene's population}}.

    ``population`` is {scene_id: {object_id: raw label}}.
    """
    out = {}
    for scene_id, objects in population.items():
        classes = {oid: scanrefer_class(label, raw2nyu) for oid, label in objects.items()}
        counts: dict[str, int] = {}
        for c in classes.values():
            counts[c] = counts.get(c, 0) + 1
        out[scene_id] = {oid: counts[c] == 1 for oid, c in classes.items()}
    return out


def processed_population(processed_dir: str | Path, scene_ids: Iterable[str],
                         skip_structural: bool = True) -> dict[str, dict[int, str]]:
    """{scene_id: {object_id: raw label}} from processed scenes' ``objects.json`` (all objects of the scan,
    optionally without wall / floor / ceiling). An approximation of ScanRefer's population; see module doc."""
    out = {}
    for sid in sorted(set(scene_ids)):
        objs = load_processed_objects(processed_dir, sid)
        out[sid] = {oid: o["label"] for oid, o in objs.items()
                    if not (skip_structural and o["label"] in ("wall", "floor", "ceiling"))}
    return out


# ------------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------------
def read_scanrefer(path: str | Path, raw2nyu: Mapping[str, int],
                   population: Optional[Mapping[str, Mapping[int, str]]] = None,
                   dataset: str = "scanrefer", progress: bool = False) -> list[dict]:
    """ScanRefer json (``scene_id, object_id, object_name, ann_id, description, token``) -> rows.

    ``population``: {scene_id: {object_id: raw label}} over which uniqueness is counted; default: the objects
    described in this file (ScanRefer's rule). A target missing from a given population is an error.
    """
    path = Path(path)
    data = load_json_list(path)
    parsed = []
    for i, e in enumerate(tqdm(data, desc=f"read {path.name}", disable=not progress, unit="ann")):
        where = f"{path} entry {i}"
        _require(e, ("scene_id", "object_id", "object_name", "ann_id", "description"), where)
        parsed.append((_check_scene(e["scene_id"], where), _int(e["object_id"], where, "object_id"),
                       str(e["object_name"]).replace("_", " "), _int(e["ann_id"], where, "ann_id"),
                       str(e["description"]).strip(), e.get("program"), _anchor_ids(e, where), where))
    if population is None:
        pop: dict[str, dict[int, str]] = {}
        for sid, oid, name, *_ in parsed:
            pop.setdefault(sid, {})[oid] = name
        population = pop
    uniq = unique_objects(population, raw2nyu)
    rows, seen = [], set()
    for sid, oid, name, ann, text, program, anchors, where in parsed:
        if oid not in uniq.get(sid, {}):
            raise ValueError(f"{where}: object {oid} of {sid} is not in the uniqueness population")
        key = (sid, oid, ann)
        if key in seen:
            raise ReferFormatError(f"{where}: duplicate (scene_id, object_id, ann_id) {key}")
        seen.add(key)
        u = uniq[sid][oid]
        rows.append(_row(dataset=dataset, ann_id=f"{oid}_{ann}", scene_id=sid, targets=[oid], text=text,
                         object_name=name, unique=u, multiple=not u, anchors=anchors, program=program))
    return rows


def read_multi3drefer(path: str | Path, dataset: str = "multi3drefer", progress: bool = False) -> list[dict]:
    """Multi3DRefer json (``scene_id, object_name, ann_id, description, object_ids, eval_type``) -> rows."""
    path = Path(path)
    rows, seen = [], set()
    for i, e in enumerate(tqdm(load_json_list(path), desc=f"read {path.name}", disable=not progress,
                               unit="ann")):
        where = f"{path} entry {i}"
        _require(e, ("scene_id", "ann_id", "description", "object_ids", "eval_type"), where)
        sid = _check_scene(e["scene_id"], where)
        if not isinstance(e["object_ids"], list):
            raise ReferFormatError(f"{where}: object_ids must be a list, got {e['object_ids']!r}")
        targets = sorted({_int(o, where, "object_ids[]") for o in e["object_ids"]})
        et = e["eval_type"]
        if et not in EVAL_TYPES:
            raise ReferFormatError(f"{where}: eval_type {et!r} not in {EVAL_TYPES}")
        n_expected = {"zt": 0, "st": 1}.get(et[:2])
        if (n_expected is not None and len(targets) != n_expected) or (et == "mt" and len(targets) < 2):
            raise ReferFormatError(f"{where}: eval_type {et} with {len(targets)} targets")
        ann = str(e["ann_id"])
        if (sid, ann) in seen:
            raise ReferFormatError(f"{where}: duplicate (scene_id, ann_id) {(sid, ann)}")
        seen.add((sid, ann))
        rows.append(_row(dataset=dataset, ann_id=ann, scene_id=sid, targets=targets,
                         text=str(e["description"]).strip(),
                         object_name=str(e.get("object_name", "")).replace("_", " ") or None,
                         eval_type=et, anchors=_anchor_ids(e, where), program=e.get("program")))
    return rows


class Stimulus(NamedTuple):
    scene_id: str
    instance_label: str
    n_objects: int          # objects of the target's class in the scene (target + distractors)
    target_id: int
    distractor_ids: list


def decode_stimulus_id(stimulus_id: str) -> Stimulus:
    """``scene-class-N-target-d1-d2...`` (ReferIt3D): class may itself contain '-' or '_' (underscore = space).

    We parse from the right (the tail is N, target and N-1 distractors), so hyphenated class names work.
    """
    parts = str(stimulus_id).split("-")
    for k in range(2, len(parts)):
        tail = parts[k:]
        if all(t.isdigit() for t in tail) and len(tail) >= 2 and len(tail) == int(tail[0]) + 1:
            return Stimulus(parts[0], "-".join(parts[1:k]).replace("_", " "), int(tail[0]), int(tail[1]),
                            [int(t) for t in tail[2:]])
    raise ReferFormatError(f"bad stimulus_id {stimulus_id!r} (expected scene-class-N-target-distractors...)")


def parse_list_literal(text: str, where: str) -> list:
    """A Python-list string (``"['a', 'b']"``, ``"[3, 4]"``) -> list, with ``ast.literal_eval`` (never eval)."""
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError) as e:
        raise ReferFormatError(f"{where}: not a Python list literal: {str(text)[:80]!r} ({e})") from None
    if not isinstance(value, list):
        raise ReferFormatError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def is_view_dependent(tokens: Iterable[str]) -> bool:
    """referit3d's rule: a token is one of :data:`VIEW_DEPENDENT_WORDS` (exact, case-sensitive match on its
    lower-case tokens)."""
    return not VIEW_DEPENDENT_WORDS.isdisjoint(tokens)


_REFERIT_COLUMNS = {
    "nr3d": ("stimulus_id", "utterance", "scan_id", "instance_type", "target_id", "tokens"),
    "sr3d": ("scan_id", "target_id", "distractor_ids", "utterance", "stimulus_id", "instance_type",
             "anchor_ids", "tokens"),
}


def read_referit3d(path: str | Path, kind: str, dataset: Optional[str] = None,
                   progress: bool = False) -> list[dict]:
    """Nr3D / Sr3D csv -> rows (``kind`` is "nr3d" or "sr3d"). ``easy``: at most one same-class distractor
    (referit3d: ``n_objects <= 2`` from the stimulus id); ``view_dep``: :func:`is_view_dependent` on the
    ``tokens`` column."""
    if kind not in _REFERIT_COLUMNS:
        raise ValueError(f"kind must be 'nr3d' or 'sr3d', got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    # utf-8-sig: spreadsheet programs save csv with a BOM, which would otherwise prefix the first column name
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _REFERIT_COLUMNS[kind] if c not in (reader.fieldnames or [])]
        if missing:
            raise ReferFormatError(f"{path}: missing {kind} columns {missing} (has {reader.fieldnames})")
        entries = list(reader)
    rows = []
    for i, e in enumerate(tqdm(entries, desc=f"read {path.name}", disable=not progress, unit="row")):
        where = f"{path} row {i}"
        sid = _check_scene(e["scan_id"], where)
        target = _int(e["target_id"], where, "target_id")
        st = decode_stimulus_id(e["stimulus_id"])
        if st.scene_id != sid or st.target_id != target:
            raise ReferFormatError(f"{where}: stimulus_id {e['stimulus_id']!r} disagrees with scan_id/target_id")
        tokens = [str(t) for t in parse_list_literal(e["tokens"], where + " tokens")]
        if kind == "sr3d":
            distractors = [_int(d, where, "distractor_ids[]")
                           for d in parse_list_literal(e["distractor_ids"], where + " distractor_ids")]
            anchors = [_int(a, where, "anchor_ids[]")
                       for a in parse_list_literal(e["anchor_ids"], where + " anchor_ids")]
        else:
            distractors, anchors = list(st.distractor_ids), None
        program = None
        if e.get("program"):
            try:
                program = json.loads(e["program"])
            except json.JSONDecodeError as err:
                raise ReferFormatError(f"{where}: program is not JSON ({err})") from None
        rows.append(_row(dataset=dataset or kind, ann_id=f"{e['stimulus_id']}#{i}", scene_id=sid,
                         targets=[target], text=e["utterance"].strip(), object_name=e["instance_type"],
                         easy=st.n_objects <= 2, view_dep=is_view_dependent(tokens),
                         distractors=distractors, anchors=anchors, program=program))
    return rows


def read_nr3d(path: str | Path, progress: bool = False) -> list[dict]:
    return read_referit3d(path, "nr3d", progress=progress)


def read_sr3d(path: str | Path, progress: bool = False) -> list[dict]:
    return read_referit3d(path, "sr3d", progress=progress)


# ------------------------------------------------------------------------------------------------------
# Writer and the check against processed scenes
# ------------------------------------------------------------------------------------------------------
def write_refer_jsonl(rows: Iterable[dict], out: str | Path) -> int:
    """Write rows as JSON lines atomically; returns the count. Rows must have exactly :data:`ROW_KEYS`."""
    rows = list(rows)
    for i, r in enumerate(rows):
        if set(r) != set(ROW_KEYS):
            raise ValueError(f"row {i} keys {sorted(r)} differ from the row format {list(ROW_KEYS)}")
    return write_jsonl_atomic(out, ({k: r[k] for k in ROW_KEYS} for r in rows))


def read_refer_jsonl(path: str | Path) -> list[dict]:
    """Rows written by :func:`write_refer_jsonl`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"referring samples not found: {path}")
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReferFormatError(f"{path} line {i + 1}: not JSON ({e})") from None
            _require(r, ("dataset", "ann_id", "scene_id", "targets"), f"{path} line {i + 1}")
            rows.append(r)
    return rows


def load_processed_objects(processed_dir: str | Path, scene_id: str) -> dict[int, dict]:
    """{object_id: {"label": raw label, ...}} from ``processed_dir/scene_id/objects.json``.

    Accepts a list of objects or ``{"objects": [...]}``; the id key is ``object_id`` (or ``id``), the
    label key ``label`` (or ``raw_label``). Where there is no ``objects.json`` (a Pointcept directory or an
    mmdetection3d export ``processed_dir/<scene_id>_vert.npy``) the objects come from the scene loader.
    """
    path = Path(processed_dir) / scene_id / OBJECTS_FILE
    if not path.exists():
        return _loader_objects(Path(processed_dir) / scene_id, path)
    data = _read_json(path, "processed scene objects")
    objs = data.get("objects") if isinstance(data, dict) else data
    if not isinstance(objs, list):
        raise ReferFormatError(f"{path}: expected a list of objects or {{'objects': [...]}}")
    out = {}
    for i, o in enumerate(objs):
        oid = o.get("object_id", o.get("id")) if isinstance(o, dict) else None
        if oid is None:
            raise ReferFormatError(f"{path} object {i}: no object_id / id")
        out[int(oid)] = {**o, "label": o.get("label", o.get("raw_label"))}
    return out


def _loader_objects(scene_path: Path, objects_file: Path) -> dict[int, dict]:
    try:
        scene = load_processed_scene(scene_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"processed scene objects not found: {objects_file}") from None
    return {o.id: {"object_id": o.id, "label": o.label, "nyu40_id": o.nyu40_id} for o in scene.objects}


class FilterReport(NamedTuple):
    kept: list          # rows whose scene and every referenced object exist
    dropped: list       # (row, reason) pairs
    reasons: dict       # reason kind -> count


def filter_against_processed(rows: Iterable[dict], processed_dir: str | Path, examples: int = 5,
                             logger: logging.Logger = log) -> FilterReport:
    """Drop rows whose scene is not processed or which name an object (target, distractor or anchor) the
    processed scene lacks. Drops are REPORTED: a warning with the count per reason and the first
    ``examples`` rows; the same is returned in :class:`FilterReport`."""
    processed_dir = Path(processed_dir)
    if not processed_dir.is_dir():
        raise FileNotFoundError(f"processed directory not found: {processed_dir}")
    cache: dict[str, Optional[set]] = {}
    kept, dropped, reasons = [], [], {}
    for r in rows:
        sid = r["scene_id"]
        if sid not in cache:
            try:
                cache[sid] = set(load_processed_objects(processed_dir, sid))
            except FileNotFoundError:
                cache[sid] = None
        ids = cache[sid]
        reason = None
        if ids is None:
            reason = ("missing_scene", f"scene {sid} not in {processed_dir}")
        else:
            for field in ("targets", "distractors", "anchors"):
                missing = sorted(set(r.get(field) or []) - ids)
                if missing:
                    reason = (f"missing_{field}", f"{field} {missing} not in {sid}")
                    break
        if reason is None:
            kept.append(r)
        else:
            dropped.append((r, reason[1]))
            reasons[reason[0]] = reasons.get(reason[0], 0) + 1
    if dropped:
        first = "; ".join(f"{r['dataset']}:{r['scene_id']}:{r['ann_id']} ({why})" for r, why in dropped[:examples])
        logger.warning("dropped %d of %d referring rows not matching %s (%s); first: %s", len(dropped),
                       len(kept) + len(dropped), processed_dir,
                       ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())), first)
    return FilterReport(kept, dropped, reasons)
