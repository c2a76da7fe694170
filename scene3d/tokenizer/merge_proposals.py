"""Learned-merge class-agnostic proposals: a geometric over-segmentation, then segments merged by a small
learned pair classifier, every cluster of the merge tree a proposal scored by a small learned objectness model.

::

    points [N] --the geometric proposals' front end (geometric_proposals: 5 cm cells, open3d normals,
      |   RANSAC floor / ceiling / wall planes removed, cell graph within ``link`` m)
      | over-segmentation: connected components of the strict edges (normal angle, colour, concavity within
      |   ``seg_angle`` / ``seg_colour`` / ``seg_concave``), cut by a ``seg_size`` m grid, tiny pieces absorbed
      |   into the neighbour they share most edges with                                   -> S segments
      | region adjacency graph of the segments: per pair, statistics of the cell edges between them (count,
      |   mean normal angle, concavity, colour step) and of the two segments (size, box, colour histogram)
      | agglomeration: repeatedly merge the pair of highest p(same object) (``MergeModel.pair``), the merged
      |   cluster's statistics are sums, so its pairs with its neighbours are re-featured and re-scored;
      |   stop below ``min_merge_p`` or past ``max_extent``                               -> merge tree
      v each cluster of the tree of >= ``min_points`` points is a proposal; score = objectness
        (``MergeModel.objectness``: the cluster's size / box / height and the p that made it and that
        absorbed it); near duplicates (IoU >= ``nms_iou``) of a better-scored proposal dropped

Why: single-linkage components over fixed thresholds leak (measured on scene0000_02: the best IoU any union
of components at a 40 degree level can reach is > 0.5 for 20% of the objects, 96% at the strict level), so
the over-segmentation is strict and the merging uses pair statistics that are re-computed as clusters grow
(average linkage over the boundary), with weights learned from annotated scans instead of hand-set limits.

The two models are tiny MLPs (:class:`MergeModel`, numpy inference, weights in safetensors) trained by
:func:`train_merge_model` on annotated scenes (synthetic ones and at most one real scan): pairs are labelled
by the majority ground-truth instance of each side, clusters by their best IoU with a GT instance.
Training runs the agglomeration with the model of the previous round (DAgger-style), so the pairs it learns
from look like the ones it meets at inference. Hand-written: the agglomeration over a region adjacency
graph with re-featured edges (scipy's hierarchy has no connectivity constraint and no custom linkage; the
loop is over merges, a few hundred per scene, each step numpy).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from scene3d.tokenizer.geometric_proposals import GeometricConfig, GeometricProposals, cell_edges, cells_of

HIST_BINS = 4  # per rgb channel: a 64-bin colour histogram per segment


@dataclass(frozen=True)
class MergeConfig:
    geometric: GeometricConfig = field(default_factory=GeometricConfig)  # cells, normals, planes, link
    seg_angle: float = 15.0  # over-segmentation edges: max normal angle (degrees) ...
    seg_colour: float = 0.08  # ... max rgb distance (0..1 units) ...
    seg_concave: float = 0.1  # ... max concavity (n_i - n_j) . unit(x_j - x_i)
    seg_size: float = 0.5  # metres: over-segments are cut by a grid of this size
    seg_min_cells: int = 4  # pieces of fewer cells are absorbed into a neighbour
    min_merge_p: float = 0.05  # agglomeration stops when no pair is above this
    max_extent: float = 3.0  # metres: no cluster longer than this on any axis
    min_points: int = 100
    nms_iou: float = 0.9  # a proposal this close to a better-scored one is dropped
    max_proposals: int = 400  # the best-scored ones kept

    def __post_init__(self) -> None:
        if not 0 <= self.min_merge_p < 1:
            raise ValueError(f"min_merge_p must be in [0, 1), got {self.min_merge_p}")
        if self.seg_size <= 0 or self.max_extent <= 0:
            raise ValueError(f"seg_size and max_extent must be > 0 in {self}")


# ------------------------------------------------------------------------------------------------ features
class _Scene(NamedTuple):
    inverse: np.ndarray  # [N] cell of each point
    weight: np.ndarray  # [V] points per cell
    xyz: np.ndarray  # [V, 3]
    structural: np.ndarray  # [V] bool
    num_planes: int
    seg: np.ndarray  # [V] segment per cell, -1 structural
    seg_stats: dict  # per segment arrays (additive): w, xyz_sum, col_sum, nrm_sum, hist, lo, hi
    edges: np.ndarray  # [E, 2] segment pairs a < b
    edge_stats: np.ndarray  # [E, K] additive sums of the cell edges between them (EDGE_STATS)


#: additive statistics of the cell edges between two segments
EDGE_STATS = ("count", "angle", "concave", "concave_count", "colour")


def _front(coord: np.ndarray, color: Optional[np.ndarray], cfg: MergeConfig) -> _Scene:
    g = cfg.geometric
    c = cells_of(coord, color, g)
    inverse, w, xyz, col, normal = c.inverse, c.weight, c.xyz, c.color, c.normal
    structural, planes, keep = c.structural, c.num_planes, c.keep
    seg = np.full(len(w), -1, np.int64)
    if len(keep) < 2:
        seg[keep] = np.arange(len(keep))
        return _Scene(inverse, w, xyz, structural, planes, seg, _seg_stats(seg, w, xyz, col, normal, len(keep)),
                      np.zeros((0, 2), np.int64), np.zeros((0, len(EDGE_STATS))))
    pairs, angle, cdist, concave = cell_edges(c, g)

    # over-segmentation: strict components, cut by a grid so one leak cannot join far-apart surfaces
    ok = (angle <= cfg.seg_angle) & (cdist <= cfg.seg_colour) & (concave <= cfg.seg_concave)
    m = len(keep)
    _, comp = connected_components(coo_matrix((np.ones(int(ok.sum())), (pairs[ok, 0], pairs[ok, 1])), shape=(m, m)),
                                   directed=False)
    grid = np.floor((xyz[keep] - xyz[keep].min(0)) / cfg.seg_size).astype(np.int64)
    _, local = np.unique(np.column_stack([comp, grid]), axis=0, return_inverse=True)
    local = local.reshape(-1)
    # tiny pieces join the neighbouring piece they share most cell edges with (a few rounds: chains of them)
    a, b = pairs[:, 0], pairs[:, 1]
    for _ in range(3):
        size = np.bincount(local)
        small = size[local] < cfg.seg_min_cells
        la, lb = local[a], local[b]
        cand = np.concatenate([np.column_stack([la, lb])[small[a] & ~small[b] & (la != lb)],
                               np.column_stack([lb, la])[small[b] & ~small[a] & (la != lb)]])
        if len(cand) == 0:
            break
        u, cnt = np.unique(cand, axis=0, return_counts=True)
        order = np.lexsort((-cnt, u[:, 0]))
        first = order[np.r_[True, u[order, 0][1:] != u[order, 0][:-1]]]
        target = np.arange(len(size))
        target[u[first, 0]] = u[first, 1]
        local = target[local]
    _, local = np.unique(local, return_inverse=True)
    local = local.reshape(-1)
    seg[keep] = local
    s = int(local.max()) + 1
    stats = _seg_stats(seg, w, xyz, col, normal, s)

    la, lb = local[a], local[b]
    cross = la != lb
    lo_, hi_ = np.minimum(la, lb)[cross], np.maximum(la, lb)[cross]
    key = lo_ * s + hi_
    uniq, inv = np.unique(key, return_inverse=True)
    vals = np.column_stack([np.ones(int(cross.sum())), angle[cross], np.maximum(concave[cross], 0),
                            (concave[cross] > 0.15).astype(np.float64), cdist[cross]])
    esum = np.zeros((len(uniq), len(EDGE_STATS)))
    np.add.at(esum, inv.reshape(-1), vals)
    edges = np.column_stack([uniq // s, uniq % s])
    return _Scene(inverse, w, xyz, structural, planes, seg, stats, edges, esum)


def _seg_stats(seg, w, xyz, col, normal, s: int) -> dict:
    ok = seg >= 0
    sg, ww = seg[ok], w[ok].astype(np.float64)

    def total(x):
        out = np.zeros((s,) + x.shape[1:])
        np.add.at(out, sg, x)
        return out

    q = np.clip((col[ok] * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    hist = np.zeros((s, HIST_BINS ** 3))
    np.add.at(hist, (sg, q[:, 0] * HIST_BINS * HIST_BINS + q[:, 1] * HIST_BINS + q[:, 2]), ww)
    lo = np.full((s, 3), np.inf)
    hi = np.full((s, 3), -np.inf)
    np.minimum.at(lo, sg, xyz[ok])
    np.maximum.at(hi, sg, xyz[ok])
    # normals oriented inwards may flip sign across a surface: accumulate the outer product, whose top
    # eigenvector is the segment's normal whatever the signs
    nn = normal[ok][:, :, None] * normal[ok][:, None, :]
    return {"w": total(ww), "cells": total(np.ones(len(sg))), "xyz": total(xyz[ok] * ww[:, None]),
            "col": total(col[ok] * ww[:, None]), "nn": total(nn * ww[:, None, None]), "hist": hist, "lo": lo, "hi": hi}


def _principal(nn: np.ndarray) -> np.ndarray:
    """Unit top eigenvector of each summed outer product ``[K, 3, 3]`` (a segment's dominant normal) and the
    share of the trace it holds (1 for a plane)."""
    val, vec = np.linalg.eigh(nn)
    return vec[:, :, -1], val[:, -1] / np.maximum(val.sum(1), 1e-12)


#: names of the pair features (:func:`pair_features`)
PAIR_FEATURES = ("log_w_small", "log_w_large", "log_boundary", "boundary_ratio", "mean_angle", "mean_concave",
                 "concave_share", "boundary_colour", "mean_colour_dist", "hist_dist", "normal_angle",
                 "planar_small", "planar_large", "extent_union", "height_union", "zmin_low", "zmin_high",
                 "zmax_high", "gap_z", "footprint_overlap")


def _seg_view(stats: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in stats.items()}


def pair_features(sa: dict, sb: dict, e: np.ndarray) -> np.ndarray:
    """Features ``[K, F]`` of K segment pairs from their additive statistics (``sa`` / ``sb``: per-segment
    stat arrays of each side, ``e``: the edge sums ``[K, EDGE_STATS]``). Symmetric in the two sides."""
    # every "small / large" feature is an elementwise min / max, so the pair's features do not depend on
    # which side is called a
    ws, wl = np.minimum(sa["w"], sb["w"]), np.maximum(sa["w"], sb["w"])
    cs = np.minimum(sa["cells"], sb["cells"])
    cnt = np.maximum(e[:, 0], 1)
    ca, cb = sa["col"] / sa["w"][:, None], sb["col"] / sb["w"][:, None]
    ha = sa["hist"] / np.maximum(sa["hist"].sum(1, keepdims=True), 1e-12)
    hb = sb["hist"] / np.maximum(sb["hist"].sum(1, keepdims=True), 1e-12)
    na, pa = _principal(sa["nn"])
    nb, pb = _principal(sb["nn"])
    ps, pl = np.minimum(pa, pb), np.maximum(pa, pb)
    lo, hi = np.minimum(sa["lo"], sb["lo"]), np.maximum(sa["hi"], sb["hi"])
    ext = hi - lo
    zmin_lo, zmin_hi = np.minimum(sa["lo"][:, 2], sb["lo"][:, 2]), np.maximum(sa["lo"][:, 2], sb["lo"][:, 2])
    gap_z = np.maximum(0, np.maximum(sa["lo"][:, 2], sb["lo"][:, 2]) - np.minimum(sa["hi"][:, 2], sb["hi"][:, 2]))
    ov = np.maximum(0, np.minimum(sa["hi"][:, :2], sb["hi"][:, :2]) - np.maximum(sa["lo"][:, :2], sb["lo"][:, :2]))
    area = np.minimum((sa["hi"][:, :2] - sa["lo"][:, :2] + 0.05).prod(1),
                      (sb["hi"][:, :2] - sb["lo"][:, :2] + 0.05).prod(1))
    foot = ov.prod(1) / np.maximum(area, 1e-6)
    return np.column_stack([
        np.log1p(ws), np.log1p(wl), np.log1p(e[:, 0]), e[:, 0] / np.maximum(cs, 1) ** (2 / 3),
        e[:, 1] / cnt / 90.0, e[:, 2] / cnt, e[:, 3] / cnt, e[:, 4] / cnt,
        np.linalg.norm(ca - cb, axis=1), 0.5 * np.abs(ha - hb).sum(1),
        np.abs((na * nb).sum(1)), ps, pl, ext.max(1), ext[:, 2], zmin_lo, zmin_hi, hi[:, 2], gap_z, foot,
    ])


#: names of the cluster features (:func:`cluster_features`)
CLUSTER_FEATURES = ("log_w", "log_segments", "ext_max", "ext_mid", "ext_min", "height", "zmin", "zmax",
                    "planar", "p_made", "p_absorbed", "p_best_out")


def cluster_features(st: dict, nseg: np.ndarray, p_made: np.ndarray, p_absorbed: np.ndarray,
                     p_out: np.ndarray) -> np.ndarray:
    ext = np.sort(st["hi"] - st["lo"], axis=1)[:, ::-1]
    _, planar = _principal(st["nn"])
    return np.column_stack([np.log1p(st["w"]), np.log1p(nseg), ext[:, 0], ext[:, 1], ext[:, 2], st["hi"][:, 2] -
                            st["lo"][:, 2], st["lo"][:, 2], st["hi"][:, 2], planar, p_made, p_absorbed, p_out])


# ------------------------------------------------------------------------------------------------ models
class _MLP(NamedTuple):
    """Standardise, then Linear-ReLU-Linear-ReLU-Linear; numpy inference."""

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    def logit(self, x: np.ndarray) -> np.ndarray:
        h = (x - self.mean) / self.std
        h = np.maximum(h @ self.w1 + self.b1, 0)
        h = np.maximum(h @ self.w2 + self.b2, 0)
        return (h @ self.w3 + self.b3)[:, 0]

    def prob(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.logit(x), -30, 30)))


def _fit_mlp(x: np.ndarray, y: np.ndarray, seed: int, hidden: int = 32, steps: int = 1500, weight=None) -> _MLP:
    """Binary cross-entropy on targets ``y`` in [0, 1] (full batch, AdamW): torch for the gradients only."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std).float()
    yt = torch.from_numpy(y).float()
    wt = torch.ones_like(yt) if weight is None else torch.from_numpy(weight).float()
    layers = [torch.nn.Linear(x.shape[1], hidden), torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 1)]
    for lin in layers:
        torch.nn.init.kaiming_uniform_(lin.weight, a=5 ** 0.5, generator=g)
        torch.nn.init.zeros_(lin.bias)
    net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt)[:, 0], yt, weight=wt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = [t.detach().double().numpy() for lin in layers for t in (lin.weight.T, lin.bias)]
    return _MLP(mean, std, *p)


