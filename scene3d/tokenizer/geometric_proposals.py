"""Geometric class-agnostic proposals: nothing learned, so they do not depend on what a head was trained on.

::

    points [N] --voxel grid (``voxel`` m, mean per cell)--> V cells (weight = input points per cell)
      | normals: open3d KNN PCA (``normal_knn``), oriented towards the middle of the scene's box
      | structure removal: RANSAC planes (open3d ``segment_plane``): the floor / ceiling among upward-facing
      |   cells of the lowest / highest ``band`` metres, walls among sideways-facing cells; a plane counts when
      |   it is level (plumb) and bounds the scene (almost nothing behind it); its agreeing cells are removed
      | adjacency graph of the remaining cells (scipy ``cKDTree.query_pairs`` within ``link`` m), per edge:
      |   normal angle, colour distance and concavity (LCCP: (n_i - n_j) . unit(x_j - x_i) > 0 at a concave
      |   crease, where an object meets the floor, a wall or another object)
      | for each level of ``levels`` (strict to loose): connected components of the edges within its limits
      |   (scipy ``csgraph``); levels loosen monotonically, so the components form a tree
      | each component of >= ``min_points`` input points and <= ``max_extent`` metres is a proposal; a component
      |   that is its own largest child again (>= ``dedup_iou`` of its weight) is the same proposal, one more vote
      v score = share of levels that gave the proposal (stability) -> proposals sorted by score

A segment that several thresholds agree on is an object more often than one that exists at a single level,
which is why the stability ranks them (measured: AP@0.5 0.25 with it, 0.10 with random scores on
scene0000_01); the hierarchy gives several hypotheses per region (an object on a desk, the desk with it),
which is what recall needs. Proposals overlap: :class:`GeometricProposals` holds masks;
:meth:`GeometricProposals.labels` flattens them to disjoint objects for the tokenizer.

Why hand-written: open3d has plane RANSAC, normals and DBSCAN but no graph segmentation over normals, colour
and convexity, and the multi-level tree with its stability score is the method itself; each step is a
library call. Figures and their limits: README, "Proposals on real scans".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class GeometricConfig:
    voxel: float = 0.05  # metres: cell of the working grid (time does not grow with points past it)
    normal_knn: int = 16
    plane_distance: float = 0.03  # RANSAC inlier distance (m)
    plane_iterations: int = 400
    max_planes: int = 12
    min_plane_fraction: float = 0.02  # a structural plane holds at least this share of the scene's cells
    behind_fraction: float = 0.03  # at most this share of the scene lies > behind_margin behind a structural plane
    behind_margin: float = 0.15
    band: float = 0.3  # metres above the lowest / below the highest point searched for floor / ceiling
    link: float = 0.09  # metres between adjacent cells (about 2 voxels) ...
    link_spacing: float = 1.5  # ... or this many times the 90th percentile cell spacing of a sparser scan
    # (max angle between normals in degrees, max rgb distance in 0..1 units) of each merge level
    # merge levels, strict to loose: (max angle between normals in degrees, max rgb distance in 0..1 units,
    # max concavity (n_i - n_j) . unit(x_j - x_i) of an edge); the last level lets concave creases join too
    levels: tuple = ((15.0, 0.08, 0.15), (25.0, 0.12, 0.15), (40.0, 0.18, 0.15), (60.0, 0.25, 0.15),
                     (90.0, 0.35, 0.15), (180.0, 0.5, 0.15), (180.0, 2.0, 0.15), (180.0, 2.0, 0.4))
    min_points: int = 100  # input points in a proposal (ScanNet's instance minimum)
    max_extent: float = 3.0  # metres: a segment whose box is longer than this on any axis is not an object
    dedup_iou: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.voxel <= 0 or self.link <= 0 or self.plane_distance <= 0:
            raise ValueError(f"voxel, link and plane_distance must be > 0 in {self}")
        if not self.levels:
            raise ValueError("levels: at least one (angle, colour) merge level")
        if self.min_points < 1:
            raise ValueError(f"min_points must be >= 1, got {self.min_points}")


class GeometricProposals(NamedTuple):
    """Proposals of one scene.

    ==============  ==============  ========================================================================
    ``masks``       [P, N] bool     points of each proposal (they may overlap)
    ``scores``      [P] float       stability in (0, 1]: share of merge levels giving this segment; sorted
    ``structure``   [N] bool        points removed as floor / ceiling / wall planes
    ``num_planes``  int             structural planes removed
    ==============  ==============  ========================================================================
    """

    masks: np.ndarray
    scores: np.ndarray
    structure: np.ndarray
    num_planes: int

    @property
    def num_proposals(self) -> int:
        return int(self.masks.shape[0])

    def labels(self, max_overlap: float = 0.1) -> np.ndarray:
        """One proposal id per point ``[N]`` (-1 none) for the tokenizer, which pools disjoint objects
        (:meth:`flatten`)."""
        return self.flatten(max_overlap)[0]

    def flatten(self, max_overlap: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """Disjoint proposals: ``(labels [N] int64, -1 none; scores [K])``. Proposals are taken greedily by
        score, the larger first among equal scores (measured on scene0000_01: recall@0.5 0.37 against 0.19
        smaller-first), skipping any that shares more than ``max_overlap`` of its points with those taken;
        points already claimed stay with the first. Ids are 0..K-1 in the order taken."""
        return flatten_masks(self.masks, self.scores, max_overlap)


def flatten_masks(masks: np.ndarray, scores: np.ndarray, max_overlap: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping proposals ``masks [P, N]`` with ``scores [P]`` made disjoint (:meth:`GeometricProposals.flatten`)."""
    n = masks.shape[1]
    out = np.full(n, -1, np.int64)
    sizes = masks.sum(1)
    taken = []
    for j in np.lexsort((-sizes, -scores)):
        m = masks[j]
        if (out[m] >= 0).sum() > max_overlap * sizes[j]:
            continue
        out[m & (out < 0)] = len(taken)
        taken.append(j)
    return out, scores[np.asarray(taken, np.int64)]


