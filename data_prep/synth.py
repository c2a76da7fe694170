"""Synthetic scenes written exactly in ScanNet's raw formats (the project's own fixtures and benchmark).

``generate_dataset(out_dir, num_scenes, seed, preset)`` writes::

    out_dir/
      scans/<scene_id>/<scene_id>_vh_clean_2.ply                 binary little endian mesh, misaligned
      scans/<scene_id>/<scene_id>_vh_clean_2.0.010000.segs.json  {params, sceneId, segIndices}
      scans/<scene_id>/<scene_id>.aggregation.json               {sceneId, appId, segGroups, segmentsFile}
      scans/<scene_id>/<scene_id>.txt                            axisAlignment = 16 floats (+ camera keys)
      scannetv2-labels.combined.tsv                              the real 17 columns, rows of used categories
      splits/train.txt, splits/val.txt                           scene ids, one per line
      synth_layout.json                                          per scene: objects with aligned boxes, colours,
                                                                 support relations (ground truth for the
                                                                 synthetic referring expressions)
      referring/                                                 synthetic referring expressions
                                                                 (data_prep.synth_refer) and their val
                                                                 paraphrase split (data_prep.paraphrase)

Rooms have a floor and walls (split into several wall objects as ScanNet annotates them), a door and a
window, and furniture groups of real ScanNet raw categories whose relations later become words: chairs
around a table, a monitor and a lamp on a desk, pillows on a bed, a lamp on a nightstand, a box on a
cabinet. Meshes are built from trimesh primitives and densified with ``trimesh.remesh.subdivide_to_size``
to ScanNet's vertex density (``real``: ~150k vertices) or to a few thousand vertices (``tiny``).

Over-segmentation imitates ScanNet's: surface patches grouped by part, dominant normal direction and a
spatial cell, so an object spans several segments; segment ids are the index of a vertex of the segment,
as in ScanNet. A little clutter is left out of every segGroup, so some vertices are unannotated.

Scenes are generated axis-aligned (z up, floor at z=0, room in [0, W] x [0, D]) and written misaligned by
the inverse of a random ``axisAlignment`` matrix M (aligned = M @ raw), as ScanNet's are.
Everything is a deterministic function of ``seed``: the same seed writes the same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import trimesh
from tqdm.auto import tqdm

from data_prep.paraphrase import write_paraphrase_files
from data_prep.synth_refer import write_referring_files
from scene3d.utils.io import atomic_dir, write_json_atomic, write_text_atomic

# --------------------------------------------------------------------------------------------------
# Label table: the rows of ScanNet's scannetv2-labels.combined.tsv for the categories used here
# (values as in the ScanNet release, so ScanNet-20/200 and nyu40 mappings of real data apply unchanged).
# --------------------------------------------------------------------------------------------------
TSV_COLUMNS = [
    "id", "raw_category", "category", "count", "nyu40id", "eigen13id", "nyuClass", "nyu40class",
    "eigen13class", "ModelNet40", "ModelNet10", "ShapeNetCore55", "synsetoffset", "wnsynsetid",
    "wnsynsetkey", "mpcat40", "mpcat40index",
]
LABEL_ROWS = [
    "1	wall	wall	8277	1	12	wall	wall	Wall					n04546855	wall.n.01	wall	1",
    "2	chair	chair	4646	5	4	chair	chair	Chair	chair	chair	chair	3001627	n03001627	chair.n.01	chair	3",
    "3	floor	floor	1553	2	5	floor	floor	Floor					n03365592	floor.n.01	floor	2",
    "4	table	table	1170	7	10	table	table	Table	table	table	table	4379243	n04379243	table.n.02	table	5",
    "5	door	door	1483	8	12	door	door	Wall	door				n03221720	door.n.01	door	4",
    "7	cabinet	cabinet	731	3	6	cabinet	cabinet	Furniture			cabinet	2933112	n02933112	cabinet.n.01	cabinet	7",
    "9	desk	desk	680	14	10	desk	desk	Table	desk	desk	table	4379243	n03179701	desk.n.01	table	5",
    "11	bed	bed	370	4	1	bed	bed	Bed	bed	bed	bed	2818832	n02818832	bed.n.01	bed	11",
    "13	pillow	pillow	937	18	7	pillow	pillow	Objects			pillow	3938244	n03938244	pillow.n.01	cushion	8",
    "16	window	window	1209	9	13	window	window	Window					n04587648	window.n.01	window	9",
    "18	bookshelf	bookshelf	360	10	6	bookshelf	bookshelf	Furniture	bookshelf		bookshelf	2871439	n02871439	bookshelf.n.01	shelving	31",
    "19	monitor	monitor	765	40	7	monitor	otherprop	Objects	monitor	monitor	tv or monitor	3211117	n03782190	monitor.n.04	objects	39",
    "26	box	box	775	29	7	box	box	Objects					n02883344	box.n.01	objects	39",
    "28	lamp	lamp	419	35	7	lamp	lamp	Objects	lamp		lamp	3636649	n03636649	lamp.n.02	lighting	28",
    "34	nightstand	nightstand	224	32	6	night stand	night stand	Furniture	night_stand	night_stand			n03015254	chest_of_drawers.n.01	chest_of_drawers	13",
    "56	trash can	trash can	1090	39	6	garbage bin	otherfurniture	Furniture			trash_bin	2747177	n02747177	ashcan.n.01	objects	39",
    "1313	sofa	sofa	1	6	9	sofa	sofa	Sofa	sofa	sofa	sofa	4256520	n04256520	sofa.n.01	sofa	10",
]
NYU40 = {row.split("\t")[1]: int(row.split("\t")[4]) for row in LABEL_ROWS}
STRUCTURAL = ("wall", "floor")

#: Named colours (rgb 0..255); expressions use the names, so they must be far apart.
PALETTE = {
    "red": (200, 40, 40), "green": (50, 160, 60), "blue": (40, 70, 200), "yellow": (225, 200, 40),
    "black": (30, 30, 30), "white": (235, 235, 235), "brown": (130, 80, 40), "gray": (128, 128, 128),
}
SEG_PARAMS = {  # the keys and string values ScanNet's segmentator writes
    "kThresh": "0.0001", "segMinVerts": "20", "minPoints": "750", "maxPoints": "30000",
    "thinThresh": "0.05", "flatThresh": "0.001", "minLength": "0.02", "maxLength": "1",
}


@dataclass(frozen=True)
class Preset:
    target_vertices: int      # approximate vertex count of a scene
    room_size: tuple          # (min, max) side length of the room in metres
    groups: tuple             # (min, max) number of furniture groups
    seg_cell: float           # spatial cell of the over-segmentation, metres


PRESETS = {
    "tiny": Preset(target_vertices=4_000, room_size=(4.0, 6.0), groups=(3, 4), seg_cell=1.0),
    "real": Preset(target_vertices=125_000, room_size=(6.5, 9.0), groups=(9, 11), seg_cell=0.4),
}
ROOM_HEIGHT = 2.6


# --------------------------------------------------------------------------------------------------
# Object specs
# --------------------------------------------------------------------------------------------------
@dataclass
class Part:
    mesh: trimesh.Trimesh  # in object-local coordinates (z up, base at z=0, centred on x,y)


@dataclass
class ObjectSpec:
    label: str
    color_name: str
    parts: list
    on_top_of: Optional[int] = None     # index into the scene's object list
    annotated: bool = True              # False for clutter left out of every segGroup
    structural: bool = False
    mesh: Optional[trimesh.Trimesh] = None  # world (aligned) mesh, set when placed
    part_index: Optional[np.ndarray] = None


def _box(ex, ey, ez, cx=0.0, cy=0.0, z0=0.0) -> trimesh.Trimesh:
    """An axis-aligned box with extents (ex, ey, ez), base at z0, centred on (cx, cy)."""
    m = trimesh.creation.box(extents=[ex, ey, ez])
    m.apply_translation([cx, cy, z0 + ez / 2])
    return m


def _cylinder(r, h, cx=0.0, cy=0.0, z0=0.0, sections=12) -> trimesh.Trimesh:
    m = trimesh.creation.cylinder(radius=r, height=h, sections=sections)
    m.apply_translation([cx, cy, z0 + h / 2])
    return m


def _legs(ex, ey, h, t=0.05):
    return [_box(t, t, h, sx * (ex / 2 - t), sy * (ey / 2 - t)) for sx in (-1, 1) for sy in (-1, 1)]


def make_object(label: str, rng: np.random.Generator, scale: float = 1.0) -> list:
    """Parts (object-local trimeshes) of one object of a ScanNet raw category; sizes vary with ``scale``."""
    s = scale
    if label == "chair":
        w = 0.45 * s
        seat = 0.45
        return [_box(w, w, 0.06, z0=seat), _box(w, 0.06, 0.45 * s, cy=w / 2 - 0.03, z0=seat + 0.06)] + _legs(w, w, seat)
    if label == "table":
        ex, ey = rng.uniform(1.0, 1.6) * s, rng.uniform(0.7, 1.0) * s
        return [_box(ex, ey, 0.05, z0=0.72)] + _legs(ex, ey, 0.72)
    if label == "desk":
        ex, ey = rng.uniform(1.1, 1.5) * s, 0.65
        return [_box(ex, ey, 0.04, z0=0.73), _box(0.05, ey, 0.73, cx=-ex / 2 + 0.025),
                _box(0.45, ey, 0.73, cx=ex / 2 - 0.225)]
    if label == "bed":
        ex, ey = 1.6 * s, 2.0
        return [_box(ex, ey, 0.5), _box(ex, 0.08, 1.0, cy=ey / 2 - 0.04)]
    if label == "sofa":
        ex, ey = rng.uniform(1.7, 2.3) * s, 0.85
        return [_box(ex, ey, 0.42), _box(ex, 0.2, 0.85, cy=ey / 2 - 0.1),
                _box(0.2, ey, 0.62, cx=-ex / 2 + 0.1), _box(0.2, ey, 0.62, cx=ex / 2 - 0.1)]
    if label == "cabinet":
        return [_box(rng.uniform(0.6, 1.0) * s, 0.5, rng.uniform(0.8, 1.1) * s)]
    if label == "bookshelf":
        ex, ey, ez = rng.uniform(0.8, 1.2) * s, 0.35, rng.uniform(1.6, 2.0)
        shelves = [_box(ex, ey, 0.03, z0=z) for z in np.linspace(0.05, ez - 0.05, 5)]
        return [_box(0.03, ey, ez, cx=-ex / 2), _box(0.03, ey, ez, cx=ex / 2), _box(ex, 0.02, ez, cy=ey / 2)] + shelves
    if label == "lamp":
        return [_cylinder(0.1 * s, 0.03), _cylinder(0.015, 0.35 * s), _cylinder(0.13 * s, 0.18 * s, z0=0.35 * s)]
    if label == "monitor":
        return [_box(0.2, 0.15, 0.02), _box(0.04, 0.04, 0.12), _box(0.55 * s, 0.04, 0.35 * s, z0=0.12)]
    if label == "trash can":
        return [_cylinder(0.16 * s, 0.4 * s)]
    if label == "pillow":
        return [_box(0.5 * s, 0.35 * s, 0.12)]
    if label == "box":
        return [_box(0.35 * s, 0.3 * s, 0.25 * s)]
    if label == "nightstand":
        return [_box(0.45 * s, 0.4, 0.55)]
    if label == "door":
        return [_box(0.9, 0.06, 2.05)]
    if label == "window":
        return [_box(1.2 * s, 0.06, 1.1)]
    if label == "clutter":
        return [_box(*rng.uniform(0.1, 0.3, size=3))]
    raise ValueError(f"unknown synthetic object label {label!r}")


def _top(parts) -> float:
    return float(max(p.bounds[1][2] for p in parts))


def _color(rng) -> str:
    return str(rng.choice(list(PALETTE)))


def make_group(kind: str, rng: np.random.Generator) -> list:
    """A furniture group in group-local coordinates: list of (ObjectSpec, (x, y, z)) with in-group support."""
    objs = []

    def add(label, x, y, z=0.0, on=None, color=None, scale=None):
        scale = float(rng.uniform(0.8, 1.25)) if scale is None else scale
        spec = ObjectSpec(label, color or _color(rng), make_object(label, rng, scale), on_top_of=on)
        objs.append((spec, (x, y, z)))
        return len(objs) - 1

    if kind == "dining":
        t = add("table", 0.0, 0.0)
        tb = trimesh.util.concatenate(objs[t][0].parts).bounds
        ex, ey = tb[1][0] - tb[0][0], tb[1][1] - tb[0][1]
        chair_color = _color(rng)
        spots = [(-ex / 4, -ey / 2 - 0.35), (ex / 4, -ey / 2 - 0.35), (-ex / 4, ey / 2 + 0.35), (ex / 4, ey / 2 + 0.35)]
        for i in rng.permutation(4)[: int(rng.integers(2, 5))]:
            add("chair", spots[i][0], spots[i][1], color=chair_color if rng.random() < 0.7 else None)
        if rng.random() < 0.5:
            add("box", float(rng.uniform(-0.2, 0.2)), 0.0, _top(objs[t][0].parts), on=t)
    elif kind == "office":
        d = add("desk", 0.0, 0.0)
        top = _top(objs[d][0].parts)
        add("monitor", float(rng.uniform(-0.3, 0.0)), 0.1, top, on=d)
        if rng.random() < 0.7:
            add("lamp", 0.45, 0.15, top, on=d)
        add("chair", 0.0, -0.75)
    elif kind == "bedroom":
        b = add("bed", 0.0, 0.0, scale=float(rng.uniform(0.9, 1.1)))
        top = _top(objs[b][0].parts[:1])
        pillow_color = _color(rng)
        for x in ([-0.4, 0.4] if rng.random() < 0.6 else [0.0]):
            add("pillow", x, 0.7, top, on=b, color=pillow_color)
        n = add("nightstand", 1.15, 0.7)
        add("lamp", 1.15, 0.7, _top(objs[n][0].parts), on=n)
    elif kind == "living":
        s = add("sofa", 0.0, 0.0)
        add("pillow", float(rng.uniform(-0.5, 0.5)), 0.0, 0.42, on=s)
        add("table", 0.0, -1.0, scale=0.6)
    elif kind == "storage":
        c = add("cabinet", 0.0, 0.0)
        if rng.random() < 0.6:
            add("box", 0.0, 0.0, _top(objs[c][0].parts), on=c)
        add("trash can", 0.75, 0.0)
    elif kind == "books":
        add("bookshelf", 0.0, 0.0)
        if rng.random() < 0.5:
            add("bookshelf", 1.3, 0.0)
    else:
        raise ValueError(kind)
    return objs


GROUP_KINDS = ("dining", "office", "bedroom", "living", "storage", "books")


# --------------------------------------------------------------------------------------------------
# Scene assembly
# --------------------------------------------------------------------------------------------------
def _world_mesh(parts, rot_k: int, offset) -> tuple[trimesh.Trimesh, np.ndarray]:
    """Concatenate parts, rotate by rot_k * 90 deg about z, translate; returns mesh and per-vertex part index."""
    rot = trimesh.transformations.rotation_matrix(rot_k * math.pi / 2, [0, 0, 1])
    rot[:3, 3] = offset
    meshes, part_idx = [], []
    for i, p in enumerate(parts):
        m = p.copy()
        m.apply_transform(rot)
        meshes.append(m)
        part_idx.append(np.full(len(m.vertices), i, dtype=np.int32))
    return trimesh.util.concatenate(meshes), np.concatenate(part_idx)


def _plane(corner, u, v) -> trimesh.Trimesh:
    """A rectangle from ``corner`` spanned by vectors u and v (two triangles)."""
    c = np.asarray(corner, float)
    verts = np.array([c, c + u, c + u + v, c + v])
    return trimesh.Trimesh(verts, [[0, 1, 2], [0, 2, 3]], process=False)


def build_scene(rng: np.random.Generator, preset: Preset) -> tuple[list, tuple]:
    """Place structure and furniture; returns (objects with world meshes, room (W, D, H))."""
    W = float(rng.uniform(*preset.room_size))
    D = float(rng.uniform(*preset.room_size))
    H = ROOM_HEIGHT
    objects: list[ObjectSpec] = []

    def add_world(spec: ObjectSpec, mesh, part_index):
        spec.mesh, spec.part_index = mesh, part_index
        objects.append(spec)
        return len(objects) - 1

    floor = ObjectSpec("floor", "gray", [], structural=True)
    add_world(floor, _plane([0, 0, 0], np.array([W, 0, 0]), np.array([0, D, 0])), np.zeros(4, np.int32))
    # walls: ScanNet annotates long walls as several objects; split each side in one or two pieces
    sides = [([0, 0, 0], [W, 0, 0]), ([W, 0, 0], [0, D, 0]), ([W, D, 0], [-W, 0, 0]), ([0, D, 0], [0, -D, 0])]
    for corner, direction in sides:
        direction = np.asarray(direction, float)
        pieces = 2 if np.linalg.norm(direction) > 5.0 else 1
        for k in range(pieces):
            c = np.asarray(corner, float) + direction * k / pieces
            m = _plane(c, direction / pieces, np.array([0, 0, H]))
            add_world(ObjectSpec("wall", "white", [], structural=True), m, np.zeros(4, np.int32))

    footprints: list[np.ndarray] = []  # [xmin, ymin, xmax, ymax]

    def free(fp, margin=0.1):
        if fp[0] < margin or fp[1] < margin or fp[2] > W - margin or fp[3] > D - margin:
            return False
        return all(fp[2] + margin <= g[0] or g[2] + margin <= fp[0] or fp[3] + margin <= g[1] or g[3] + margin <= fp[1]
                   for g in footprints)

    # door and window sit in walls (thin boxes flush with the wall plane)
    door_x = float(rng.uniform(0.3, W - 1.3))
    door = ObjectSpec("door", "brown", make_object("door", rng))
    m, pi = _world_mesh(door.parts, 0, [door_x + 0.45, 0.03, 0.0])
    add_world(door, m, pi)
    footprints.append(np.array([door_x - 0.2, 0.0, door_x + 1.1, 1.0]))  # keep the door free
    win = ObjectSpec("window", "blue", make_object("window", rng))
    m, pi = _world_mesh(win.parts, 0, [float(rng.uniform(1.0, W - 1.0)), D - 0.03, 0.9])
    add_world(win, m, pi)

    n_groups = int(rng.integers(preset.groups[0], preset.groups[1] + 1))
    kinds = list(rng.permutation(GROUP_KINDS))
    while len(kinds) < n_groups:
        kinds.append(str(rng.choice(GROUP_KINDS)))
    for kind in kinds[:n_groups]:
        group = make_group(str(kind), rng)
        rot_k = int(rng.integers(0, 4))
        # group-local footprint after rotation
        placed = [_world_mesh(spec.parts, rot_k, _rot_xy(off, rot_k)) for spec, off in group]
        lo = np.min([m.bounds[0][:2] for m, _ in placed], axis=0)
        hi = np.max([m.bounds[1][:2] for m, _ in placed], axis=0)
        for _ in range(60):
            t = rng.uniform([-lo[0], -lo[1]], [W - hi[0], D - hi[1]]) if (hi - lo < [W, D]).all() else None
            if t is None:
                break
            fp = np.array([lo[0] + t[0], lo[1] + t[1], hi[0] + t[0], hi[1] + t[1]])
            if free(fp):
                footprints.append(fp)
                base = len(objects)
                for (spec, _), (m, pi) in zip(group, placed):
                    m = m.copy()
                    m.apply_translation([t[0], t[1], 0.0])
                    if spec.on_top_of is not None:
                        spec.on_top_of += base
                    add_world(spec, m, pi)
                break
    # a little unannotated clutter (ScanNet leaves some vertices out of every segGroup)
    for _ in range(int(rng.integers(1, 3))):
        spec = ObjectSpec("clutter", "gray", make_object("clutter", rng), annotated=False)
        for _ in range(30):
            xy = rng.uniform([0.3, 0.3], [W - 0.3, D - 0.3])
            fp = np.array([xy[0] - 0.2, xy[1] - 0.2, xy[0] + 0.2, xy[1] + 0.2])
            if free(fp, margin=0.05):
                footprints.append(fp)
                m, pi = _world_mesh(spec.parts, 0, [xy[0], xy[1], 0.0])
                add_world(spec, m, pi)
                break
    return objects, (W, D, H)


def _rot_xy(off, rot_k):
    x, y, z = off
    for _ in range(rot_k % 4):
        x, y = -y, x
    return [x, y, z]


def _densify(objects: list, target_vertices: int) -> None:
    """Subdivide every object mesh to one edge length chosen so the scene has ~target_vertices vertices."""
    area = sum(o.mesh.area for o in objects)
    # subdivide_to_size leaves ~2.8 vertices per (edge length)^2 of surface, measured on boxes
    edge = math.sqrt(2.8 * area / max(target_vertices, 1))
    for o in objects:
        m = o.mesh
        # per-face part index survives subdivision through the returned face index
        face_part = o.part_index[m.faces[:, 0]]
        v, f, idx = trimesh.remesh.subdivide_to_size(m.vertices, m.faces, max_edge=edge, max_iter=12, return_index=True)
        fp = face_part[idx]
        part = np.zeros(len(v), np.int32)
        part[f.reshape(-1)] = np.repeat(fp, 3)
        o.mesh = trimesh.Trimesh(v, f, process=False)
        o.part_index = part


def _segments(objects: list, cell: float, vertex_offsets: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """ScanNet-like over-segmentation: one segment per (object, part, facing class, spatial cell).

    Segment ids are the smallest vertex index of each segment, as ScanNet's segmentator numbers them.
    """
    keys = []
    for i, o in enumerate(objects):
        v = o.mesh.vertices
        n = normals[vertex_offsets[i]: vertex_offsets[i + 1]]
        # facing class: up (0), down (1) or sideways (2), as planar patches split at creases
        axis = np.where(n[:, 2] > 0.7, 0, np.where(n[:, 2] < -0.7, 1, 2))
        c = np.floor(v / cell).astype(np.int64)
        keys.append(np.stack([np.full(len(v), i), o.part_index, axis, c[:, 0], c[:, 1], c[:, 2]], 1))
    keys = np.concatenate(keys)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    first = np.full(inverse.max() + 1, len(inverse), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(inverse)))
    return first[inverse]


def _alignment(rng) -> np.ndarray:
    """A ScanNet-like axisAlignment: rotation about z plus a translation (aligned = M @ raw)."""
    theta = float(rng.uniform(-math.pi, math.pi))
    m = np.eye(4)
    m[:2, :2] = [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    m[:3, 3] = [rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-0.1, 0.1)]
    return np.round(m, 6)


# --------------------------------------------------------------------------------------------------
# Writers (ScanNet raw formats)
# --------------------------------------------------------------------------------------------------
def ply_bytes(xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray) -> bytes:
    """A ``*_vh_clean_2.ply`` as ScanNet writes it: binary little endian, 16-byte vertices, 13-byte faces."""
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment VCGLIB generated\n"
        f"element vertex {len(xyz)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    v = np.empty(len(xyz), dtype=[("xyz", "<f4", 3), ("rgba", "u1", 4)])
    v["xyz"] = xyz
    v["rgba"][:, :3] = rgb
    v["rgba"][:, 3] = 255
    f = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", 3)])
    f["n"] = 3
    f["idx"] = faces
    return header + v.tobytes() + f.tobytes()


def scene_txt(m: np.ndarray, scene_type: str) -> str:
    vals = " ".join(f"{x:.6f}" for x in m.reshape(-1))
    return (
        f"axisAlignment = {vals} \n"
        "colorHeight = 968\ncolorToDepthExtrinsics = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\ncolorWidth = 1296\n"
        "depthHeight = 480\ndepthWidth = 640\n"
        "fx_color = 1170.187988\nfx_depth = 571.623718\nfy_color = 1170.187988\nfy_depth = 571.623718\n"
        "mx_color = 647.750000\nmx_depth = 319.500000\nmy_color = 483.750000\nmy_depth = 239.500000\n"
        "numColorFrames = 0\nnumDepthFrames = 0\nnumIMUmeasurements = 0\n"
        f"sceneType = {scene_type}\n"
    )


def labels_tsv() -> str:
    return "\t".join(TSV_COLUMNS) + "\n" + "\n".join(LABEL_ROWS) + "\n"


@dataclass
class SynthScene:
    scene_id: str
    alignment: np.ndarray
    layout: dict = field(default_factory=dict)
    num_vertices: int = 0
    num_faces: int = 0


def generate_scene(scene_id: str, rng: np.random.Generator, preset: Preset, out_scan_dir: Path) -> SynthScene:
    """Generate one scene and write its four raw ScanNet files into ``out_scan_dir`` (atomically)."""
    objects, (W, D, H) = build_scene(rng, preset)
    _densify(objects, preset.target_vertices)

    counts = np.array([len(o.mesh.vertices) for o in objects])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    xyz = np.concatenate([o.mesh.vertices for o in objects])
    faces = np.concatenate([o.mesh.faces + offsets[i] for i, o in enumerate(objects)])
    normals = np.concatenate([o.mesh.vertex_normals for o in objects])
    rgb = np.concatenate([
        np.clip(np.array(PALETTE[o.color_name]) + rng.normal(0, 8, size=(len(o.mesh.vertices), 3)), 0, 255)
        for o in objects
    ]).astype(np.uint8)
    seg = _segments(objects, preset.seg_cell, offsets, normals)

    m = _alignment(rng)
    xyz_raw = (np.c_[xyz, np.ones(len(xyz))] @ np.linalg.inv(m).T)[:, :3].astype(np.float32)
    # what a reader gets back after aligning the stored float32 vertices: boxes are computed from these
    xyz_aligned = (np.c_[xyz_raw.astype(np.float64), np.ones(len(xyz))] @ m.T)[:, :3]

    seg_groups, layout_objects = [], []
    annotated = [i for i, o in enumerate(objects) if o.annotated]
    object_id_of = {i: oid for oid, i in enumerate(annotated)}  # ScanNet objectIds are 0..K-1
    for i, o in enumerate(objects):
        if not o.annotated:
            continue
        oid = object_id_of[i]
        segs = np.unique(seg[offsets[i]: offsets[i + 1]])
        seg_groups.append({"id": oid, "objectId": oid, "segments": [int(s) for s in segs], "label": o.label})
        pts = xyz_aligned[offsets[i]: offsets[i + 1]]
        lo, hi = pts.min(0), pts.max(0)
        layout_objects.append({
            "object_id": oid,
            "label": o.label,
            "nyu40id": NYU40[o.label],
            "color_name": o.color_name,
            "color_rgb": list(PALETTE[o.color_name]),
            "center": [round(float(x), 6) for x in (lo + hi) / 2],
            "size": [round(float(x), 6) for x in hi - lo],
            "on_top_of": object_id_of.get(o.on_top_of) if o.on_top_of is not None else None,
            "structural": o.structural,
            "num_vertices": int(counts[i]),
        })

    with atomic_dir(out_scan_dir) as tmp:
        (tmp / f"{scene_id}_vh_clean_2.ply").write_bytes(ply_bytes(xyz_raw, rgb, faces))
        (tmp / f"{scene_id}_vh_clean_2.0.010000.segs.json").write_text(
            json.dumps({"params": SEG_PARAMS, "sceneId": scene_id, "segIndices": [int(s) for s in seg]}))
        (tmp / f"{scene_id}.aggregation.json").write_text(json.dumps({
            "sceneId": f"scannet.{scene_id}", "appId": "Aggregator.v2", "segGroups": seg_groups,
            "segmentsFile": f"scannet.{scene_id}_vh_clean_2.0.010000.segs.json",
        }))
        scene_type = "Bedroom / Hotel" if any(o.label == "bed" for o in objects) else "Living room / Lounge"
        (tmp / f"{scene_id}.txt").write_text(scene_txt(m, scene_type))
    layout = {"room": [round(W, 6), round(D, 6), H], "alignment": m.tolist(), "objects": layout_objects}
    return SynthScene(scene_id, m, layout, len(xyz), len(faces))


def scene_ids(num_scenes: int) -> list[str]:
    """Synthetic scene ids in ScanNet's pattern, from scene5000_00 (outside ScanNet's 0000-0806 range)."""
    if num_scenes > 5000:
        raise ValueError(f"at most 5000 synthetic scenes, got {num_scenes}")
    return [f"scene{5000 + i:04d}_00" for i in range(num_scenes)]


def generate_dataset(out_dir, num_scenes: int = 4, seed: int = 0, preset: str = "tiny",
                     val_fraction: float = 0.25, progress: bool = False) -> dict:
    """Write ``num_scenes`` synthetic scenes in ScanNet's raw layout under ``out_dir`` (see module doc).

    Returns ``{"scenes": [scene ids], "splits": {"train": [...], "val": [...]}, "files": {name: path},
    "stats": {scene_id: {"vertices": n, "faces": n, "objects": n}}}``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    ids = scene_ids(num_scenes)
    # one independent stream per scene, so scene k does not depend on how many scenes come before it
    seeds = np.random.SeedSequence(seed).spawn(num_scenes + 1)
    split_rng = np.random.default_rng(seeds[-1])
    n_val = int(round(num_scenes * val_fraction)) if num_scenes > 1 else 0
    val = set(np.asarray(ids)[split_rng.permutation(num_scenes)[:n_val]].tolist())
    layouts, stats = {}, {}
    for sid, ss in tqdm(list(zip(ids, seeds)), desc="synth scenes", disable=not progress, unit="scene"):
        scene = generate_scene(sid, np.random.default_rng(ss), PRESETS[preset], out_dir / "scans" / sid)
        layouts[sid] = {"split": "val" if sid in val else "train", **scene.layout}
        stats[sid] = {"vertices": scene.num_vertices, "faces": scene.num_faces,
                      "objects": len(scene.layout["objects"])}
    splits = {"train": [s for s in ids if s not in val], "val": [s for s in ids if s in val]}
    files = {"scans": out_dir / "scans", "labels": out_dir / "scannetv2-labels.combined.tsv",
             "layout": out_dir / "synth_layout.json"}
    write_text_atomic(files["labels"], labels_tsv())
    for name, members in splits.items():
        files[f"split_{name}"] = out_dir / "splits" / f"{name}.txt"
        write_text_atomic(files[f"split_{name}"], "".join(s + "\n" for s in members))
    layout = {"seed": seed, "preset": preset, "scenes": layouts}
    write_json_atomic(files["layout"], layout)
    files.update(_write_referring(out_dir, layout, seed))
    return {"scenes": ids, "splits": splits, "files": files, "stats": stats}


def _write_referring(out_dir: Path, layout: dict, seed: int) -> dict:
    """Synthetic referring expressions for the scenes (data_prep.synth_refer), then the paraphrase split of
    the val programs (data_prep.paraphrase; it only reads the regular files)."""
    files = dict(write_referring_files(out_dir, layout, seed))
    files.update(write_paraphrase_files(out_dir, layout, seed))
    return files
