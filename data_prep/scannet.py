"""ScanNet v2 raw scans -> processed scene directories (the layout of DESIGN.md).

Raw scan directory ``<raw_root>/<scene_id>/`` as the ScanNet release lays it out:

=============================================  ==================================================================
file                                           read by
=============================================  ==================================================================
``<id>_vh_clean_2.ply``                        :func:`read_ply` (binary little-endian, header -> numpy dtype)
``<id>_vh_clean_2.0.010000.segs.json``         :func:`read_segs` (``segIndices``, one per mesh vertex)
``<id>.aggregation.json``                      :func:`read_aggregation` (``segGroups``: objectId, label, segments)
``<id>.txt``                                   :func:`read_axis_alignment` (``axisAlignment``, identity if absent)
``scannetv2-labels.combined.tsv`` (shared)     :func:`read_label_tsv` (raw_category -> tsv id, nyu40id)
=============================================  ==================================================================

Processed scene ``<out_root>/<scene_id>/`` (written atomically by :func:`write_scene`):

====================  ===========  ==================================================================================
file                  dtype/shape  meaning
====================  ===========  ==================================================================================
``coord.npy``         f4 [N, 3]    vertex xyz aligned with ``axisAlignment``: ``[x, y, z, 1] @ M.T``
``color.npy``         u1 [N, 3]    vertex rgb
``normal.npy``        f4 [N, 3]    unit area-weighted vertex normals of the aligned mesh (see :func:`vertex_normals`)
``superpoint.npy``    i4 [N]       ``segIndices`` of segs.json (raw segment ids)
``segment20.npy``     i2 [N]       ScanNet-20 class index (position in ``VALID_CLASS_IDS_20``), -1 ignore
``segment200.npy``    i2 [N]       ScanNet-200 class index (position in ``VALID_CLASS_IDS_200``), -1 ignore
``instance.npy``      i4 [N]       aggregation ``objectId`` (0-based), -1 where no segGroup covers the vertex
``objects.json``      json         ``{"scene_id", "objects": [{id, label, nyu40_id, segment20, segment200,
                                   num_points, min, max, center, size}]}``; every object kept (wall/floor too)
``meta.json``         json         format version, scene id, sha256 of each source file and the tsv, alignment, counts
====================  ===========  ==================================================================================

Conventions (checked against real ScanRefer / votenet / mmdetection3d exports in the tests):
``instance`` equals ``objectId`` (those exports store ``objectId + 1`` with 0 for unannotated vertices); semantic
labels come from the aggregation ``label`` through the tsv ``raw_category`` column. Where two segGroups claim the
same segment (rare in ScanNet) the later group wins, as in the reference exporters' loops.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

from scene3d.data.boxes import ObjectBoxes, compute_object_boxes
from scene3d.data.labels import segment200_of_id, segment20_of_nyu40
from scene3d.constants import IGNORE_LABEL, META_FILE, OBJECTS_FILE, PROCESSED_FORMAT_VERSION, SCENE_ARRAYS
from scene3d.data.exports import find_mmdet_export
from scene3d.utils.io import atomic_dir

#: Test hook: seconds a scene write sleeps before it is committed (lets tests kill a run mid-scene).
TEST_SLEEP_ENV = "SCENE3D_PREP_TEST_SLEEP_S"
#: Normal given to vertices that touch no face of non-zero area (isolated or degenerate): +z (up after alignment).
NORMAL_FALLBACK = np.array([0.0, 0.0, 1.0], dtype=np.float32)


class ScanNetFormatError(ValueError):
    """A raw ScanNet file is missing, truncated or malformed. The message names the scene and the file."""

    def __init__(self, path, reason: str, scene_id: Optional[str] = None):
        self.path = str(path)
        self.reason = reason
        self.scene_id = scene_id
        prefix = f"{scene_id}: " if scene_id else ""
        super().__init__(f"{prefix}{self.path}: {reason}")

    def with_scene(self, scene_id: str) -> "ScanNetFormatError":
        return ScanNetFormatError(self.path, self.reason, scene_id)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ScanNetFormatError(path, "missing file") from None
    except OSError as e:
        raise ScanNetFormatError(path, f"cannot read: {e.strerror or e}") from None


def _load_json(data: bytes, path: Path):
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScanNetFormatError(path, f"not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------------------ ply

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2",
    "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}
_MAX_HEADER = 1 << 16


class PlyMesh(NamedTuple):
    """A triangle mesh read from a binary ply.

    ============  ======================  ==================================================
    field         shape / dtype           meaning
    ============  ======================  ==================================================
    ``vertex``    [N] structured          every vertex property of the file (x, y, z, red, ...)
    ``faces``     [F, 3] int32            triangle vertex indices, checked to lie in [0, N)
    ============  ======================  ==================================================
    """

    vertex: np.ndarray
    faces: np.ndarray


def parse_ply(data: bytes, path="<bytes>") -> PlyMesh:
    """Parse a ScanNet-style binary little-endian ply (vertex element, then a triangle face element).

    The header is turned into a numpy structured dtype and the vertex block is read with ``np.frombuffer``
    (no per-vertex Python). Raises :class:`ScanNetFormatError` for an ascii or big-endian ply, missing
    x/y/z/red/green/blue, non-triangle faces, out-of-range indices, NaN/inf coordinates, or a size that does
    not match the header (truncated file or trailing bytes).
    """
    if not data.startswith(b"ply\n") and not data.startswith(b"ply\r\n"):
        raise ScanNetFormatError(path, "not a ply file (no 'ply' magic line)")
    end = data.find(b"end_header\n", 0, _MAX_HEADER)
    if end < 0:
        raise ScanNetFormatError(path, "ply header has no 'end_header' line (truncated or not a ply)")
    body_start = end + len(b"end_header\n")
    try:
        header = data[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ScanNetFormatError(path, "ply header is not ASCII") from None

    fmt = None
    elements: list[list] = []  # [name, count, [(prop_name, dtype) | (prop_name, count_dtype, index_dtype)]]
    for lineno, line in enumerate(header[1:], start=2):
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        try:
            if tok[0] == "format":
                fmt = (tok[1], tok[2])
            elif tok[0] == "element":
                elements.append([tok[1], int(tok[2]), []])
            elif tok[0] == "property":
                if not elements:
                    raise ValueError("property before any element")
                if tok[1] == "list":
                    elements[-1][2].append((tok[4], _PLY_TYPES[tok[2]], _PLY_TYPES[tok[3]]))
                else:
                    elements[-1][2].append((tok[2], _PLY_TYPES[tok[1]]))
            else:
                raise ValueError(f"unknown keyword {tok[0]!r}")
        except (IndexError, KeyError, ValueError) as e:
            raise ScanNetFormatError(path, f"bad ply header line {lineno} {line!r}: {e}") from None
    if fmt != ("binary_little_endian", "1.0"):
        raise ScanNetFormatError(path, f"ply format {fmt} is not supported; ScanNet meshes are binary_little_endian 1.0")
    names = [e[0] for e in elements]
    if names != ["vertex", "face"]:
        raise ScanNetFormatError(path, f"expected elements ['vertex', 'face'] as in ScanNet meshes, got {names}")
    (_, nv, vprops), (_, nf, fprops) = elements
    if nv < 0 or nf < 0:
        raise ScanNetFormatError(path, f"negative element count (vertex {nv}, face {nf})")
    if any(len(p) != 2 for p in vprops):
        raise ScanNetFormatError(path, "list properties in the vertex element are not supported")
    vnames = [p[0] for p in vprops]
    missing = [n for n in ("x", "y", "z", "red", "green", "blue") if n not in vnames]
    if missing:
        raise ScanNetFormatError(path, f"vertex element lacks {missing} (not a ScanNet mesh)")
    vdtype = np.dtype([(n, "<" + t) for n, t in vprops])
    for n in ("x", "y", "z"):
        if vdtype[n].kind != "f":
            raise ScanNetFormatError(path, f"vertex property {n} must be float, got {vdtype[n]}")
    if len(fprops) != 1 or len(fprops[0]) != 3 or fprops[0][0] not in ("vertex_indices", "vertex_index"):
        raise ScanNetFormatError(path, f"face element must hold one list 'vertex_indices', got {fprops}")
    _, cnt_t, idx_t = fprops[0]
    if np.dtype(idx_t).kind not in "iu":
        raise ScanNetFormatError(path, f"face indices must be integers, got {idx_t}")
    fdtype = np.dtype([("n", "<" + cnt_t), ("v", "<" + idx_t, (3,))])

    vbytes = nv * vdtype.itemsize
    expected = body_start + vbytes + nf * fdtype.itemsize
    if len(data) != expected:
        if nf and len(data) >= body_start + vbytes + np.dtype(cnt_t).itemsize:
            first = int(np.frombuffer(data, "<" + cnt_t, 1, body_start + vbytes)[0])
            if first != 3:
                raise ScanNetFormatError(path, f"face 0 has {first} vertices; only triangle meshes are supported")
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ScanNetFormatError(path, f"ply {what}: header promises {nv} vertices and {nf} faces "
                                       f"({expected} bytes), file has {len(data)} bytes")
    vertex = np.frombuffer(data, vdtype, nv, body_start)
    frec = np.frombuffer(data, fdtype, nf, body_start + vbytes)
    if nf and not np.all(frec["n"] == 3):
        bad = int(np.flatnonzero(frec["n"] != 3)[0])
        raise ScanNetFormatError(path, f"face {bad} has {int(frec['n'][bad])} vertices; only triangles are supported")
    faces = frec["v"].astype(np.int32)
    if nf and (int(faces.min()) < 0 or int(faces.max()) >= nv):
        raise ScanNetFormatError(path, f"face indices out of range [0, {nv}): min {int(faces.min())}, max {int(faces.max())}")
    return PlyMesh(vertex, faces)


def read_ply(path) -> PlyMesh:
    """Read a ScanNet ``*_vh_clean_2.ply`` (see :func:`parse_ply`)."""
    path = Path(path)
    return parse_ply(_read_bytes(path), path)


def mesh_xyz_rgb(mesh: PlyMesh, path="<ply>") -> tuple[np.ndarray, np.ndarray]:
    """``(xyz float64 [N,3], rgb uint8 [N,3])`` of a mesh; raises on NaN/inf coordinates."""
    v = mesh.vertex
    xyz = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float64)
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ScanNetFormatError(path, f"{bad.size} vertices have NaN/inf coordinates (first: vertex {int(bad[0])})")
    rgb = np.stack([v["red"], v["green"], v["blue"]], axis=1)
    if rgb.dtype != np.uint8:
        if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
            raise ScanNetFormatError(path, "vertex colours outside 0..255")
        rgb = rgb.astype(np.uint8)
    return xyz, np.ascontiguousarray(rgb)


# ------------------------------------------------------------------------------------------------ geometry

def vertex_normals(coord: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, int]:
    """Area-weighted unit vertex normals.

    Each face adds its unnormalised normal ``(v1 - v0) x (v2 - v0)`` (length = twice its area) to its three
    vertices; sums are normalised. Vertices touching no face of non-zero area (isolated vertices, degenerate
    faces only) get :data:`NORMAL_FALLBACK` ``[0, 0, 1]``. Returns ``(normals float32 [N, 3], num_fallback)``.
    Vectorised with ``np.bincount`` (faster than ``np.add.at``; trimesh/open3d would need a mesh object and
    open3d is optional).
    """
    n = coord.shape[0]
    p = coord.astype(np.float64, copy=False)
    if faces.shape[0]:
        v0, v1, v2 = p[faces[:, 0]], p[faces[:, 1]], p[faces[:, 2]]
        fn = np.cross(v1 - v0, v2 - v0)  # (F, 3), |fn| = 2 * area
        idx = faces.reshape(-1)
        acc = np.empty((n, 3), dtype=np.float64)
        for c in range(3):
            acc[:, c] = np.bincount(idx, weights=np.repeat(fn[:, c], 3), minlength=n)
    else:
        acc = np.zeros((n, 3), dtype=np.float64)
    norm = np.linalg.norm(acc, axis=1)
    ok = norm > 1e-20
    out = np.empty((n, 3), dtype=np.float32)
    out[ok] = acc[ok] / norm[ok, None]
    out[~ok] = NORMAL_FALLBACK
    return out, int(n - ok.sum())


def apply_alignment(xyz: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``[x, y, z, 1] @ M.T`` for a 4x4 affine ``M`` (float64 in, float64 out)."""
    return xyz @ matrix[:3, :3].T + matrix[:3, 3]