def _cells(coord: np.ndarray, voxel: float):
    key = np.floor((coord - coord.min(0)) / voxel).astype(np.int64)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    return inverse, counts


def _mean_by(values: np.ndarray, inverse: np.ndarray, counts: np.ndarray) -> np.ndarray:
    out = np.zeros((len(counts), values.shape[1]), np.float64)
    np.add.at(out, inverse, values)
    return out / counts[:, None]


def _normals(xyz: np.ndarray, knn: int) -> np.ndarray:
    """Unit normals ``[V, 3]`` oriented towards the middle of the scene's box (the inside of a room), which is
    what the convexity test needs (a scan has no camera poses here)."""
    import open3d as o3d  # with the proposals, not on import of the tokenizer

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    pc.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn))
    pc.orient_normals_towards_camera_location((xyz.min(0) + xyz.max(0)) / 2)
    return np.asarray(pc.normals)


def _plane(o3d, xyz: np.ndarray, distance: float, iterations: int):
    """RANSAC plane ``(unit normal, offset, inlier rows)`` of ``xyz`` (open3d ``segment_plane``)."""
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    (a, b, c, d), inl = pc.segment_plane(distance, 3, iterations)
    norm = float(np.linalg.norm([a, b, c]))
    return np.array([a, b, c]) / norm, d / norm, np.asarray(inl, np.int64)


def _structure(xyz: np.ndarray, normal: np.ndarray, w: np.ndarray, cfg: GeometricConfig) -> tuple[np.ndarray, int]:
    """Cells on floor / ceiling / wall planes ``[V]`` bool and the number of such planes.

    Floor and ceiling: one RANSAC plane each among the upward-facing cells of the lowest / highest
    ``band`` metres; walls: RANSAC planes among the sideways-facing cells, kept while they are large. A plane
    counts only when it is level (or plumb) and bounds the scene: at most ``behind_fraction`` of the scene's
    points lie more than ``behind_margin`` behind it. Its cells within ``plane_distance`` whose normals agree
    are removed."""
    import open3d as o3d  # with the proposals, not on import of the tokenizer

    o3d.utility.random.seed(cfg.seed)
    total = w.sum()
    structural = np.zeros(len(xyz), bool)
    planes = 0
    min_cells = cfg.min_plane_fraction * len(xyz)
    nz = np.abs(normal[:, 2])
    z = xyz[:, 2]

    def accept(n, d, level: bool) -> bool:
        nonlocal planes
        if (abs(n[2]) < 0.95) if level else (abs(n[2]) > 0.15):
            return False
        signed = xyz @ n + d
        front = w[signed > cfg.behind_margin].sum() / total
        back = w[signed < -cfg.behind_margin].sum() / total
        if min(front, back) >= cfg.behind_fraction:
            return False
        near = (np.abs(signed) < cfg.plane_distance) & (np.abs(normal @ n) > 0.8)
        structural[near] = True
        planes += 1
        return True

    for band in (z < z.min() + cfg.band, z > z.max() - cfg.band):  # floor, ceiling
        rows = np.nonzero(band & (nz > 0.9))[0]
        if len(rows) >= max(3, min_cells):
            n, d, inl = _plane(o3d, xyz[rows], cfg.plane_distance, cfg.plane_iterations)
            if len(inl) >= min_cells:
                accept(n, d, level=True)
    pool = np.nonzero((nz < 0.2) & ~structural)[0]
    for _ in range(cfg.max_planes):
        if len(pool) < max(3, min_cells):
            break
        n, d, inl = _plane(o3d, xyz[pool], cfg.plane_distance, cfg.plane_iterations)
        if len(inl) < min_cells:
            break
        accept(n, d, level=False)
        pool = np.delete(pool, inl)
    return structural, planes


