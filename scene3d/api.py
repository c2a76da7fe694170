"""The query API: from a checkpoint and a scene to "which points are *the chair by the window*?".

::

    from scene3d import Segmenter

    seg = Segmenter.from_pretrained("runs/tiny", device="cpu")     # a checkpoint dir, its parent or a run dir
    scene = seg.load_scene("scans/scene0000_00")                    # or a mesh / point cloud / arrays
    result = seg.segment(scene, "the chair by the window")          # SegmentResult
    results = seg.segment(scene, ["the table", "all the chairs"])   # one encoded scene, one scene cache

:meth:`Segmenter.load_scene` accepts

==============================  ==============================================================================
input                           read by
==============================  ==============================================================================
processed scene3d directory     :func:`scene3d.data.scene.load_processed_scene` (``meta.json`` + ``*.npy``)
Pointcept directory             the same (``coord.npy`` ... without ``meta.json``)
mmdet3d / votenet export        the same (``<dir>/<id>_vert.npy`` or the prefix ``<dir>/<id>``)
raw ScanNet scan directory      :func:`data_prep.scannet.build_scene` in memory (nothing is written); the label
                                tsv is looked up beside the scan, else labels are left unknown
mesh / point cloud file         trimesh (``.ply .obj .off .stl .glb`` ...; vertices kept, colours if present) or
                                open3d for ``.pcd`` / ``.xyz`` / ``.pts``
arrays                          ``coord=`` [N, 3] (+ ``color``, ``normal``, ``instance``, ``superpoint``)
==============================  ==============================================================================

**Where the objects come from** (``segment(..., objects=)``): ``"auto"`` (default) takes the scene's instances
when it has any, else proposals of the default kind, :data:`DEFAULT_PROPOSALS`; ``"instances"`` insists on
instances; ``"proposals"`` takes proposals even when the scene has instances: the learned instance proposals
of ``Segmenter.proposal_model`` when one is set (:mod:`scene3d.tokenizer.instance_proposals`, trained on
annotated scans with ``scene3d prep proposals``; ``object_source`` ``"instance"``), else the geometric ones
(:func:`scene3d.tokenizer.geometric_proposals.proposal_objects`: plane removal + normal / colour / convexity
graph merging, nothing learned); ``"learned"`` the tokenizer's proposal head (class-agnostic clustering of
centre votes). The geometric proposals are the default for scans without instances because they measured
better on a real scan the head was not trained on (README, "Proposals on real scans": the head, trained on
synthetic boxes, returns one proposal of most of the room). Proposals' ``object_ids`` are -1 and results
name them by their row (``objects``); ``SegmentResult.object_source`` / ``num_proposals`` say where the
objects came from and how many there were. A proposal that holds most of the scene is named in
``SegmentResult.oversized`` and ``warnings`` and raises a :class:`DegradedSceneWarning`.

**Large scenes and the memory bound.** The model costs about 3.3 KB per point it sees (1 M points: 3.5 GiB
without a cap). A scene of more than ``Segmenter.max_points`` points (default :data:`DEFAULT_MAX_POINTS` =
200 000; ``None``: no cap) is voxel-downsampled to the model's resolution (``tokenizer.voxel_size``; one
representative per voxel and instance, :func:`scene3d.data.downsample.voxel_downsample`) before it is
encoded; where that still leaves more than ``max_points`` the voxel grows until they fit (coarser than the
model's resolution: a :class:`DegradedSceneWarning` and a line in ``warnings``). Every mask of the result still
covers every input point (each point takes its voxel's answer), boxes are measured on the input points, and
``model_points`` / ``downsample_voxel`` say what the model saw. Peak memory is then at most about
``0.45 GiB + 3.3 KB x min(N, max_points) + 110 B x N`` with the tiny CPU model, i.e. 1.6 GiB at 5 M points
(``bench/large_scene.py``: a room of 5 M points 0.92 GiB, a 24 x 18 m hall of 5 M points 1.30 GiB).

When every object scores below the decoder's threshold the result says so (``all_below_threshold`` and a line
in ``warnings``): the model does not recognise the scene's objects (README, "What to expect on real scans").

:class:`SceneData` fields (immutable; arrays are read-only):

================  ==================  ==========================================================
field             shape / dtype       meaning
================  ==================  ==========================================================
``coord``         [N, 3] float32      xyz in metres
``color``         [N, 3] uint8 | None rgb 0..255
``normal``        [N, 3] float32|None unit normals
``instance``      [N] int64 | None    object id per point, -1 none (None: use proposals)
``superpoint``    [N] int64 | None    over-segment id per point (>= 0)
``scene_id``      str                 name used in messages and output files
``source``        str                 ``scene3d``, ``pointcept``, ``mmdet3d``, ``scannet-raw``, ``mesh``,
                                      ``pointcloud`` or ``arrays``
``path``          str | None          what it was read from
``labels``        dict                object id -> class label, where the source has labels
================  ==================  ==========================================================
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from scene3d.data.augment import check_turns
from scene3d.data.downsample import Downsampled, voxel_downsample
from scene3d.data.exports import find_mmdet_export
from scene3d.data.scene import Scene, SceneFormatError, load_processed_scene
from scene3d.structures import PointBatch

#: mesh / point cloud suffixes read with open3d (trimesh has no reader for them)
OPEN3D_SUFFIXES = (".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts")
LABEL_TSV = "scannetv2-labels.combined.tsv"
#: scenes with more points are voxel-downsampled before the model sees them (module docstring)
DEFAULT_MAX_POINTS = 200_000
#: ``segment(objects=...)`` values; "auto": instances when the scene has them, else DEFAULT_PROPOSALS
OBJECT_CHOICES = ("auto", "instances", "proposals", "learned")
#: the proposals a scene without instances gets under objects="auto" (measured better than "learned")
DEFAULT_PROPOSALS = "proposals"
_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_ROWS.setflags(write=False)


class SceneLoadError(ValueError):
    """A scene could not be read or is unusable; the message names the file or the argument."""


# ------------------------------------------------------------------------------------------------ scene data
@dataclass(frozen=True, eq=False)
class SceneData:
    """One scene ready for :meth:`Segmenter.segment` (see the module docstring for the fields).

    Kept apart from :class:`~scene3d.data.scene.Scene` (a validated processed scene on disk, with objects,
    segment labels and meta): this is the user's in-memory input from any source (a mesh, a point cloud, bare
    arrays), so colours and instances may be absent, arrays are read-only, and it records ``path`` / ``labels``.
    """

    coord: np.ndarray
    color: Optional[np.ndarray] = None
    normal: Optional[np.ndarray] = None
    instance: Optional[np.ndarray] = None
    superpoint: Optional[np.ndarray] = None
    scene_id: str = "scene"
    source: str = "arrays"
    path: Optional[str] = None
    labels: dict = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(self.coord.shape[0])

    @property
    def has_instances(self) -> bool:
        return self.instance is not None and bool((self.instance >= 0).any())

    def to_points(self, device: Union[str, torch.device] = "cpu"):
        """The scene as a :class:`~scene3d.structures.PointBatch` of one (colours in [0, 1])."""
        fields = {"coord": torch.from_numpy(np.array(self.coord, dtype=np.float32))}
        if self.color is not None:
            fields["color"] = torch.from_numpy(np.asarray(self.color, dtype=np.float32) / 255.0)
        if self.normal is not None:
            fields["normal"] = torch.from_numpy(np.array(self.normal, dtype=np.float32))
        if self.superpoint is not None:
            fields["superpoint"] = torch.from_numpy(np.array(self.superpoint, dtype=np.int64))
        if self.has_instances:
            fields["instance"] = torch.from_numpy(np.array(self.instance, dtype=np.int64))
        return PointBatch.from_list([fields], scene_ids=[self.scene_id]).to(device)


def make_scene(coord, color=None, normal=None, instance=None, superpoint=None, *, scene_id: str = "scene",
               source: str = "arrays", path=None, labels: Optional[dict] = None) -> SceneData:
    """Validate and convert per-point arrays into a :class:`SceneData`.

    ``color`` may be integers 0..255 or floats in [0, 1]. Errors name ``path`` when given, else the argument.
    """
    coord = np.asarray(coord)
    where = (lambda name: f"{path}" if path is not None else f"argument {name!r}")
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise SceneLoadError(f"{where('coord')}: coordinates must be [N, 3], got shape {coord.shape}")
    if coord.dtype.kind not in "fiu":
        raise SceneLoadError(f"{where('coord')}: coordinates must be numbers, got dtype {coord.dtype}")
    n = coord.shape[0]
    if n == 0:
        raise SceneLoadError(f"{where('coord')}: the scene has no points")
    coord = coord.astype(np.float32)
    finite = np.isfinite(coord).all(axis=1)
    if not finite.any():
        raise SceneLoadError(f"{where('coord')}: every point has NaN/inf coordinates")
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SceneLoadError(f"{where('coord')}: {bad.size} of {n} points have NaN/inf coordinates "
                             f"(first at row {int(bad[0])})")

    def check_len(a, name, tail):
        a = np.asarray(a)
        if a.shape[:1] != (n,) or a.shape[1:] != tail:
            raise SceneLoadError(f"{where(name)}: {name} has shape {a.shape} but coord has {n} points; "
                                 f"expected {(n, *tail)} (arrays 'coord' and {name!r} must have the same length)")
        return a

    if color is not None:
        color = check_len(color, "color", (3,))
        if color.dtype.kind == "f":
            if not np.isfinite(color).all():
                raise SceneLoadError(f"{where('color')}: NaN/inf colours")
            scale = 255.0 if color.size and float(color.max()) <= 1.0 else 1.0
            color = np.round(color * scale)
        elif color.dtype.kind not in "iu":
            raise SceneLoadError(f"{where('color')}: colours must be numbers, got dtype {color.dtype}")
        if color.size and (color.min() < 0 or color.max() > 255):
            raise SceneLoadError(f"{where('color')}: colours must be 0..255 integers or floats in [0, 1]")
        color = color.astype(np.uint8)
    if normal is not None:
        normal = check_len(normal, "normal", (3,)).astype(np.float32)
        if not np.isfinite(normal).all():
            raise SceneLoadError(f"{where('normal')}: NaN/inf normals")
    ints = {}
    for name, a in (("instance", instance), ("superpoint", superpoint)):
        if a is None:
            ints[name] = None
            continue
        a = check_len(a, name, ())
        if a.dtype.kind not in "iu":
            raise SceneLoadError(f"{where(name)}: {name} ids must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
        lo = -1 if name == "instance" else 0
        if a.size and a.min() < lo:
            raise SceneLoadError(f"{where(name)}: {name} ids must be >= {lo}, got {int(a.min())}")
        ints[name] = a
    arrays = {"coord": coord, "color": color, "normal": normal, **ints}
    for a in arrays.values():
        if a is not None:
            a.setflags(write=False)
    return SceneData(**arrays, scene_id=str(scene_id), source=source,
                     path=None if path is None else str(path), labels=dict(labels or {}))


def scene_from_processed(scene: Scene, path=None) -> SceneData:
    """A loaded processed :class:`~scene3d.data.scene.Scene` as :class:`SceneData`."""
    return make_scene(scene.coord, scene.color, scene.normal, scene.instance, scene.superpoint,
                      scene_id=scene.scene_id, source=scene.source, path=path,
                      labels={o.id: o.label for o in scene.objects})


# ------------------------------------------------------------------------------------------------ readers
def find_raw_scan(path: Path) -> Optional[tuple[Path, str]]:
    """``(scan dir, scene id)`` when ``path`` is a raw ScanNet scan dir (or its ``_vh_clean_2.ply``) with the
    segs.json beside the mesh; None otherwise."""
    if path.is_file() and path.name.endswith("_vh_clean_2.ply"):
        d, sid = path.parent, path.name[: -len("_vh_clean_2.ply")]
    elif path.is_dir():
        d = path
        if (d / f"{d.name}_vh_clean_2.ply").exists():
            sid = d.name
        else:
            plys = sorted(d.glob("*_vh_clean_2.ply"))
            if len(plys) != 1:
                return None
            sid = plys[0].name[: -len("_vh_clean_2.ply")]
    else:
        return None
    if not (d / f"{sid}_vh_clean_2.0.010000.segs.json").exists():
        return None
    return d, sid


def read_raw_scan(scan_dir: Path, scene_id: str, label_tsv=None) -> SceneData:
    """Run the real ScanNet preparation (:func:`data_prep.scannet.build_scene`) in memory.

    The label tsv is ``label_tsv`` or ``scannetv2-labels.combined.tsv`` in the scan dir or up to two levels
    above it; without one, labels are unknown (instances are kept). Missing aggregation / txt are allowed
    (unannotated scan: proposals; identity alignment).
    """
    # only for a raw scan: data_prep (the ScanNet preparation) is not loaded to read processed scenes
    from data_prep.scannet import LabelMap, PrepConfig, ScanNetFormatError, build_scene, read_label_tsv

    if label_tsv is None:
        for d in (scan_dir, scan_dir.parent, scan_dir.parent.parent):
            if (d / LABEL_TSV).is_file():
                label_tsv = d / LABEL_TSV
                break
    # an unannotated scan (no aggregation.json) gets proposals; labels the tsv lacks stay "unknown"
    cfg = PrepConfig(allow_unannotated=True, require_txt=False, unknown_label="ignore")
    try:
        label_map = read_label_tsv(label_tsv) if label_tsv is not None else LabelMap("<no label tsv>", "", {}, {})
        d = build_scene(scan_dir, label_map, cfg, scene_id=scene_id)
    except ScanNetFormatError as e:
        raise SceneLoadError(str(e)) from None
    a = d["arrays"]
    return make_scene(a["coord"], a["color"], a["normal"], a["instance"], a["superpoint"], scene_id=scene_id,
                      source="scannet-raw", path=scan_dir, labels={o["id"]: o["label"] for o in d["objects"]})


def read_point_file(path: Path, scene_id: Optional[str] = None) -> SceneData:
    """A mesh or point cloud file: trimesh for meshes and PLY/OBJ/OFF/STL/GLB point sets, open3d for PCD.

    Meshes keep their vertices (with vertex normals and colours where present); a textured mesh's colours
    come from trimesh's ``to_color`` conversion.
    """
    sid = scene_id or path.stem
    if path.suffix.lower() in OPEN3D_SUFFIXES:
        return _read_open3d(path, sid)
    import trimesh

    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as e:  # trimesh raises many types (ValueError, KeyError, NotImplementedError, ...)
        raise SceneLoadError(f"{path}: not a mesh or point cloud trimesh can read ({type(e).__name__}: {e})") \
            from None
    if isinstance(loaded, trimesh.Scene):
        geoms = [g for g in loaded.dump() if hasattr(g, "vertices")] if loaded.geometry else []
        if not geoms:
            raise SceneLoadError(f"{path}: the file holds no mesh or point geometry")
        try:
            loaded = trimesh.util.concatenate(geoms) if len(geoms) > 1 else geoms[0]
        except Exception as e:  # e.g. meshes mixed with point sets
            raise SceneLoadError(f"{path}: cannot merge its {len(geoms)} geometries ({e})") from None
    if not hasattr(loaded, "vertices"):
        raise SceneLoadError(f"{path}: not a mesh or point cloud ({type(loaded).__name__})")
    coord = np.asarray(loaded.vertices, dtype=np.float64)
    if coord.shape[0] == 0:
        raise SceneLoadError(f"{path}: the file has no points")
    color = normal = None
    if isinstance(loaded, trimesh.Trimesh):
        source = "mesh"
        vis = loaded.visual
        if vis is not None and vis.kind == "texture":
            vis = vis.to_color()
        if vis is not None and vis.kind == "vertex":
            color = np.asarray(vis.vertex_colors)[:, :3]
        elif vis is not None and vis.kind == "face":  # spread face colours to their vertices
            color = np.zeros((len(coord), 3), np.float64)
            cnt = np.zeros(len(coord))
            fc = np.asarray(vis.face_colors)[:, :3].astype(np.float64)
            for k in range(3):
                np.add.at(color, loaded.faces[:, k], fc)
                np.add.at(cnt, loaded.faces[:, k], 1)
            color = np.where(cnt[:, None] > 0, color / np.maximum(cnt, 1)[:, None], 128).round().astype(np.uint8)
        if len(loaded.faces) and np.isfinite(coord).all():
            normal = np.asarray(loaded.vertex_normals, dtype=np.float32)
            if not np.isfinite(normal).all():
                normal = None
    else:  # trimesh.PointCloud
        source = "pointcloud"
        c = getattr(loaded, "colors", None)
        if c is not None and len(c) == len(coord):
            color = np.asarray(c)[:, :3]
    return make_scene(coord, color, normal, scene_id=sid, source=source, path=path)


def _read_open3d(path: Path, sid: str) -> SceneData:
    try:
        import open3d as o3d
    except ImportError:
        raise SceneLoadError(f"{path}: reading {path.suffix} files needs open3d (pip install open3d-cpu)") from None
    if path.stat().st_size == 0:
        raise SceneLoadError(f"{path}: empty file, not a point cloud")
    pcd = o3d.io.read_point_cloud(str(path), print_progress=False)
    coord = np.asarray(pcd.points, dtype=np.float64)
    if coord.shape[0] == 0:
        raise SceneLoadError(f"{path}: no points could be read (not a point cloud open3d reads, or empty)")
    color = np.asarray(pcd.colors, dtype=np.float64) if pcd.has_colors() else None
    normal = np.asarray(pcd.normals, dtype=np.float32) if pcd.has_normals() else None
    return make_scene(coord, color, normal, scene_id=sid, source="pointcloud", path=path)


def load_scene(path=None, *, coord=None, color=None, normal=None, instance=None, superpoint=None,
               scene_id: Optional[str] = None, label_tsv=None) -> SceneData:
    """Read a scene from ``path`` (any input of the module docstring) or build it from arrays."""
    if path is None:
        if coord is None:
            raise SceneLoadError("load_scene needs a path or coord= (an [N, 3] array)")
        return make_scene(coord, color, normal, instance, superpoint, scene_id=scene_id or "scene")
    if coord is not None or any(a is not None for a in (color, normal, instance, superpoint)):
        raise SceneLoadError("load_scene takes either a path or arrays (coord=...), not both")
    p = Path(path)
    raw = find_raw_scan(p)
    if raw is not None:
        return read_raw_scan(raw[0], scene_id or raw[1], label_tsv)
    if p.is_dir() or find_mmdet_export(p) is not None:
        try:
            sd = scene_from_processed(load_processed_scene(p), path=p)
        except SceneFormatError as e:
            raise SceneLoadError(str(e)) from None
        except FileNotFoundError:
            plys = sorted(p.glob("*_vh_clean_2.ply")) if p.is_dir() else []
            if plys:
                raise SceneLoadError(f"{p}: looks like a raw ScanNet scan ({plys[0].name}) but "
                                     f"{plys[0].name[:-4]}.0.010000.segs.json is missing; pass the mesh file "
                                     "itself to read it as a plain mesh") from None
            raise SceneLoadError(f"{p}: not a scene directory (no meta.json / coord.npy of a processed scene, no "
                                 f"<id>_vh_clean_2.ply + segs.json of a raw ScanNet scan)") from None
        return sd if scene_id is None else _renamed(sd, scene_id)
    if not p.exists():
        raise FileNotFoundError(f"scene not found: {p}")
    return read_point_file(p, scene_id)


def _renamed(sd: SceneData, scene_id: str) -> SceneData:
    import dataclasses

    return dataclasses.replace(sd, scene_id=str(scene_id))


# ------------------------------------------------------------------------------------------------ results
class ObjectsOverflowWarning(UserWarning):
    """A scene has more objects than the model has identifiers; some are left out of the LLM prompt."""


class UnknownWordsWarning(UserWarning):
    """A query holds words that the model's tokenizer maps to its unknown token."""