@dataclass
class MergeModel:
    """The pair classifier (p(same object) of two segments) and the objectness of a cluster."""

    pair: _MLP
    objectness: _MLP
    meta: dict = field(default_factory=dict)  # what it was trained on

    def save(self, path) -> None:
        from safetensors.numpy import save_file

        t = {f"{k}.{f}": np.ascontiguousarray(getattr(m, f), np.float64) for k, m in
             (("pair", self.pair), ("objectness", self.objectness)) for f in _MLP._fields}
        save_file(t, str(path), metadata={"meta": json.dumps(self.meta), "pair_features": ",".join(PAIR_FEATURES),
                                          "cluster_features": ",".join(CLUSTER_FEATURES)})

    @classmethod
    def load(cls, path) -> "MergeModel":
        from safetensors import safe_open

        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            if meta.get("pair_features") != ",".join(PAIR_FEATURES) or \
                    meta.get("cluster_features") != ",".join(CLUSTER_FEATURES):
                raise ValueError(f"{path}: trained on other features than this code computes; train it again")
            t = {k: f.get_tensor(k) for k in f.keys()}
        mk = lambda p: _MLP(*(t[f"{p}.{f}"] for f in _MLP._fields))  # noqa: E731
        return cls(mk("pair"), mk("objectness"), json.loads(meta.get("meta", "{}")))


