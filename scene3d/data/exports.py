"""Readers for scenes other tools already preprocessed, converted to the in-memory scene dict of
:func:`data_prep.scannet.build_scene` (``{"scene_id", "arrays", "objects", "meta"}``).

========================  ==========================================================================================
source                    files and conventions
========================  ==========================================================================================
Pointcept directory       ``coord.npy color.npy normal.npy superpoint.npy segment20.npy segment200.npy instance.npy``
                          (same names as ours; Pointcept does not axis-align). Object labels are derived from the
                          majority ``segment200`` (name) and ``segment20`` (nyu40 id) of each instance.
mmdet3d / votenet export  ``<id>_vert[_all].npy`` f4 [N, 6] aligned xyz + rgb 0..255; ``<id>_ins_label[_all].npy``
                          u4 [N] = objectId + 1 (0 unannotated); ``<id>_sem_label[_all].npy`` u4 [N] nyu40 id.
                          Here instance = ins - 1; segment20 from nyu40; no normals, superpoints or segment200.
========================  ==========================================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from scene3d.constants import SCENE_ARRAYS
from scene3d.data.boxes import compute_object_boxes
from scene3d.data.labels import CLASS_LABELS_200, NYU40_CLASSES, VALID_CLASS_IDS_20, segment20_of_nyu40
from scene3d.data.npy import SceneFormatError, load_npy


def majority_per_instance(instance: np.ndarray, values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Most frequent ``values`` entry among the points of each id in ``ids`` (ties: the smallest value).

    One ``np.unique`` over (instance, value) pairs instead of a mask per object.
    """
    sel = instance >= 0
    inst, val = instance[sel].astype(np.int64), values[sel].astype(np.int64)
    out = np.full(ids.shape[0], -1, dtype=np.int64)
    if inst.size == 0:
        return out
    pairs, counts = np.unique(np.stack([inst, val], axis=1), axis=0, return_counts=True)
    # sort by instance, then count descending, then value ascending: first row per instance wins
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
    pairs = pairs[order]
    first = np.concatenate([[True], pairs[1:, 0] != pairs[:-1, 0]])
    best = dict(zip(pairs[first, 0].tolist(), pairs[first, 1].tolist()))
    for j, i in enumerate(ids.tolist()):
        out[j] = best.get(i, -1)
    return out


def _objects(coord: np.ndarray, instance: np.ndarray, labels: list, nyu40: list, seg20: list, seg200: list,
             ids: np.ndarray, boxes) -> list:
    objs = []
    for j, oid in enumerate(ids.tolist()):
        objs.append({"id": int(oid), "label": labels[j], "nyu40_id": int(nyu40[j]), "segment20": int(seg20[j]),
                     "segment200": int(seg200[j]), "num_points": int(boxes.count[j]),
                     "min": boxes.min[j].tolist(), "max": boxes.max[j].tolist(),
                     "center": boxes.center[j].tolist(), "size": boxes.size[j].tolist()})
    return objs


def read_pointcept_scene(scene_dir) -> dict:
    """A Pointcept-processed ScanNet scene directory as a scene dict (arrays cast to our dtypes later)."""
    scene_dir = Path(scene_dir)
    files = {k: scene_dir / f for k, f in SCENE_ARRAYS.items()}
    arrays: dict = {}
    for name, p in files.items():
        if p.exists():
            arrays[name] = load_npy(p)
        elif name in ("coord", "color"):
            raise SceneFormatError(f"{p}: missing file (required in a Pointcept scene)")
        else:
            arrays[name] = None
    n = arrays["coord"].shape[0]
    if arrays["instance"] is None:
        arrays["instance"] = np.full(n, -1, dtype=np.int32)
    inst = arrays["instance"].astype(np.int64).reshape(-1)
    if inst.shape[0] != n:
        raise SceneFormatError(f"{files['instance']}: {inst.shape[0]} rows, coord has {n}")
    boxes = compute_object_boxes(arrays["coord"].astype(np.float64), inst)
    s200 = (majority_per_instance(inst, arrays["segment200"].reshape(-1), boxes.ids)
            if arrays["segment200"] is not None else np.full(boxes.ids.size, -1))
    s20 = (majority_per_instance(inst, arrays["segment20"].reshape(-1), boxes.ids)
           if arrays["segment20"] is not None else np.full(boxes.ids.size, -1))
    labels = [CLASS_LABELS_200[c] if 0 <= c < 200 else "unknown" for c in s200.tolist()]
    nyu = [VALID_CLASS_IDS_20[c] if 0 <= c < 20 else 0 for c in s20.tolist()]
    objs = _objects(arrays["coord"], inst, labels, nyu, s20.tolist(), s200.tolist(), boxes.ids, boxes)
    meta = {"source": "pointcept", "scene_id": scene_dir.name, "axis_aligned": None,
            "files": {k: str(v) for k, v in files.items() if v.exists()}}
    return {"scene_id": scene_dir.name, "arrays": arrays, "objects": objs, "meta": meta}