class DegradedSceneWarning(UserWarning):
    """A scene the model sees worse than it should: downsampled coarser than the model's resolution, or a
    proposal that swallows most of the scene (also in ``SegmentResult.warnings``)."""


class SegmentResult(NamedTuple):
    """One query's answer on one scene (``T`` chosen objects, ``M`` objects in the scene, ``N`` points).

    ===================  ==============  ==============================================================
    field                shape / dtype   meaning
    ===================  ==============  ==============================================================
    ``text``             str             the query
    ``point_mask``       [N] bool        points of the chosen objects (union)
    ``object_masks``     [T, N] bool     points of each chosen object
    ``objects``          [T] int64       rows of the chosen objects among the scene's ``M`` objects
    ``object_ids``       [T] int64       their source object ids (-1 for proposals)
    ``scores``           [T] float32     decoder target score of each chosen object (sigmoid)
    ``boxes``            [T, 6] float32  axis-aligned box of each chosen object: center xyz, size xyz
    ``all_scores``       [M] float32     decoder target score of every object
    ``decoder_mask``     [N] bool        the dense decoder's own mask (threshold 0.5)
    ``answer``           str             the generated answer text (identifiers + ``[SEG]``)
    ``identifiers``      list[str]       identifiers named in the answer
    ``source``           str             ``identifiers`` (named by the answer), ``decoder`` (scores >=
                                         threshold) or ``none`` (zero targets)
    ``proposals``        bool            objects came from proposals (geometric or learned), not instances
    ``object_source``    str             ``instances``, ``geometric``, ``instance`` (learned instance
                                         proposals, ``Segmenter.proposal_model``) or ``learned`` (proposal head)
    ``num_proposals``    int             proposals the model was given (0 with instances)
    ``num_candidates``   int             geometric: overlapping proposals before they were made disjoint
    ``unknown_words``    list[str]       words of the query the model's tokenizer reads as its unknown
                                         token (also warned about); the answer cannot use them
    ``left_out_ids``     [L] int64       source ids (or proposal rows) of the objects that got no identifier
                                         (more objects than the model has identifiers; warned about): the
                                         LLM's answer cannot name them, the decoder still scores them
    ``text_tokens_dropped`` int          tokens cut from the end of a query longer than the model's
                                         ``prompt.max_text_tokens`` (also warned about); 0 when whole
    ``model_points``     int             points the model saw (< N when downsampled; masks still [N])
    ``downsample_voxel`` float | None    voxel edge (m) of the downsampling, None when not downsampled
    ``all_below_threshold`` bool         every object scored below the decoder threshold: the model found
                                         nothing it knows here (``warnings`` says so)
    ``oversized``        [K] int64       rows of proposals holding most (> half) of the scene's points
    ``object_names``     tuple[str]      [T] class name the prompt gave each chosen object (a model whose
                                         prompt writes names: ``referring.object_labels``; predicted by
                                         its label model); empty for a model that writes none
    ``warnings``         tuple[str]      what degrades this answer, in words: a scene downsampled coarser
                                         than the model, oversized proposals, every score below the
                                         threshold (empty: none; words, text and objects left out have
                                         the fields above)
    ===================  ==============  ==============================================================
    """

    text: str
    point_mask: np.ndarray
    object_masks: np.ndarray
    objects: np.ndarray
    object_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    all_scores: np.ndarray
    decoder_mask: np.ndarray
    answer: str
    identifiers: list
    source: str
    proposals: bool
    unknown_words: list = []
    text_tokens_dropped: int = 0
    left_out_ids: np.ndarray = np.zeros(0, np.int64)
    model_points: int = -1
    downsample_voxel: Optional[float] = None
    all_below_threshold: bool = False
    oversized: np.ndarray = _NO_ROWS
    warnings: tuple = ()
    object_source: str = "instances"
    num_proposals: int = 0
    num_candidates: int = 0
    object_names: tuple = ()
    #: orientations the scene was answered in (``Segmenter.turns``, test-time quarter turns) and the share of
    #: them that gave this answer (scene3d.models.turns); 1 and 1.0 without turns
    turns: int = 1
    agreement: float = 1.0

    @property
    def num_points(self) -> int:
        return int(self.point_mask.sum())

    @property
    def downsampled(self) -> bool:
        return self.downsample_voxel is not None