# ------------------------------------------------------------------------------------------------ merging
class _Tree(NamedTuple):
    members: list  # segment ids of each cluster (first S: the segments)
    parent: np.ndarray  # the cluster each one was merged into (-1: a root)
    p_made: np.ndarray  # p of the merge that made each cluster (1 for segments)
    p_absorbed: np.ndarray  # p of the merge that absorbed it (0: never)
    p_out: np.ndarray  # best p to a neighbour when it was made
    stats: dict  # per-cluster additive stats
    nseg: np.ndarray
    pairs_x: list  # features of every pair scored (for training)
    pairs_ab: list  # (cluster a, cluster b) of each


def _agglomerate(sc: _Scene, score_pairs, cfg: MergeConfig, record: bool = False) -> _Tree:
    """Greedy agglomeration over the segment adjacency graph (module docstring). ``score_pairs(features)``
    gives p(same) per pair."""
    s = len(sc.seg_stats["w"])
    cap = 2 * s
    st = {k: np.zeros((cap,) + v.shape[1:]) for k, v in sc.seg_stats.items()}  # one row per cluster
    for k, v in sc.seg_stats.items():
        st[k][:s] = v
    members = [[i] for i in range(s)]
    p_made, p_abs, p_out, nseg = [1.0] * s, [0.0] * s, [0.0] * s, [1] * s
    parent = [-1] * s
    nbr = [dict() for _ in range(s)]  # cluster -> {neighbour: edge stat row}
    for (a, b), e in zip(sc.edges.tolist(), sc.edge_stats):
        nbr[a][b] = e
        nbr[b][a] = e
    alive = [True] * s
    heap = []
    xs, abs_ = [], []

    def score(ia: np.ndarray, ib: np.ndarray, e: np.ndarray) -> np.ndarray:
        x = pair_features(_seg_view(st, ia), _seg_view(st, ib), e)
        ext = np.maximum(st["hi"][ia], st["hi"][ib]) - np.minimum(st["lo"][ia], st["lo"][ib])
        p = np.where(ext.max(1) > cfg.max_extent, 0.0, score_pairs(x))
        if record:
            xs.append(x)
            abs_.extend(zip(ia.tolist(), ib.tolist()))
        return p

    if len(sc.edges):
        p = score(sc.edges[:, 0], sc.edges[:, 1], sc.edge_stats)
        best = np.zeros(s)
        np.maximum.at(best, sc.edges[:, 0], p)
        np.maximum.at(best, sc.edges[:, 1], p)
        p_out = best.tolist()
        heap = [(-pi, a, b) for (a, b), pi in zip(sc.edges.tolist(), p.tolist()) if pi >= cfg.min_merge_p]
        heapq.heapify(heap)
    while heap:
        negp, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):
            continue
        c = len(members)
        members.append(members[a] + members[b])
        for k, v in st.items():
            if k == "lo":
                v[c] = np.minimum(v[a], v[b])
            elif k == "hi":
                v[c] = np.maximum(v[a], v[b])
            else:
                v[c] = v[a] + v[b]
        nseg.append(nseg[a] + nseg[b])
        alive[a] = alive[b] = False
        alive.append(True)
        parent[a] = parent[b] = c
        parent.append(-1)
        p_abs[a] = p_abs[b] = -negp
        p_made.append(-negp)
        p_abs.append(0.0)
        merged: dict = {}
        for old in (a, b):
            for q, e in nbr[old].items():
                if q in (a, b):
                    continue
                merged[q] = merged[q] + e if q in merged else e
                del nbr[q][old]
            nbr[old] = {}
        nbr.append(merged)
        for q, e in merged.items():
            nbr[q][c] = e
        if merged:
            qs = np.fromiter(merged, np.int64, len(merged))
            p = score(np.full(len(qs), c), qs, np.asarray(list(merged.values())))
            p_out.append(float(p.max()))
            for q, pq in zip(qs.tolist(), p.tolist()):
                if pq >= cfg.min_merge_p:
                    heapq.heappush(heap, (-pq, c, q))
        else:
            p_out.append(0.0)
    m = len(members)
    st = {k: v[:m] for k, v in st.items()}
    return _Tree(members, np.asarray(parent), np.asarray(p_made), np.asarray(p_abs), np.asarray(p_out), st,
                 np.asarray(nseg), xs, abs_)