# ------------------------------------------------------------------------------------------------ json / txt

def read_segs(path, num_vertices: Optional[int] = None, data: Optional[bytes] = None) -> np.ndarray:
    """``segIndices`` of a ``*.segs.json`` as int32 ``[N]``; checks the length against ``num_vertices``."""
    path = Path(path)
    obj = _load_json(_read_bytes(path) if data is None else data, path)
    if not isinstance(obj, dict) or not isinstance(obj.get("segIndices"), list):
        raise ScanNetFormatError(path, "no 'segIndices' list (not a ScanNet segs.json)")
    try:
        seg = np.asarray(obj["segIndices"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ScanNetFormatError(path, "segIndices must be integers") from None
    if seg.ndim != 1:
        raise ScanNetFormatError(path, "segIndices must be a flat list of integers")
    if seg.size and (seg.min() < 0 or seg.max() > np.iinfo(np.int32).max):
        raise ScanNetFormatError(path, f"segIndices outside [0, 2^31): min {seg.min()}, max {seg.max()}")
    if num_vertices is not None and seg.size != num_vertices:
        raise ScanNetFormatError(path, f"segIndices has {seg.size} entries but the mesh has {num_vertices} vertices")
    return seg.astype(np.int32)


class SegGroup(NamedTuple):
    """One aggregation object: ``object_id`` (0-based ScanNet objectId), raw ``label``, its segment ids."""

    object_id: int
    label: str
    segments: np.ndarray


def read_aggregation(path, data: Optional[bytes] = None) -> list[SegGroup]:
    """``segGroups`` of a ``*.aggregation.json`` in file order."""
    path = Path(path)
    obj = _load_json(_read_bytes(path) if data is None else data, path)
    if not isinstance(obj, dict) or not isinstance(obj.get("segGroups"), list):
        raise ScanNetFormatError(path, "no 'segGroups' list (not a ScanNet aggregation.json)")
    groups = []
    for i, g in enumerate(obj["segGroups"]):
        try:
            oid = g["objectId"] if "objectId" in g else g["id"]
            if not isinstance(oid, int) or isinstance(oid, bool) or oid < 0:
                raise ValueError(f"objectId {oid!r} is not a non-negative integer")
            label = g["label"]
            if not isinstance(label, str):
                raise ValueError(f"label {label!r} is not a string")
            segs = np.asarray(g["segments"], dtype=np.int64)
            if segs.ndim != 1:
                raise ValueError("segments must be a flat list")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ScanNetFormatError(path, f"segGroups[{i}] is malformed: {e}") from None
        groups.append(SegGroup(oid, label, segs))
    return groups


def instance_from_segments(seg: np.ndarray, groups: Sequence[SegGroup], agg_path="<aggregation>",
                           segs_name: str = "segs.json") -> np.ndarray:
    """Per-vertex objectId (int32 [N], -1 where no group covers the vertex) from ``segIndices`` and segGroups.

    Vectorised through the sorted unique segment ids (``np.unique`` + ``searchsorted``), no per-vertex loop;
    a later group claiming a segment overrides an earlier one. Raises :class:`ScanNetFormatError` when a group
    names a segment id that no vertex has.
    """
    useg, inv = np.unique(seg, return_inverse=True)
    seg_obj = np.full(useg.size + 1, IGNORE_LABEL, dtype=np.int32)  # +1: safe slot when seg is empty
    for i, g in enumerate(groups):
        pos = np.searchsorted(useg, g.segments)
        pos_c = np.minimum(pos, max(useg.size - 1, 0))
        found = (useg[pos_c] == g.segments) if useg.size else np.zeros(g.segments.shape, bool)
        if not found.all():
            raise ScanNetFormatError(agg_path, f"segGroups[{i}] (objectId {g.object_id}, {g.label!r}) names segment "
                                               f"{int(g.segments[~found][0])} which is not in {segs_name}")
        seg_obj[pos_c] = g.object_id
    return seg_obj[inv.reshape(-1)]


def parse_axis_alignment(text: str, path="<txt>") -> Optional[np.ndarray]:
    """The 4x4 ``axisAlignment`` matrix of a scene ``.txt`` (row-major), or None where the line is absent."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "axisAlignment":
            try:
                vals = [float(x) for x in value.split()]
            except ValueError:
                raise ScanNetFormatError(path, f"axisAlignment has non-numeric values: {value.strip()!r}") from None
            if len(vals) != 16:
                raise ScanNetFormatError(path, f"axisAlignment has {len(vals)} values, expected 16")
            m = np.asarray(vals, dtype=np.float64).reshape(4, 4)
            if not np.isfinite(m).all():
                raise ScanNetFormatError(path, "axisAlignment has NaN/inf values")
            if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
                raise ScanNetFormatError(path, f"axisAlignment last row is {m[3].tolist()}, not [0, 0, 0, 1]")
            return m
    return None


def read_axis_alignment(path) -> np.ndarray:
    """4x4 alignment of a scene ``.txt``; identity where the file has no ``axisAlignment`` (test scans)."""
    path = Path(path)
    text = _read_bytes(path).decode("utf-8-sig", errors="replace")
    m = parse_axis_alignment(text, path)
    return np.eye(4) if m is None else m


# ------------------------------------------------------------------------------------------------ label tsv

class BadRow(NamedTuple):
    line: int
    reason: str


@dataclass(frozen=True)
class LabelMap:
    """``scannetv2-labels.combined.tsv``: raw_category -> (tsv id, nyu40 id), plus the ScanNet-20/200 maps.

    Rows that cannot be read are kept in ``bad_rows`` (by raw_category where it is readable, else in
    ``unreadable_lines``) so that only the scenes using them fail, with an error naming the tsv line.
    """

    path: str
    sha256: str
    raw_to_id: dict
    raw_to_nyu40: dict
    bad_rows: dict = field(default_factory=dict)
    unreadable_lines: tuple = ()

    def lookup(self, raw: str) -> tuple[int, int]:
        """``(tsv id, nyu40 id)`` of a raw label; raises ``KeyError`` with a message naming the tsv row."""
        if raw in self.raw_to_id:
            return self.raw_to_id[raw], self.raw_to_nyu40[raw]
        if raw in self.bad_rows:
            b = self.bad_rows[raw]
            raise KeyError(f"{self.path}: line {b.line} (label {raw!r}) is unreadable: {b.reason}")
        extra = f" (its unreadable lines {list(self.unreadable_lines)} may hold it)" if self.unreadable_lines else ""
        raise KeyError(f"{self.path}: label {raw!r} is not in the tsv{extra}")


def read_label_tsv(path) -> LabelMap:
    """Read the ScanNet label tsv with universal newlines (LF, CRLF and stray CR all work; blank lines skipped).

    Raises :class:`ScanNetFormatError` if the file is missing or its header lacks ``id``, ``raw_category`` or
    ``nyu40id``. The first row wins for a raw_category listed twice.
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")  # a BOM (spreadsheet programs write one) must not hide the "id" column
    except UnicodeDecodeError as e:
        raise ScanNetFormatError(path, f"not UTF-8 text ({e})") from None
    # str.splitlines splits on \n, \r\n and lone \r: the universal-newline reading.
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not lines:
        raise ScanNetFormatError(path, "empty label tsv")
    header = [h.strip() for h in lines[0][1].split("\t")]
    try:
        c_id, c_raw, c_nyu = header.index("id"), header.index("raw_category"), header.index("nyu40id")
    except ValueError:
        raise ScanNetFormatError(path, f"header lacks id/raw_category/nyu40id columns: {header[:6]}...") from None
    raw_to_id, raw_to_nyu, bad, unreadable = {}, {}, {}, []
    for lineno, line in lines[1:]:
        cols = line.split("\t")
        if len(cols) <= c_raw or not cols[c_raw].strip():
            unreadable.append(lineno)
            continue
        raw = cols[c_raw]
        if raw in raw_to_id or raw in bad:
            continue
        try:
            tid = int(cols[c_id])
            nyu = int(cols[c_nyu])
            if not 0 <= nyu <= 40:
                raise ValueError(f"nyu40id {nyu} outside 0..40")
        except IndexError:
            bad[raw] = BadRow(lineno, f"{len(cols)} columns, need {max(c_id, c_nyu) + 1}")
            continue
        except ValueError as e:
            bad[raw] = BadRow(lineno, str(e))
            continue
        raw_to_id[raw] = tid
        raw_to_nyu[raw] = nyu
    return LabelMap(str(path), hashlib.sha256(data).hexdigest(), raw_to_id, raw_to_nyu, bad, tuple(unreadable))


# ------------------------------------------------------------------------------------------------ one scene

class SceneFiles(NamedTuple):
    ply: Path
    segs: Path
    aggregation: Path
    txt: Path


def scene_files(raw_scan_dir, scene_id: Optional[str] = None) -> SceneFiles:
    d = Path(raw_scan_dir)
    s = scene_id or d.name
    return SceneFiles(d / f"{s}_vh_clean_2.ply", d / f"{s}_vh_clean_2.0.010000.segs.json",
                      d / f"{s}.aggregation.json", d / f"{s}.txt")


@dataclass(frozen=True)
class PrepConfig:
    """Options of :func:`process_scene`.

    ``allow_unannotated``: a scan without aggregation.json (ScanNet test scans) is processed with every
    vertex unannotated instead of failing. ``require_txt``: fail when the scene ``.txt`` is missing (else
    identity alignment). ``unknown_label``: ``"error"`` fails a scene whose aggregation uses a label the tsv
    does not map; ``"ignore"`` keeps the object with nyu40 id 0 and segment -1.
    """

    allow_unannotated: bool = False
    require_txt: bool = True
    unknown_label: str = "error"

    def __post_init__(self):
        if self.unknown_label not in ("error", "ignore"):
            raise ValueError(f"unknown_label must be 'error' or 'ignore', got {self.unknown_label!r}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_hashes(raw_scan_dir, scene_id: Optional[str] = None) -> dict:
    """``{role: sha256}`` of the scene's present source files (as stored in meta.json)."""
    out = {}
    for role, p in scene_files(raw_scan_dir, scene_id)._asdict().items():
        if p.exists():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[role] = h.hexdigest()
    return out


def build_scene(raw_scan_dir, label_map: LabelMap, config: PrepConfig = PrepConfig(),
                scene_id: Optional[str] = None) -> dict:
    """Read one raw scan and return the processed scene in memory.

    Returns ``{"scene_id", "arrays": {name: ndarray} (names of SCENE_ARRAYS), "objects": [...], "meta": {...}}``.
    Every error is a :class:`ScanNetFormatError` naming the scene and the file.
    """
    scene_id = scene_id or Path(raw_scan_dir).name
    files = scene_files(raw_scan_dir, scene_id)
    try:
        return _build_scene(files, label_map, config, scene_id)
    except ScanNetFormatError as e:
        raise e.with_scene(scene_id) from None


def _build_scene(files: SceneFiles, label_map: LabelMap, config: PrepConfig, scene_id: str) -> dict:
    hashes = {}
    ply_bytes = _read_bytes(files.ply)
    hashes["ply"] = _sha(ply_bytes)
    mesh = parse_ply(ply_bytes, files.ply)
    xyz, rgb = mesh_xyz_rgb(mesh, files.ply)
    n = xyz.shape[0]
    if n == 0:
        raise ScanNetFormatError(files.ply, "mesh has no vertices")

    if files.txt.exists() or config.require_txt:
        txt_bytes = _read_bytes(files.txt)
        hashes["txt"] = _sha(txt_bytes)
        m = parse_axis_alignment(txt_bytes.decode("utf-8-sig", errors="replace"), files.txt)
    else:
        m = None
    align = np.eye(4) if m is None else m
    coord64 = apply_alignment(xyz, align)
    coord = coord64.astype(np.float32)
    normal, n_fallback = vertex_normals(coord64, mesh.faces)

    segs_bytes = _read_bytes(files.segs)
    hashes["segs"] = _sha(segs_bytes)
    seg = read_segs(files.segs, n, segs_bytes)

    instance = np.full(n, IGNORE_LABEL, dtype=np.int32)
    seg20 = np.full(n, IGNORE_LABEL, dtype=np.int16)
    seg200 = np.full(n, IGNORE_LABEL, dtype=np.int16)
    objects = []
    if files.aggregation.exists() or not config.allow_unannotated:
        agg_bytes = _read_bytes(files.aggregation)
        hashes["aggregation"] = _sha(agg_bytes)
        groups = read_aggregation(files.aggregation, agg_bytes)
        instance = instance_from_segments(seg, groups, files.aggregation, files.segs.name)
        labels: dict[int, tuple[str, int, int]] = {}
        for i, g in enumerate(groups):
            if g.object_id in labels:
                continue  # a repeated objectId merges into the first group's object
            try:
                tid, nyu = label_map.lookup(g.label)
            except KeyError as e:
                if config.unknown_label == "error":
                    raise ScanNetFormatError(files.aggregation, f"segGroups[{i}]: {e.args[0]}") from None
                tid, nyu = -1, 0
            labels[g.object_id] = (g.label, nyu, tid)
        if labels:
            max_id = max(labels)
            lut20 = np.full(max_id + 2, IGNORE_LABEL, dtype=np.int16)  # last slot: index -1 -> ignore
            lut200 = lut20.copy()
            for oid, (_, nyu, tid) in labels.items():
                lut20[oid] = segment20_of_nyu40(nyu)
                lut200[oid] = segment200_of_id(tid)
            seg20 = lut20[instance]
            seg200 = lut200[instance]
        boxes = compute_object_boxes(coord, instance)
        row = {int(k): j for j, k in enumerate(boxes.ids)}
        for oid in sorted(labels):
            label, nyu, tid = labels[oid]
            obj = {"id": oid, "label": label, "nyu40_id": nyu, "segment20": segment20_of_nyu40(nyu),
                   "segment200": segment200_of_id(tid), "num_points": 0,
                   "min": None, "max": None, "center": None, "size": None}
            j = row.get(oid)
            if j is not None:  # an object whose segments all went to later groups has no points (no box)
                obj.update(num_points=int(boxes.count[j]), min=boxes.min[j].tolist(), max=boxes.max[j].tolist(),
                           center=boxes.center[j].tolist(), size=boxes.size[j].tolist())
            objects.append(obj)

    meta = {
        "format_version": PROCESSED_FORMAT_VERSION,
        "scene_id": scene_id,
        "sources": {role: {"file": getattr(files, role).name, "sha256": h} for role, h in hashes.items()},
        "label_tsv": {"file": Path(label_map.path).name, "sha256": label_map.sha256},
        "axis_alignment": align.tolist(),
        "axis_alignment_in_txt": m is not None,
        "num_vertices": int(n),
        "num_faces": int(mesh.faces.shape[0]),
        "num_objects": len(objects),
        "num_normal_fallback": n_fallback,
        "normal_fallback": NORMAL_FALLBACK.tolist(),
    }
    arrays = {"coord": coord, "color": rgb, "normal": normal, "superpoint": seg, "segment20": seg20,
              "segment200": seg200, "instance": instance}
    return {"scene_id": scene_id, "arrays": arrays, "objects": objects, "meta": meta}


def write_scene(scene: dict, out_dir) -> Path:
    """Write a scene of :func:`build_scene` to ``out_dir`` atomically (temp dir + rename; meta.json last)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for name, fname in SCENE_ARRAYS.items():
            np.save(tmp / fname, scene["arrays"][name])
        with open(tmp / OBJECTS_FILE, "w", encoding="utf-8") as f:
            json.dump({"scene_id": scene["scene_id"], "objects": scene["objects"]}, f, indent=1)
        delay = os.environ.get(TEST_SLEEP_ENV)
        if delay:
            time.sleep(float(delay))
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(scene["meta"], f, indent=1)
    return out_dir


class SceneResult(NamedTuple):
    """Outcome of one scene: ``status`` is ``"done"``, ``"skipped"`` (up to date) or ``"failed"``."""

    scene_id: str
    status: str
    num_vertices: int = 0
    seconds: float = 0.0
    error: str = ""


def is_up_to_date(raw_scan_dir, out_dir, label_map: LabelMap, scene_id: Optional[str] = None) -> bool:
    """True when ``out_dir/meta.json`` has this format version and the same source and tsv hashes."""
    meta_path = Path(out_dir) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != PROCESSED_FORMAT_VERSION:
            return False
        if meta.get("label_tsv", {}).get("sha256") != label_map.sha256:
            return False
        stored = {role: s["sha256"] for role, s in meta["sources"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if not all((Path(out_dir) / f).exists() for f in SCENE_ARRAYS.values()):
        return False
    return stored == source_hashes(raw_scan_dir, scene_id)


def process_scene(raw_scan_dir, out_dir, label_map: LabelMap, config: PrepConfig = PrepConfig(),
                  scene_id: Optional[str] = None, force: bool = False) -> SceneResult:
    """Process one raw scan directory into the scene directory ``out_dir`` (skipped if up to date).

    Raises :class:`ScanNetFormatError` on bad input; nothing is written then.
    """
    scene_id = scene_id or Path(raw_scan_dir).name
    t0 = time.perf_counter()
    if not force and is_up_to_date(raw_scan_dir, out_dir, label_map, scene_id):
        return SceneResult(scene_id, "skipped", seconds=time.perf_counter() - t0)
    scene = build_scene(raw_scan_dir, label_map, config, scene_id)
    write_scene(scene, out_dir)
    return SceneResult(scene_id, "done", scene["meta"]["num_vertices"], time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ many scenes

@dataclass
class PrepSummary:
    """What :func:`process_scans` did: scene ids per outcome and the error of each failed scene."""

    out_root: str
    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    results: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        lines = [f"{len(self.done)} processed, {len(self.skipped)} up to date, {len(self.failed)} failed "
                 f"-> {self.out_root} ({self.seconds:.1f} s)"]
        for sid, err in sorted(self.failed.items()):
            lines.append(f"  FAILED {sid}: {err}")
        return "\n".join(lines)


def list_scenes(raw_root) -> list[str]:
    """Scene directories under ``raw_root`` (every non-hidden subdirectory), sorted."""
    raw_root = Path(raw_root)
    if not raw_root.is_dir():
        raise FileNotFoundError(f"raw scans directory {raw_root} does not exist")
    return sorted(p.name for p in raw_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def not_raw_scans_reason(raw_root) -> Optional[str]:
    """Why ``raw_root`` is not a directory of raw scans, where its layout says so (None otherwise).

    Recognised: an empty directory, a single scan directory (its parent is the scans directory), an
    mmdetection3d / votenet export (``<id>_vert[_all].npy``) and Pointcept-processed scenes (``<id>/coord.npy``
    without a mesh). The last two need no prep: the scene loader reads them as they are.
    """
    raw_root = Path(raw_root)
    use_as_is = ("; they need no prep: scene3d reads them as they are (data.processed_dir=DIR, "
                 "prep refer --processed DIR, scene3d query CKPT DIR/<scene_id>)")
    exports = sorted({f.scene_id for p in raw_root.glob("*_vert*.npy") if (f := find_mmdet_export(p)) is not None})
    if exports:
        return (f"holds mmdetection3d/votenet exports ({len(exports)} scenes: {', '.join(exports[:3])}"
                f"{', ...' if len(exports) > 3 else ''}), not raw ScanNet scans" + use_as_is)
    if any(raw_root.glob("*_vh_clean_2.ply")):
        return f"is one scan directory; give the directory that holds it ({raw_root.parent})"
    dirs = [p for p in raw_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not dirs:
        return "holds no scan directories (<scene_id>/<scene_id>_vh_clean_2.ply, ...): zero scenes to process"
    pointcept = [p.name for p in dirs if (p / SCENE_ARRAYS["coord"]).exists() and not scene_files(p).ply.exists()]
    if len(pointcept) == len(dirs):
        kind = "scene3d-processed" if all((p / META_FILE).exists() for p in dirs) else "Pointcept-processed"
        return (f"holds {kind} scenes ({len(dirs)}: {', '.join(sorted(pointcept)[:3])}"
                f"{', ...' if len(dirs) > 3 else ''}), not raw ScanNet scans" + use_as_is)
    return None


def read_scene_list(path) -> list[str]:
    """Scene ids of a split file (one per line, blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise FileNotFoundError(f"split file {path}: {e.strerror or e}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _valid_id(scene_id: str) -> bool:
    """A plain directory name (no path separators, not hidden), so outputs stay inside ``out_root``."""
    return bool(scene_id) and not scene_id.startswith(".") and "/" not in scene_id and "\\" not in scene_id


def _clean_stale(out_root: Path, scene_id: str) -> None:
    """Remove temp/old dirs a killed run left for this scene (``atomic_dir`` names them ``.<id>.*``)."""
    for p in out_root.glob(f".{scene_id}.*"):
        if p.is_dir() and (p.name.endswith(".tmp") or ".old." in p.name):
            shutil.rmtree(p, ignore_errors=True)


#: prctl option: the signal the kernel sends this process when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def _watch_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os._exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: the worker ends when the prep process dies, even by SIGKILL.

    A killed parent runs no clean-up, so without this its workers finish their scene and then wait on the
    task queue forever. On Linux the kernel sends SIGKILL (``PR_SET_PDEATHSIG``); elsewhere a daemon thread
    polls the parent pid. The check after ``prctl`` covers a parent that died before the call. (The kernel
    signal follows the thread that started the worker: the pool is created and fed by the calling thread.)
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _run_one(raw_root: str, out_root: str, scene_id: str, label_map: LabelMap, config: PrepConfig,
             force: bool) -> SceneResult:
    """Worker body: never raises, so one bad scene never stops the others."""
    t0 = time.perf_counter()
    raw_dir = Path(raw_root) / scene_id
    try:
        if not _valid_id(scene_id):
            raise ScanNetFormatError(raw_dir, "invalid scene id (must be a plain directory name)", scene_id)
        if not raw_dir.is_dir():
            raise ScanNetFormatError(raw_dir, "missing scan directory", scene_id)
        return process_scene(raw_dir, Path(out_root) / scene_id, label_map, config, scene_id, force)
    except Exception as e:  # noqa: BLE001 - isolation: report and carry on with the other scenes
        msg = str(e) if isinstance(e, ScanNetFormatError) else f"{scene_id}: {type(e).__name__}: {e}"
        return SceneResult(scene_id, "failed", seconds=time.perf_counter() - t0, error=msg)


def process_scans(raw_root, out_root, tsv, scenes: Optional[Sequence[str]] = None, workers: int = 1,
                  force: bool = False, config: PrepConfig = PrepConfig(), progress: bool = True) -> PrepSummary:
    """Process many scans ``raw_root/<scene_id>/`` into ``out_root/<scene_id>/``.

    ``tsv`` is the label tsv path (or a :class:`LabelMap`); ``scenes`` defaults to every scan directory.
    Scenes whose ``meta.json`` hashes match their sources are skipped unless ``force``. ``workers > 1`` runs
    scenes in a process pool whose workers die with this process (even when it is killed). Failures are
    collected in the returned summary, never raised; a missing raw root, an unreadable tsv header, zero scenes
    or a root that is not raw scans (:func:`not_raw_scans_reason`) raises :class:`ScanNetFormatError` or
    ``FileNotFoundError`` (nothing could be processed).
    """
    t0 = time.perf_counter()
    label_map = tsv if isinstance(tsv, LabelMap) else read_label_tsv(tsv)
    if scenes is not None:
        scene_ids = list(dict.fromkeys(scenes))
        if not scene_ids:
            raise ScanNetFormatError(raw_root, "the scene list (--scenes / --split-file) is empty: zero scenes")
    else:
        scene_ids = list_scenes(raw_root)
        reason = not_raw_scans_reason(raw_root)
        if reason is not None:
            raise ScanNetFormatError(raw_root, reason)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    for sid in filter(_valid_id, scene_ids):
        _clean_stale(out_root, sid)
    summary = PrepSummary(str(out_root))
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(scene_ids), desc="prep scannet", unit="scene", disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    args = (str(raw_root), str(out_root))

    def record(r: SceneResult) -> None:
        summary.results.append(r)
        {"done": summary.done, "skipped": summary.skipped}.get(r.status, []).append(r.scene_id)
        if r.status == "failed":
            summary.failed[r.scene_id] = r.error
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"failed {len(summary.failed)}", refresh=False)

    if workers <= 1 or len(scene_ids) <= 1:
        for sid in scene_ids:
            record(_run_one(*args, sid, label_map, config, force))
    else:
        # fork where available: workers need no re-import, and `python -m scene3d` (whose __main__ has no
        # main guard) stays safe; the workers run numpy only, no threads of our own.
        ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futs = {pool.submit(_run_one, *args, sid, label_map, config, force): sid for sid in scene_ids}
            for fut in as_completed(futs):
                try:
                    record(fut.result())
                except Exception as e:  # a worker process died (e.g. killed, out of memory)
                    record(SceneResult(futs[fut], "failed", error=f"{futs[fut]}: worker died: {e!r}"))
    if bar is not None:
        bar.close()
    summary.done.sort()
    summary.skipped.sort()
    summary.seconds = time.perf_counter() - t0
    return summary


__all__ = [
    "LabelMap", "ObjectBoxes", "PlyMesh", "PrepConfig", "PrepSummary", "ScanNetFormatError", "SceneFiles",
    "SceneResult", "SegGroup", "apply_alignment", "build_scene", "compute_object_boxes", "instance_from_segments",
    "is_up_to_date",
    "list_scenes", "mesh_xyz_rgb", "not_raw_scans_reason", "parse_axis_alignment", "parse_ply", "process_scans", "process_scene",
    "read_aggregation", "read_axis_alignment", "read_label_tsv", "read_ply", "read_scene_list", "read_segs",
    "scene_files", "segment200_of_id", "segment20_of_nyu40", "source_hashes", "vertex_normals", "write_scene",
]
