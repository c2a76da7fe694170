"""One processed scene in memory, loaded and validated from disk.

:func:`load_processed_scene` reads

* a scene3d processed directory (``meta.json`` present; exact dtypes of DESIGN.md enforced),
* a Pointcept-processed directory (same ``*.npy`` names, no ``meta.json``; dtypes converted where lossless),
* an mmdetection3d / votenet export (``<dir>/<scene_id>_vert[_all].npy`` + ``_ins_label`` + ``_sem_label``):
  pass the ``*_vert*.npy`` file or the prefix ``<dir>/<scene_id>``.

=================  ================  ==============================================================
field              shape / dtype     meaning
=================  ================  ==============================================================
``coord``          [N, 3] float32    xyz (axis-aligned for scene3d and mmdet3d sources)
``color``          [N, 3] uint8      rgb
``instance``       [N] int32         ScanNet objectId, -1 unannotated
``normal``         [N, 3] float32    unit vertex normals (None for mmdet3d exports)
``superpoint``     [N] int32         segs.json segment id (None where the source has none)
``segment20``      [N] int16         ScanNet-20 class index, -1 ignore (None where absent)
``segment200``     [N] int16         ScanNet-200 class index, -1 ignore (None where absent)
``objects``        list[SceneObject] one per object id, with label and axis-aligned box
``meta``           dict              meta.json (scene3d) or a description of the source
``source``         str               ``"scene3d"``, ``"pointcept"`` or ``"mmdet3d"``
=================  ================  ==============================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from scene3d.constants import META_FILE, OBJECTS_FILE, PROCESSED_FORMAT_VERSION, SCENE_ARRAYS
from scene3d.data.exports import find_mmdet_export, read_mmdet_export, read_pointcept_scene
from scene3d.data.npy import SceneFormatError, load_npy


@dataclass(frozen=True)
class SceneObject:
    """One annotated object. ``center``/``size`` are None for an object without points."""

    id: int
    label: str
    nyu40_id: int
    num_points: int
    center: Optional[tuple] = None
    size: Optional[tuple] = None
    segment20: int = -1
    segment200: int = -1

    @property
    def is_structure(self) -> bool:
        """Wall, floor or ceiling (nyu40 1, 2, 22): consumers such as ScanRefer drop these."""
        return self.nyu40_id in (1, 2, 22)


#: dtype, trailing shape and value range of each per-point array (None: unchecked).
ARRAY_SPECS = {
    "coord": (np.float32, (3,), None),
    "color": (np.uint8, (3,), None),
    "normal": (np.float32, (3,), None),
    "superpoint": (np.int32, (), (0, None)),
    "segment20": (np.int16, (), (-1, 19)),
    "segment200": (np.int16, (), (-1, 199)),
    "instance": (np.int32, (), (-1, None)),
}
REQUIRED = ("coord", "color", "instance")


@dataclass(frozen=True)
class Scene:
    scene_id: str
    coord: np.ndarray
    color: np.ndarray
    instance: np.ndarray
    normal: Optional[np.ndarray] = None
    superpoint: Optional[np.ndarray] = None
    segment20: Optional[np.ndarray] = None
    segment200: Optional[np.ndarray] = None
    objects: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    source: str = "scene3d"

    @property
    def num_points(self) -> int:
        return int(self.coord.shape[0])

    def object_by_id(self) -> dict:
        return {o.id: o for o in self.objects}

    def arrays(self) -> dict:
        """Present per-point arrays by name."""
        return {k: getattr(self, k) for k in ARRAY_SPECS if getattr(self, k) is not None}


def validate_arrays(arrays: dict, files: dict, exact_dtype: bool = True, required=REQUIRED) -> dict:
    """Check shapes, dtypes, ranges and finiteness; returns the arrays (cast when ``exact_dtype`` is False).

    ``files`` maps each array name to the file it came from (used in error messages); ``required`` names the
    arrays that must be present (``coord`` always is: it gives N).
    """
    out = {}
    missing = [k for k in dict.fromkeys(("coord", *required)) if arrays.get(k) is None]
    if missing:
        raise SceneFormatError(f"{', '.join(str(files.get(k, k)) for k in missing)}: missing required array(s) {missing}")
    n = arrays["coord"].shape[0] if arrays["coord"].ndim >= 1 else -1
    for name, a in arrays.items():
        if a is None:
            continue
        dtype, tail, rng = ARRAY_SPECS[name]
        f = files.get(name, name)
        if a.shape != (n, *tail):
            raise SceneFormatError(f"{f}: shape {a.shape}, expected {(n, *tail)} (N from coord)")
        if a.dtype != dtype:
            if exact_dtype:
                raise SceneFormatError(f"{f}: dtype {a.dtype}, expected {np.dtype(dtype)}")
            a = _cast(a, dtype, f)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(np.flatnonzero(~np.isfinite(a).reshape(n, -1).all(axis=1))[0])
            raise SceneFormatError(f"{f}: NaN/inf values (first at row {bad})")
        if rng is not None and a.size:
            lo, hi = rng
            if int(a.min()) < lo or (hi is not None and int(a.max()) > hi):
                raise SceneFormatError(f"{f}: values in [{int(a.min())}, {int(a.max())}], allowed [{lo}, {hi}]")
        out[name] = a
    return out


def _cast(a: np.ndarray, dtype, f) -> np.ndarray:
    """Lossless cast (integers within range, float colours that are whole numbers in 0..255)."""
    target = np.dtype(dtype)
    if target.kind in "iu":
        if a.dtype.kind == "f":
            if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
                raise SceneFormatError(f"{f}: dtype {a.dtype} holds non-integer values, expected {target}")
        info = np.iinfo(target)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise SceneFormatError(f"{f}: values outside the range of {target}")
        return a.astype(target)
    if a.dtype.kind not in "fiu":
        raise SceneFormatError(f"{f}: dtype {a.dtype} cannot be converted to {target}")
    return a.astype(target)


def _objects_from_json(rows, path) -> list:
    objs, seen = [], set()
    for i, r in enumerate(rows):
        try:
            oid = int(r["id"])
            center = r.get("center")
            size = r.get("size")
            obj = SceneObject(id=oid, label=str(r["label"]), nyu40_id=int(r["nyu40_id"]),
                              num_points=int(r.get("num_points", 0)),
                              center=None if center is None else tuple(float(x) for x in center),
                              size=None if size is None else tuple(float(x) for x in size),
                              segment20=int(r.get("segment20", -1)), segment200=int(r.get("segment200", -1)))
        except (KeyError, TypeError, ValueError) as e:
            raise SceneFormatError(f"{path}: objects[{i}] is malformed ({e!r})") from None
        if oid in seen:
            raise SceneFormatError(f"{path}: object id {oid} listed twice")
        for v, nm in ((obj.center, "center"), (obj.size, "size")):
            if v is not None and (len(v) != 3 or not np.isfinite(v).all()):
                raise SceneFormatError(f"{path}: objects[{i}].{nm} must be 3 finite numbers")
        seen.add(oid)
        objs.append(obj)
    return objs


def scene_from_dict(d: dict, source: str, files: Optional[dict] = None, exact_dtype: bool = False) -> Scene:
    """Build a :class:`Scene` from the in-memory dict that ``data_prep`` readers return
    (``{"scene_id", "arrays", "objects", "meta"}``), validating it."""
    files = files or {}
    arrays = validate_arrays({k: v for k, v in d["arrays"].items() if v is not None}, files, exact_dtype)
    objects = d["objects"]
    if objects and not isinstance(objects[0], SceneObject):
        objects = _objects_from_json(objects, files.get("objects", "objects"))
    ids = {o.id for o in objects}
    inst = arrays["instance"]
    present = np.unique(inst[inst >= 0])
    unknown = [int(x) for x in present if int(x) not in ids]
    if unknown:
        raise SceneFormatError(f"{files.get('instance', 'instance')}: instance ids {unknown[:5]} have no entry in "
                               f"{files.get('objects', 'objects')}")
    return Scene(scene_id=d["scene_id"], objects=objects, meta=d.get("meta", {}), source=source, **arrays)


def _read_meta(path: Path) -> dict:
    """``meta.json`` of a scene3d processed directory, its format version checked."""
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SceneFormatError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != PROCESSED_FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise SceneFormatError(f"{meta_path}: format_version {got!r}, this code reads {PROCESSED_FORMAT_VERSION}")
    return meta


def _load_scene3d_dir(path: Path) -> Scene:
    meta = _read_meta(path)
    files = {k: path / f for k, f in SCENE_ARRAYS.items()}
    files["objects"] = path / OBJECTS_FILE
    arrays = {k: load_npy(p) for k, p in files.items() if k != "objects"}
    try:
        obj = json.loads(files["objects"].read_text(encoding="utf-8"))
        rows = obj["objects"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SceneFormatError(f"{files['objects']}: unreadable ({e!r})") from None
    d = {"scene_id": meta.get("scene_id", path.name), "arrays": arrays, "objects": rows, "meta": meta}
    return scene_from_dict(d, "scene3d", files, exact_dtype=True)


def load_processed_scene(path) -> Scene:
    """Load a processed scene (scene3d or Pointcept directory, or an mmdet3d/votenet export; see module doc).

    Raises :class:`SceneFormatError` (a ``ValueError``) naming the offending file, ``FileNotFoundError``
    when nothing is found at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        if (path / META_FILE).exists():
            return _load_scene3d_dir(path)
        if (path / SCENE_ARRAYS["coord"]).exists():
            d = read_pointcept_scene(path)
            return scene_from_dict(d, "pointcept", d["meta"]["files"])
        raise FileNotFoundError(f"{path}: neither {META_FILE} nor {SCENE_ARRAYS['coord']} found (not a processed scene)")
    if find_mmdet_export(path) is not None:
        d = read_mmdet_export(path)
        return scene_from_dict(d, "mmdet3d", d["meta"]["files"])
    raise FileNotFoundError(f"{path}: no processed scene directory or mmdet3d export (*_vert.npy) found")