def _cluster_masks(sc: _Scene, tree: _Tree, rows: np.ndarray) -> np.ndarray:
    """``[len(rows), N]`` bool point masks of clusters ``rows``."""
    s = len(sc.seg_stats["w"])
    seg_pts = sc.seg[sc.inverse]  # [N]
    out = np.zeros((len(rows), len(sc.inverse)), bool)
    for r, c in enumerate(rows):
        sel = np.zeros(s + 1, bool)
        sel[np.asarray(tree.members[c])] = True
        out[r] = sel[seg_pts]  # seg -1 -> sel[-1] = the padding entry, False
    return out


def _tree_features(tree: _Tree) -> np.ndarray:
    return cluster_features(tree.stats, tree.nseg, tree.p_made, tree.p_absorbed, tree.p_out)


def merge_proposals(coord: np.ndarray, color: Optional[np.ndarray], model: "MergeModel",
                    cfg: Optional[MergeConfig] = None) -> GeometricProposals:
    """Proposals of one scene (module docstring), as :class:`GeometricProposals` (masks, scores sorted)."""
    cfg = cfg or MergeConfig()
    sc = _front(coord, color, cfg)
    tree = _agglomerate(sc, model.pair.prob, cfg)
    keep = np.nonzero((tree.stats["w"] >= cfg.min_points) &
                      ((tree.stats["hi"] - tree.stats["lo"]).max(1) <= cfg.max_extent))[0]
    score = model.objectness.prob(_tree_features(tree)[keep]) if len(keep) else np.zeros(0)
    order = np.argsort(-score, kind="stable")
    keep, score = keep[order], score[order]
    if cfg.nms_iou < 1 and len(keep):
        sel = _tree_nms(tree, keep, cfg.nms_iou)
        keep, score = keep[sel], score[sel]
    keep, score = keep[:cfg.max_proposals], score[:cfg.max_proposals]
    return GeometricProposals(_cluster_masks(sc, tree, keep), score, sc.structural[sc.inverse], sc.num_planes)