class EncodedScene(NamedTuple):
    """What :meth:`Segmenter.encode` caches per scene: the segmenter inputs (of the downsampled scene when
    ``downsample`` is set), whether objects are proposals, oversized proposal rows and scene warnings."""

    inputs: object  # scene3d.models.referring.SceneInputs
    proposals: bool
    downsample: Optional[Downsampled] = None
    oversized: np.ndarray = _NO_ROWS
    warnings: tuple = ()
    object_source: str = "instances"  # instances | geometric | instance | learned
    num_proposals: int = 0
    num_candidates: int = 0


# ------------------------------------------------------------------------------------------------ segmenter
class Segmenter:
    """A trained :class:`~scene3d.models.pipeline.Scene3DModel` behind a small API (module docstring).

    The last encoded scene (backbone, proposals, object tokens) is cached, so several ``segment`` calls on
    the same :class:`SceneData` encode it once; a list of queries also shares one LLM prefix cache.
    ``max_points`` (attribute, may be changed): scenes with more points are voxel-downsampled first (module
    docstring, "Large scenes"); ``None``: never.
    """

    def __init__(self, model, device: Union[str, torch.device] = "cpu", config: Optional[dict] = None,
                 checkpoint: Optional[str] = None, step: Optional[int] = None,
                 max_points: Optional[int] = DEFAULT_MAX_POINTS, proposal_model=None, label_model=None,
                 turns: int = 1) -> None:
        self.model = model.to(device).eval()
        if label_model is not None:
            # names the objects of a model whose prompt writes class names (referring.object_labels); the
            # checkpoint's own model.label_model otherwise
            self.model.set_label_model(label_model)
        #: learned instance proposals (an InstanceProposer or its directory, ``scene3d prep proposals``) used
        #: for objects="proposals" (and "auto" without instances) instead of the geometric ones; may be changed
        self.proposal_model = proposal_model
        self.device = torch.device(device)
        self.config = config or {}
        self.checkpoint = checkpoint
        self.step = step
        self.max_points = max_points
        #: test-time quarter turns (attribute, may be changed): each query is also answered on the scene turned
        #: 1..turns-1 quarter turns about z (its compass words with it) and keeps the answer most orientations
        #: gave (scene3d.models.turns); costs one more encoding and LLM pass per orientation. 1: never
        self.turns = check_turns(turns, "turns")
        self._cached: Optional[tuple] = None  # (scene, object mode, max_points, encoding, proposal model)

    @classmethod
    def from_pretrained(cls, ckpt_dir, device: Union[str, torch.device] = "cpu",
                        proposal_model=None, label_model=None, turns: int = 1) -> "Segmenter":
        """Load a checkpoint written by ``scene3d train`` (the dir, its ``checkpoints/`` parent or the run dir;
        the newest checkpoint is used). No hydra, no pickle. ``proposal_model``: a learned instance-proposal
        model directory (``scene3d prep proposals``) for scans without instances; ``label_model``: one that
        names the objects, for a model whose prompt writes class names (default: the checkpoint's own)."""
        from scene3d.models.loading import load_model  # the model stack loads with a model, not on import

        p = Path(ckpt_dir)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        loaded = load_model(p, device)
        return cls(loaded.model, device, loaded.config, loaded.path, loaded.step, proposal_model=proposal_model,
                   label_model=label_model, turns=turns)

    @property
    def proposal_model(self):
        """The learned instance proposals, or None (geometric proposals)."""
        return self._proposal_model

    @proposal_model.setter
    def proposal_model(self, value) -> None:
        if value is not None:
            # spconv loads with a model, not on `import scene3d.api`
            from scene3d.tokenizer.instance_proposals import as_proposer

            value = as_proposer(value)
        self._proposal_model = value
        self._cached = None

    # -- scenes ---------------------------------------------------------------------------------------------
    def load_scene(self, path=None, *, coord=None, color=None, normal=None, instance=None, superpoint=None,
                   scene_id: Optional[str] = None, label_tsv=None) -> SceneData:
        """See :func:`load_scene`."""
        return load_scene(path, coord=coord, color=color, normal=normal, instance=instance, superpoint=superpoint,
                          scene_id=scene_id, label_tsv=label_tsv)

    def downsample(self, scene: SceneData) -> tuple[SceneData, Optional[Downsampled]]:
        """The scene the model sees: ``scene`` itself when it has at most ``max_points`` points, else its
        voxel downsampling at the model's resolution (coarser if needed) and the map back to its points."""
        if self.max_points is not None and self.max_points < 1:
            raise ValueError(f"max_points must be >= 1 or None, got {self.max_points}")
        if self.max_points is None or scene.num_points <= self.max_points:
            return scene, None
        d = voxel_downsample(scene.coord, self.model.config.tokenizer.voxel_size, color=scene.color,
                             normal=scene.normal, instance=scene.instance if scene.has_instances else None,
                             superpoint=scene.superpoint, max_points=self.max_points)
        small = make_scene(d.coord, d.color, d.normal, d.instance, d.superpoint, scene_id=scene.scene_id,
                           source=scene.source, path=scene.path, labels=scene.labels)
        return small, d

    @staticmethod
    def object_mode(scene: SceneData, objects: Optional[str] = "auto", proposals: bool = False) -> str:
        """Where ``scene``'s objects come from: ``instances``, ``proposals`` (geometric) or ``learned``, from
        ``objects`` (:data:`OBJECT_CHOICES`) and the older flag ``proposals`` (= ``objects="proposals"``)."""
        objects = "auto" if objects is None else objects
        if objects not in OBJECT_CHOICES:
            raise ValueError(f"objects: expected one of {', '.join(OBJECT_CHOICES)}, got {objects!r}")
        if proposals:
            if objects not in ("auto", "proposals"):
                raise ValueError(f"proposals=True contradicts objects={objects!r}")
            return "proposals"
        if objects == "instances" and not scene.has_instances:
            raise ValueError(f"scene {scene.scene_id!r} has no instance ids (objects='instances'); use "
                             "objects='proposals' or 'auto'")
        if objects == "auto":
            return "instances" if scene.has_instances else DEFAULT_PROPOSALS
        return objects

    @torch.no_grad()
    def encode(self, scene: SceneData, proposals: bool = False, objects: Optional[str] = "auto") -> EncodedScene:
        """Tokenize ``scene`` (cached for the last scene). Objects per :meth:`object_mode` (module docstring,
        "Where the objects come from"). Scenes over ``max_points`` are downsampled first (:meth:`downsample`);
        geometric proposals are made on the whole scene and carried to its representatives."""
        if not isinstance(scene, SceneData):
            raise TypeError(f"scene must be a SceneData (from load_scene), got {type(scene).__name__}")
        mode = self.object_mode(scene, objects, proposals)
        c = self._cached
        if c is not None and c[0] is scene and c[1] == mode and c[2] == self.max_points and c[4] is self.proposal_model:
            return c[3]
        full = scene
        scene, down = self.downsample(full)
        notes = []
        if down is not None and down.coarsened:
            notes.append(f"scene {full.scene_id!r}: {full.num_points} points do not fit max_points={self.max_points} "
                         f"at the model's voxel ({down.model_voxel:g} m); the model saw {down.num_points} points at "
                         f"{down.voxel_size:.3g} m, coarser than its resolution")
        points = scene.to_points(self.device)
        if down is not None:  # proposal sizes count the input points each representative stands for
            points = points.replace(weight=torch.from_numpy(down.counts).to(self.device, torch.float64))
        num_proposals = num_candidates = 0
        source = {"instances": "instances", "learned": "learned",
                  "proposals": "geometric" if self.proposal_model is None else "instance"}[mode]
        if mode == "instances":
            objects = points.instance
        elif mode == "proposals":
            # open3d / scipy / spconv proposals load with a model, not on `import scene3d.api`
            from scene3d.tokenizer.instance_proposals import scan_objects

            prop = scan_objects(full.coord, full.color, self.proposal_model, what=f"scene {full.scene_id!r}")
            labels = prop.labels
            if down is not None:  # each representative takes the proposal of (one of) its input points
                small = np.full(down.num_points, -1, np.int64)
                small[down.inverse] = labels
                labels = small
            num_candidates = prop.num_candidates
            objects = torch.from_numpy(labels).to(self.device)
        else:
            objects = None  # the tokenizer's proposal head
        self.model.eval()
        inputs, _ = self.model.encode(points, objects)
        m = inputs.tokens.num_objects
        if m == 0:
            how = {"instances": "no instances",
                   "proposals": "the geometric proposals found no object of at least 100 points"
                                if self.proposal_model is None else "the learned instance proposals found no object",
                   "learned": "the proposal head found no object (ProposalConfig.min_points="
                              f"{self.model.config.tokenizer.proposal.min_points})"}[mode]
            raise ValueError(f"scene {scene.scene_id!r} ({scene.num_points} points) has no objects: {how}")
        if mode != "instances":
            num_proposals = m
        k = self.model.segmenter.vocab.num_identifiers
        if m > k and self.model.segmenter.config.overflow == "error":
            raise ValueError(f"scene {scene.scene_id!r} has {m} objects but the model has {k} identifiers; "
                             "raise llm.num_obj_tokens or set referring.overflow='topk' in the model config")
        if m > k:
            warnings.warn(f"scene {scene.scene_id!r} has {m} objects but the model has {k} identifiers: the {k} "
                          f"with the most points get identifiers, {m - k} are left out of the LLM prompt (the "
                          "result's left_out_ids; the decoder still scores them). Real ScanNet scenes reach ~150 "
                          "objects: llm=smollm2 has 200 identifiers", ObjectsOverflowWarning, stacklevel=3)
        oversized = _NO_ROWS
        if mode != "instances":
            # the tokenizer (spconv) loads with a model, not on `import scene3d.api`
            from scene3d.tokenizer.proposals import OVERSIZED_FRACTION, oversized_proposals

            weight = None if down is None else torch.from_numpy(down.counts).to(inputs.tokens.point2obj.device)
            oversized = oversized_proposals(inputs.tokens.point2obj, m, weight).cpu().numpy()
            if oversized.size:
                p2o = inputs.tokens.point2obj.cpu().numpy()
                w = np.ones(len(p2o)) if down is None else down.counts
                share = ", ".join(f"{int(r)} ({w[p2o == r].sum() / w.sum():.0%})" for r in oversized)
                who = ("the proposal head did not separate the objects (a head trained on other kinds of scenes)"
                       if mode == "learned" else f"the {source} proposals did not separate the objects")
                notes.append(f"proposal {share} of scene {full.scene_id!r} holds more than "
                             f"{OVERSIZED_FRACTION:.0%} of its points: {who}, so answers here are unreliable; "
                             "give instance ids if you have them")
        for note in notes:
            warnings.warn(note, DegradedSceneWarning, stacklevel=3)
        enc = EncodedScene(inputs, mode != "instances", down, oversized, tuple(notes), source, num_proposals,
                           num_candidates)
        self._cached = (full, mode, self.max_points, enc, self.proposal_model)
        return enc

    def segment(self, scene: SceneData, text: Union[str, Sequence[str]], proposals: bool = False,
                objects: Optional[str] = "auto"):
        """Answer one query (``str`` -> :class:`SegmentResult`) or several (list -> list, one encoded scene).

        ``objects``: ``auto`` | ``instances`` | ``proposals`` | ``learned`` (module docstring, "Where the
        objects come from"); ``proposals=True`` is the older spelling of ``objects="proposals"``."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not single and not texts:
            raise ValueError("text: an empty list of queries")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"text[{i}]: a query must be a str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError("text: the query is empty" if single else f"text[{i}]: the query is empty")
        from scene3d.llm.prompt import text_token_ids, unknown_words  # loads with a model, not on import

        cap = self.model.segmenter.config.prompt.max_text_tokens
        text_tokenizer = self.model.segmenter.text_tokenizer
        dropped = [text_token_ids(text_tokenizer, t.strip(), cap, warn=False).dropped for t in texts]
        unknown = [unknown_words(text_tokenizer, t) for t in texts]
        for t, u in zip(texts, unknown):
            if u:
                warnings.warn(f"query {t!r}: the model's tokenizer does not know {', '.join(map(repr, u))} "
                              f"(read as {text_tokenizer.unk_token}); the answer ignores "
                              f"{'them' if len(u) > 1 else 'it'}", UnknownWordsWarning, stacklevel=2)
        enc = self.encode(scene, proposals, objects)
        turns = check_turns(self.turns, "Segmenter.turns")
        preds = self.model.predict_encoded(enc.inputs, [t.strip() for t in texts], use_cache=True, turns=turns)
        results = [self._turned(self._result(enc, t, p, scene)._replace(unknown_words=u, text_tokens_dropped=d),
                                turns, p.agreement)
                   for t, p, u, d in zip(texts, preds, unknown, dropped)]
        return results[0] if single else results

    @staticmethod
    def _turned(result: SegmentResult, turns: int, agreement: float) -> SegmentResult:
        """``result`` with how many orientations answered and agreed; a warning when they disagree (measured on
        the real rescan, such answers are right far less often than unanimous ones: README, test-time turns)."""
        result = result._replace(turns=turns, agreement=agreement)
        if agreement < 1.0:
            note = (f"the orientations disagree: {round(agreement * turns)} of {turns} quarter turns gave this answer, "
                    "so it is unreliable")
            result = result._replace(warnings=(*result.warnings, note))
        return result

    @staticmethod
    def _ids_of(tokens, rows) -> np.ndarray:
        """Source object ids of local ``rows`` (the rows themselves for proposals, which have no ids)."""
        if rows is None or not rows.numel():
            return np.zeros(0, np.int64)
        rows = rows.long().cpu()
        if tokens.object_ids is None:
            return rows.numpy()
        return tokens.object_ids.cpu()[rows].long().numpy()

    def _result(self, enc: EncodedScene, text: str, pred, scene: SceneData) -> SegmentResult:
        tokens = enc.inputs.tokens
        rows = pred.objects.long()
        p2o = tokens.point2obj
        masks = (p2o[None, :] == rows.to(p2o.device)[:, None]).cpu().numpy()  # (T, N model points)
        point_mask, decoder_mask = pred.point_mask.cpu().numpy(), pred.decoder_mask.cpu().numpy()
        d = enc.downsample
        if d is None and not any(enc.inputs.frame_turns or ()):
            boxes = torch.cat([tokens.center[rows], tokens.size[rows]], 1).float().cpu().numpy()
        else:  # boxes measured on the input points: the model's points were downsampled or turned (canonical_frame)
            if d is not None:  # back to every input point
                masks, point_mask, decoder_mask = masks[:, d.inverse], point_mask[d.inverse], decoder_mask[d.inverse]
            boxes = np.zeros((len(masks), 6), np.float32)
            for t, mask in enumerate(masks):
                c = scene.coord[mask]
                lo, hi = c.min(0), c.max(0)
                boxes[t] = np.r_[(lo + hi) / 2, hi - lo]
        scores = pred.obj_scores.float().cpu()
        answer = self.model.segmenter.text_tokenizer.decode(pred.answer_ids, skip_special_tokens=False)
        threshold = self.model.segmenter.config.threshold
        best = float(scores.max()) if scores.numel() else 0.0
        below = bool(scores.numel()) and best < threshold
        notes = list(enc.warnings)
        if below:
            picked = (f"the {len(rows)} object(s) returned are only the best of weak candidates" if len(rows)
                      else "nothing was returned")
            notes.append(f"every object scored below the decoder threshold {threshold:g} (best {best:.3f}): "
                         f"{picked}; the model does not recognise this scene's objects (a checkpoint trained on "
                         "other kinds of scenes, e.g. the synthetic demo on a real scan; see the README)")
        return SegmentResult(
            text=text, point_mask=point_mask, object_masks=masks,
            objects=rows.cpu().numpy(),
            object_ids=(np.full(len(rows), -1, np.int64) if enc.proposals else pred.object_ids.long().cpu().numpy()),
            scores=scores[rows.cpu()].numpy(), boxes=boxes, all_scores=scores.numpy(),
            decoder_mask=decoder_mask, answer=answer, identifiers=list(pred.identifiers),
            source=pred.source, proposals=enc.proposals, left_out_ids=self._ids_of(tokens, pred.left_out),
            model_points=int(tokens.point2obj.shape[0]),
            downsample_voxel=None if d is None else d.voxel_size, all_below_threshold=below,
            oversized=enc.oversized, warnings=tuple(notes), object_source=enc.object_source,
            num_proposals=enc.num_proposals, num_candidates=enc.num_candidates,
            object_names=() if enc.inputs.object_names is None else
            tuple(enc.inputs.object_names[int(r)] or "" for r in rows.tolist()))


__all__ = ["DEFAULT_MAX_POINTS", "DEFAULT_PROPOSALS", "OBJECT_CHOICES", "DegradedSceneWarning", "Downsampled", "EncodedScene", "SceneData", "SceneLoadError",
           "SegmentResult", "ObjectsOverflowWarning", "UnknownWordsWarning", "Segmenter", "load_scene", "make_scene"]