class Cells(NamedTuple):
    """The working grid of one scene (:func:`cells_of`), shared by the geometric and the merge proposals."""

    inverse: np.ndarray  # [N] cell of each point
    weight: np.ndarray  # [V] input points per cell
    xyz: np.ndarray  # [V, 3] mean point per cell
    color: np.ndarray  # [V, 3] mean colour (0..1)
    normal: np.ndarray  # [V, 3] oriented normals
    structural: np.ndarray  # [V] bool, on a structural plane
    num_planes: int
    keep: np.ndarray  # [V'] the cells that are not structural


def cells_of(coord: np.ndarray, color: Optional[np.ndarray], cfg: GeometricConfig) -> Cells:
    """Check ``coord [N, 3]`` / ``color [N, 3]`` (0..255 or 0..1), average them into ``cfg.voxel`` cells, give the
    cells normals and mark the structural planes."""
    coord = np.asarray(coord, np.float64)
    if coord.ndim != 2 or coord.shape[1] != 3 or len(coord) == 0:
        raise ValueError(f"coord must be [N, 3] with N > 0, got shape {coord.shape}")
    n = len(coord)
    if color is None:
        rgb = np.zeros((n, 3))
    else:
        rgb = np.asarray(color, np.float64)
        if rgb.shape != (n, 3):
            raise ValueError(f"color must be [{n}, 3], got shape {rgb.shape}")
        if rgb.size and rgb.max() > 1.0:
            rgb = rgb / 255.0
    inverse, w = _cells(coord, cfg.voxel)
    xyz, col = _mean_by(coord, inverse, w), _mean_by(rgb, inverse, w)
    v = len(w)
    normal = _normals(xyz, cfg.normal_knn) if v >= 3 else np.tile([0.0, 0.0, 1.0], (v, 1))
    structural, planes = _structure(xyz, normal, w, cfg) if v >= 3 else (np.zeros(v, bool), 0)
    return Cells(inverse, w, xyz, col, normal, structural, planes, np.nonzero(~structural)[0])


class CellEdges(NamedTuple):
    """Adjacent non-structural cells (:func:`cell_edges`): ``pairs [E, 2]`` index ``Cells.keep``."""

    pairs: np.ndarray
    angle: np.ndarray  # [E] degrees between the normals
    colour: np.ndarray  # [E] rgb distance (0..1 units)
    concave: np.ndarray  # [E] LCCP concavity


def cell_edges(c: Cells, cfg: GeometricConfig) -> CellEdges:
    """Pairs of kept cells within ``cfg.link`` (or ``cfg.link_spacing`` times the 90th percentile cell spacing
    of a sparser scan) and their normal angle, colour step and concavity."""
    keep, xyz, normal = c.keep, c.xyz, c.normal
    tree = cKDTree(xyz[keep])
    link = cfg.link
    if len(keep) > 1:
        spacing = float(np.percentile(tree.query(xyz[keep], k=2)[0][:, 1], 90))
        link = max(link, cfg.link_spacing * spacing)
    pairs = tree.query_pairs(link, output_type="ndarray")
    i, j = keep[pairs[:, 0]], keep[pairs[:, 1]]
    angle = np.degrees(np.arccos(np.clip(np.abs((normal[i] * normal[j]).sum(1)), 0, 1)))
    cdist = np.linalg.norm(c.color[i] - c.color[j], axis=1)
    # convexity (LCCP): with normals facing out of the surfaces, (n_i - n_j) . (x_j - x_i) > 0 where two
    # patches meet in a concave crease (an object on the floor, against a wall or another object)
    dvec = xyz[j] - xyz[i]
    dvec /= np.maximum(np.linalg.norm(dvec, axis=1, keepdims=True), 1e-9)
    return CellEdges(pairs, angle, cdist, ((normal[i] - normal[j]) * dvec).sum(1))