def _tree_nms(tree: _Tree, rows: np.ndarray, iou: float) -> np.ndarray:
    """Positions in ``rows`` (clusters sorted by score) kept by non-max suppression at ``iou``. Clusters of a
    merge tree are nested or disjoint, so the IoU of two is the smaller's weight over the larger's when one
    holds the other, else 0: only a cluster's near ancestors can clash with it, found by walking up while
    the weight ratio stays >= ``iou`` (weights grow upwards)."""
    w = tree.stats["w"]
    pos = {int(c): k for k, c in enumerate(rows)}
    clash = [[] for _ in rows]
    for k, c in enumerate(rows.tolist()):
        a = tree.parent[c]
        while a >= 0 and w[c] >= iou * w[a]:
            if a in pos:
                clash[k].append(pos[a])
                clash[pos[a]].append(k)
            a = tree.parent[a]
    kept = np.zeros(len(rows), bool)
    for k in range(len(rows)):
        kept[k] = not any(kept[q] for q in clash[k])
    return np.nonzero(kept)[0]


# ------------------------------------------------------------------------------------------------ training
class TrainScene(NamedTuple):
    name: str
    coord: np.ndarray
    color: np.ndarray
    instance: np.ndarray  # [N] GT instance id, -1 none
    classes: dict  # instance id -> nyu40 id (wall / floor / ceiling: not an object)