def load_scene_arrays(path, names=("coord", "instance")) -> dict:
    """Only the per-point arrays ``names`` of a processed scene, ``{name: array}`` (what the metrics read).

    The same sources, files and checks as :func:`load_processed_scene` (a scene3d directory's format version
    and exact dtypes; a Pointcept directory's arrays cast where lossless; an mmdet3d export), without reading
    the other arrays or building the objects. Every name must be present. Raises :class:`SceneFormatError`
    naming the file, ``FileNotFoundError`` naming the first missing file.
    """
    path = Path(path)
    unknown = [k for k in names if k not in SCENE_ARRAYS]
    if unknown:
        raise ValueError(f"unknown scene arrays {unknown}; known: {list(SCENE_ARRAYS)}")
    if not path.is_dir() and find_mmdet_export(path) is not None:
        scene = load_processed_scene(path)
        missing = [k for k in names if getattr(scene, k) is None]
        if missing:
            raise SceneFormatError(f"{path}: the mmdet3d export has no {missing}")
        return {k: getattr(scene, k) for k in names}
    exact = (path / META_FILE).exists()
    if exact:
        _read_meta(path)
    files = {k: path / SCENE_ARRAYS[k] for k in dict.fromkeys(("coord", *names))}
    for p in files.values():
        if not p.is_file():
            raise FileNotFoundError(f"processed scene array not found: {p}")
    arrays = validate_arrays({k: load_npy(p) for k, p in files.items()}, files, exact_dtype=exact, required=names)
    return {k: arrays[k] for k in names}