def geometric_proposals(coord: np.ndarray, color: Optional[np.ndarray] = None,
                        cfg: Optional[GeometricConfig] = None) -> GeometricProposals:
    """Proposals for one scene from ``coord [N, 3]`` (metres, z up) and ``color [N, 3]`` (0..255 or 0..1)."""
    cfg = cfg or GeometricConfig()
    c = cells_of(coord, color, cfg)
    n, v = len(c.inverse), len(c.weight)
    inverse, w, xyz, structural, planes, keep = c.inverse, c.weight, c.xyz, c.structural, c.num_planes, c.keep
    pairs, angle, cdist, concave = cell_edges(c, cfg)
    # levels loosen monotonically, so each level's components are unions of the previous level's: a tree.
    # A component that keeps >= dedup_iou of its weight from one child is that child again (IoU = share):
    # the same proposal, one more vote. Every other component of >= min_points points is a new proposal.
    wk = w[keep].astype(np.float64)
    prop_of_prev = None  # proposal id of each component of the previous level (-1: none)
    members, votes = [], []  # cell rows (into keep) per proposal, number of levels that gave it
    for lv, (max_angle, max_col, max_concave) in enumerate(cfg.levels):
        ok = (angle <= max_angle) & (cdist <= max_col) & (concave <= max_concave)
        adj = coo_matrix((np.ones(int(ok.sum())), (pairs[ok, 0], pairs[ok, 1])), shape=(len(keep), len(keep)))
        k, comp = connected_components(adj, directed=False)
        size = np.bincount(comp, weights=wk, minlength=k)
        prop = np.full(k, -1, np.int64)
        if prop_of_prev is not None:
            # largest child of each component: contingency of (component, previous component) weights
            pair_key = comp * kprev + prev
            uniq, inv = np.unique(pair_key, return_inverse=True)
            pw = np.bincount(inv, weights=wk)
            parent, child = uniq // kprev, uniq % kprev
            order = np.lexsort((-pw, parent))
            first = order[np.r_[True, parent[order][1:] != parent[order][:-1]]]
            same = pw[first] >= cfg.dedup_iou * size[parent[first]]
            cp = prop_of_prev[child[first]]
            hit = same & (cp >= 0)
            prop[parent[first][hit]] = cp[hit]
            for q in cp[hit]:
                votes[q] += 1
        rows_by_comp = None
        lo = np.full((k, 3), np.inf)
        hi = np.full((k, 3), -np.inf)
        np.minimum.at(lo, comp, xyz[keep])
        np.maximum.at(hi, comp, xyz[keep])
        fits = (hi - lo).max(1) <= cfg.max_extent
        for c in np.nonzero((prop < 0) & (size >= cfg.min_points) & fits)[0]:
            if rows_by_comp is None:
                srt = np.argsort(comp, kind="stable")
                bounds = np.searchsorted(comp[srt], np.arange(k + 1))
                rows_by_comp = (srt, bounds)
            srt, bounds = rows_by_comp
            prop[c] = len(members)
            members.append(srt[bounds[c]:bounds[c + 1]])
            votes.append(1)
        prop_of_prev, prev, kprev = prop, comp, k
    scores = np.asarray(votes, np.float64) / len(cfg.levels)
    rank = np.argsort(-scores, kind="stable")
    masks = np.zeros((len(members), n), bool)
    for r, q in enumerate(rank):
        cell = np.zeros(v, bool)
        cell[keep[members[q]]] = True
        masks[r] = cell[inverse]
    return GeometricProposals(masks, scores[rank], structural[inverse], planes)


class ProposalObjects(NamedTuple):
    """Disjoint proposal objects of one scene, ready for the tokenizer (``objects=``)."""

    labels: np.ndarray  # [N] int64 proposal id per point (0..K-1), -1 none
    scores: np.ndarray  # [K] stability score of each
    num_proposals: int  # K: disjoint proposals handed to the model
    num_candidates: int  # overlapping proposals before the flattening (GeometricProposals.num_proposals)
    source: str  # "geometric" or "instance" (scene3d.tokenizer.instance_proposals)


def proposal_objects(coord: np.ndarray, color: Optional[np.ndarray] = None,
                     cfg: Optional[GeometricConfig] = None) -> ProposalObjects:
    """:func:`geometric_proposals` flattened to one proposal per point (:meth:`GeometricProposals.labels`):
    what evaluation and the API hand to the model as its objects."""
    g = geometric_proposals(coord, color, cfg)
    labels, scores = g.flatten()
    return ProposalObjects(labels, scores, len(scores), g.num_proposals, "geometric")


__all__ = ["GeometricConfig", "GeometricProposals", "ProposalObjects", "flatten_masks", "geometric_proposals",
           "proposal_objects"]