def _majority(sc: _Scene, inst_pts: np.ndarray, members: list) -> tuple[np.ndarray, np.ndarray]:
    """Majority GT instance and its share of each cluster's points (instance -1 counts as its own 'none')."""
    s = len(sc.seg_stats["w"])
    seg_pts = sc.seg[sc.inverse]
    ok = seg_pts >= 0
    ids, inst_row = np.unique(inst_pts[ok], return_inverse=True)
    counts = np.zeros((s, len(ids)))
    np.add.at(counts, (seg_pts[ok], inst_row.reshape(-1)), 1)
    maj, share = np.full(len(members), -1), np.zeros(len(members))
    for c, mem in enumerate(members):
        tot = counts[mem].sum(0)
        k = int(tot.argmax())
        maj[c], share[c] = ids[k], tot[k] / max(tot.sum(), 1)
    return maj, share


def _best_iou(sc: _Scene, scene: TrainScene, members: list, exclude=(1, 2, 22), min_points: int = 100) -> np.ndarray:
    s = len(sc.seg_stats["w"])
    seg_pts = sc.seg[sc.inverse]
    inst = scene.instance
    gt = [i for i in np.unique(inst) if i >= 0 and (inst == i).sum() >= min_points and
          int(scene.classes.get(int(i), 0)) not in exclude]
    row = {int(i): r for r, i in enumerate(gt)}
    pt_gt = np.array([row.get(int(i), -1) for i in inst]) if len(gt) else np.full(len(inst), -1)
    ok = seg_pts >= 0
    seg_size = np.bincount(seg_pts[ok], minlength=s).astype(np.float64)
    inter = np.zeros((s, max(len(gt), 1)))
    sel = ok & (pt_gt >= 0)
    np.add.at(inter, (seg_pts[sel], pt_gt[sel]), 1)
    gsize = np.bincount(pt_gt[pt_gt >= 0], minlength=max(len(gt), 1)).astype(np.float64)
    out = np.zeros(len(members))
    for c, mem in enumerate(members):
        it = inter[mem].sum(0)
        size = seg_size[mem].sum()
        out[c] = (it / np.maximum(size + gsize - it, 1)).max() if len(gt) else 0.0
    return out