class MmdetFiles(NamedTuple):
    scene_id: str
    vert: Path
    ins: Path
    sem: Path


def find_mmdet_export(path) -> Optional[MmdetFiles]:
    """Files of an mmdet3d export given ``<dir>/<id>_vert[_all].npy`` or the prefix ``<dir>/<id>``
    (the full ``_all`` export is preferred over the 50k subsample); None if there is none."""
    path = Path(path)
    name = path.name
    for suffix in ("_vert_all.npy", "_vert.npy"):
        if name.endswith(suffix):
            sid, tail = name[: -len(suffix)], suffix[len("_vert"):]
            return MmdetFiles(sid, path, path.with_name(f"{sid}_ins_label{tail}"),
                              path.with_name(f"{sid}_sem_label{tail}")) if path.exists() else None
    for tail in ("_all.npy", ".npy"):
        vert = path.with_name(f"{name}_vert{tail}")
        if vert.exists():
            return MmdetFiles(name, vert, path.with_name(f"{name}_ins_label{tail}"),
                              path.with_name(f"{name}_sem_label{tail}"))
    return None


def read_mmdet_export(path) -> dict:
    """An mmdetection3d / votenet ``scannet_train_instance_data`` export as a scene dict.

    ``instance = ins_label - 1`` (so -1 unannotated, objectId otherwise); object nyu40 ids are the majority
    ``sem_label`` of each instance; boxes are the min/max over the (already aligned) vertices.
    """
    f = find_mmdet_export(path)
    if f is None:
        raise SceneFormatError(f"{path}: no mmdet3d export (<scene>_vert[_all].npy) found")
    vert, ins, sem = load_npy(f.vert), load_npy(f.ins), load_npy(f.sem)
    if vert.ndim != 2 or vert.shape[1] < 6:
        raise SceneFormatError(f"{f.vert}: shape {vert.shape}, expected [N, 6] (xyz + rgb)")
    n = vert.shape[0]
    for p, a in ((f.ins, ins), (f.sem, sem)):
        if a.shape != (n,):
            raise SceneFormatError(f"{p}: shape {a.shape}, expected ({n},) to match {f.vert.name}")
        if a.dtype.kind not in "iu":
            raise SceneFormatError(f"{p}: dtype {a.dtype}, expected integers")
    if not np.isfinite(vert).all():
        raise SceneFormatError(f"{f.vert}: NaN/inf values")
    rgb = vert[:, 3:6]
    if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
        raise SceneFormatError(f"{f.vert}: colours outside 0..255")
    if sem.size and (sem.min() < 0 or sem.max() > 40):
        raise SceneFormatError(f"{f.sem}: nyu40 ids outside 0..40")
    instance = ins.astype(np.int64) - 1
    if instance.size and instance.max() > np.iinfo(np.int32).max:
        raise SceneFormatError(f"{f.ins}: instance ids too large for int32")
    coord = np.ascontiguousarray(vert[:, :3], dtype=np.float32)
    lut20 = np.array([segment20_of_nyu40(i) for i in range(41)], dtype=np.int16)
    seg20 = lut20[sem.astype(np.int64)]
    boxes = compute_object_boxes(coord, instance)
    nyu = majority_per_instance(instance, sem, boxes.ids)
    labels = [NYU40_CLASSES[c - 1] if 1 <= c <= 40 else "unannotated" for c in nyu.tolist()]
    s20 = [segment20_of_nyu40(c) for c in nyu.tolist()]
    objs = _objects(coord, instance, labels, nyu.tolist(), s20, [-1] * len(s20), boxes.ids, boxes)
    arrays = {"coord": coord, "color": np.round(rgb).astype(np.uint8), "instance": instance.astype(np.int32),
              "segment20": seg20}
    meta = {"source": "mmdet3d", "scene_id": f.scene_id, "axis_aligned": True,
            "files": {"coord": str(f.vert), "color": str(f.vert), "instance": str(f.ins), "segment20": str(f.sem)}}
    return {"scene_id": f.scene_id, "arrays": arrays, "objects": objs, "meta": meta}


__all__ = ["MmdetFiles", "find_mmdet_export", "majority_per_instance", "read_mmdet_export", "read_pointcept_scene"]