def _unit_mean(w: np.ndarray) -> np.ndarray:
    return w / max(float(w.mean()), 1e-12)


def train_merge_model(scenes: Sequence[TrainScene], cfg: Optional[MergeConfig] = None, rounds: int = 2,
                      seed: int = 0, weights: Optional[Sequence[float]] = None, log=print) -> MergeModel:
    """Fit :class:`MergeModel` on annotated ``scenes`` (module docstring). Round 0 learns the pair classifier
    from the over-segmentation's adjacent pairs; each later round runs the agglomeration with the current
    model on every scene and adds the pairs it scored; the objectness model learns the clusters of the last
    round's trees (target: best IoU with a counted GT instance). Each scene weighs ``weights[i]`` (default 1)
    in both losses, however many pairs / clusters it has."""
    cfg = cfg or MergeConfig()
    if not scenes:
        raise ValueError("train_merge_model: no scenes")
    weights = np.ones(len(scenes)) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != (len(scenes),) or (weights <= 0).any():
        raise ValueError(f"weights: one > 0 per scene ({len(scenes)}), got {weights}")
    fronts = [_front(s.coord, s.color, cfg) for s in scenes]
    px, py, pw = [], [], []

    def add_pairs(sc, scene, members, ab, x, sw):
        maj, share = _majority(sc, scene.instance, members)
        a, b = np.asarray(ab).T
        struct = np.array([int(scene.classes.get(int(i), 0)) in (1, 2, 22) for i in maj])
        same = (maj[a] == maj[b]) & (maj[a] >= 0) & ~struct[a]
        px.append(x)
        py.append(same.astype(np.float64))
        pw.append(np.full(len(same), sw / max(len(same), 1)))  # a scene weighs sw, whatever its size

    for sc, scene, sw in zip(fronts, scenes, weights):
        x = pair_features(_seg_view(sc.seg_stats, sc.edges[:, 0]), _seg_view(sc.seg_stats, sc.edges[:, 1]),
                          sc.edge_stats)
        add_pairs(sc, scene, [[i] for i in range(len(sc.seg_stats["w"]))], sc.edges, x, sw)
    pair = _fit_mlp(np.concatenate(px), np.concatenate(py), seed, weight=_unit_mean(np.concatenate(pw)))
    for r in range(rounds):
        for sc, scene, sw in zip(fronts, scenes, weights):
            tree = _agglomerate(sc, pair.prob, cfg, record=True)
            if tree.pairs_x:
                add_pairs(sc, scene, tree.members, tree.pairs_ab, np.concatenate(tree.pairs_x), sw)
        x, y = np.concatenate(px), np.concatenate(py)
        log(f"merge model round {r + 1}/{rounds}: {len(y)} pairs, {y.mean():.2f} same")
        pair = _fit_mlp(x, y, seed + r + 1, weight=_unit_mean(np.concatenate(pw)))
    ox, oy, ow = [], [], []
    for sc, scene, sw in zip(fronts, scenes, weights):
        tree = _agglomerate(sc, pair.prob, cfg)
        keep = np.nonzero(tree.stats["w"] >= cfg.min_points)[0]
        iou = _best_iou(sc, scene, [tree.members[c] for c in keep])
        ox.append(_tree_features(tree)[keep])
        oy.append((iou > 0.5).astype(np.float64) * 0.5 + np.clip(iou, 0, 1) * 0.5)
        ow.append(np.full(len(keep), sw / max(len(keep), 1)))
    objectness = _fit_mlp(np.concatenate(ox), np.concatenate(oy), seed + 100,
                          weight=_unit_mean(np.concatenate(ow)))
    return MergeModel(pair, objectness, {"scenes": [s.name for s in scenes], "config": repr(cfg)})


__all__ = ["MergeConfig", "MergeModel", "TrainScene", "merge_proposals", "train_merge_model", "PAIR_FEATURES",
           "CLUSTER_FEATURES"]
