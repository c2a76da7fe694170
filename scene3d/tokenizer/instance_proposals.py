"""Learned instance proposals (PointGroup-style) for scans without annotations.

::

    points [N] --voxel grid (``voxel`` m; mean rgb and height above the floor per cell)--> V cells
      v sparse U-Net (spconv, :class:`scene3d.tokenizer.backbone.SparseUNet`)          -> [V, C]
      v per cell: nyu40 class logits [V, 41] and the offset to its instance's box centre [V, 3]
      | cells of a non-structural class (not wall / floor / ceiling), one class at a time:
      |   connected components of the cells within r of each other, for each r of ``radii``, on the voted
      |   centres (cell + offset) and on the cells themselves (PointGroup's dual sets); the same over all
      |   non-structural cells at ``agnostic_radii``                                     -> candidates
      v score MLP: each candidate's predicted IoU with its best ground-truth instance, from its size, extent,
      |   class confidence and purity, the spread of its votes and its mean / max backbone features
      v non-maximum suppression (IoU > ``nms_iou``, counted in points)                   -> proposals

Trained per scan set by :func:`train_instance_model`: the U-Net on class cross-entropy (unannotated points
ignored) plus offset L1 + direction loss, with random rotation about z, mirroring, scaling, colour jitter and
crops; then the score MLP on the candidates of augmented passes over the training scans, against their IoU
with the ground truth. Nothing of the scans it is applied to is seen. ``bench/proposals.py`` measures it
(README, "Proposals on real scans").

Why this is written here: PointGroup, SoftGroup and Mask3D are research code bases with CUDA-only ops
(ball queries, voxelisation kernels) and no CPU packaging; the network is the project's own spconv U-Net and
every step is a library call (scipy's KD-tree and connected components, torch).

A model is a directory: ``model.safetensors`` (U-Net, heads, score MLP and its input normalisation) and
``config.json`` (:class:`InstanceConfig` and what it was trained on), written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from torch import nn

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scene3d.data.labels import nyu40_name
from scene3d.sparse.spconv_compat import sparse_tensor
from scene3d.tokenizer.backbone import BackboneConfig, SparseUNet
from scene3d.tokenizer.geometric_proposals import ProposalObjects, flatten_masks
from scene3d.tokenizer.geometric_proposals import proposal_objects as geometric_objects
from scene3d.tokenizer.proposals import instance_centers
from scene3d.tokenizer.voxelize import scatter_pool
from scene3d.utils.io import write_json_atomic

#: nyu40 ids of wall, floor and ceiling: never proposals (ScanNet's instance benchmark leaves them out)
STRUCTURAL = (1, 2, 22)
NUM_CLASSES = 41  # nyu40 ids 0..40; 0 (unannotated) is never a training target
IN_CHANNELS = 4  # rgb in [-1, 1] and height above the floor / 3 m
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = 1


@dataclass
class InstanceConfig:
    voxel: float = 0.04
    channels: tuple = (32, 48, 64, 96, 128)
    # metres between cells of one predicted class joined into one candidate; and the same over all
    # non-structural cells whatever their class. These radii and nms_iou were chosen with the roles of the two
    # real rescans swapped (trained on scene0000_02, measured on scene0000_01: README), so the figure of the
    # other direction (trained on scene0000_01, measured on scene0000_02) is not tuned on its test scan
    radii: tuple = (0.03, 0.05, 0.07, 0.1, 0.15)
    agnostic_radii: tuple = (0.04, 0.06)
    min_points: int = 50  # input points of a candidate ...
    min_cells: int = 5  # ... and cells (a denser scan of the same surface has more points, not more cells)
    max_proposals: int = 200  # the best this many after suppression (llm=smollm2 has 200 object identifiers)
    nms_iou: float = 0.5
    score_hidden: int = 64
    structural: tuple = STRUCTURAL

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.radii = tuple(float(r) for r in self.radii)
        self.agnostic_radii = tuple(float(r) for r in self.agnostic_radii)
        self.structural = tuple(int(c) for c in self.structural)
        if self.voxel <= 0 or not self.radii or min(self.radii) <= 0:
            raise ValueError(f"voxel and radii must be > 0 in {self}")
        if self.min_points < 1 or self.min_cells < 1 or self.max_proposals < 1 or not 0 < self.nms_iou <= 1:
            raise ValueError(f"min_points must be >= 1 and nms_iou in (0, 1] in {self}")


class InstanceProposals(NamedTuple):
    """Proposals of one scene, best first.

    ==============  ==============  ======================================================================
    ``masks``       [P, N] bool     points of each proposal (they may overlap up to ``nms_iou``)
    ``scores``      [P] float       predicted IoU with a ground-truth object, descending
    ``classes``     [P] int         majority predicted nyu40 id of each proposal
    ``num_candidates`` int          candidates before non-maximum suppression
    ``num_dropped`` int             proposals left after suppression but past ``max_proposals`` (warned)
    ==============  ==============  ======================================================================
    """

    masks: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    num_candidates: int
    num_dropped: int = 0

    @property
    def num_proposals(self) -> int:
        return int(self.masks.shape[0])


class TrainScan(NamedTuple):
    """An annotated scan: ``coord [N, 3]``, ``color [N, 3]`` (0..255), ``instance [N]`` (-1 none) and
    ``semantic [N]`` (nyu40 id of each point's object, 0 none)."""

    name: str
    coord: np.ndarray
    color: np.ndarray
    instance: np.ndarray
    semantic: np.ndarray


def semantic_of(instance: np.ndarray, classes: dict) -> np.ndarray:
    """``[N]`` nyu40 id of each point's object (``classes``: object id -> nyu40 id); 0 where the point has no
    object or its object has no class."""
    inst = np.asarray(instance, np.int64)
    ids = np.array(sorted(classes), np.int64)
    semantic = np.zeros(len(inst), np.int64)
    if len(ids):
        pos = np.clip(np.searchsorted(ids, inst), 0, len(ids) - 1)
        hit = (inst >= 0) & (ids[pos] == inst)
        semantic[hit] = np.array([classes[int(i)] for i in ids], np.int64)[pos[hit]]
    return semantic


def scan_from_scene(scene) -> TrainScan:
    """A :class:`TrainScan` from a processed (or export) scene of :func:`scene3d.data.scene.load_processed_scene`."""
    if scene.instance is None:
        raise ValueError(f"scene {scene.scene_id!r} has no instance labels: it cannot train proposals")
    inst = np.asarray(scene.instance, np.int64)
    semantic = semantic_of(inst, {int(o.id): int(o.nyu40_id) for o in scene.objects})
    if len(np.unique(inst[inst >= 0])) < 2:
        raise ValueError(f"scene {scene.scene_id!r} has fewer than two annotated objects: it cannot train proposals")
    color = np.zeros((len(inst), 3), np.float32) if scene.color is None else np.asarray(scene.color, np.float32)
    return TrainScan(scene.scene_id, np.asarray(scene.coord, np.float32), color, inst, semantic)


# ---------------------------------------------------------------------------------------------- inputs
class Cells(NamedTuple):
    indices: np.ndarray  # [V, 3] int grid cell of each voxel
    feat: np.ndarray  # [V, IN_CHANNELS]
    inverse: np.ndarray  # [N] cell of each point
    count: np.ndarray  # [V] points per cell
    centre: np.ndarray  # [V, 3] mean position of each cell's points


def _check_scan(coord: np.ndarray, color: Optional[np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    coord = np.asarray(coord, np.float32)
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise ValueError(f"{what}: coord must be [N, 3], got {coord.shape}")
    if len(coord) == 0:
        raise ValueError(f"{what}: the scan has no points")
    if not np.isfinite(coord).all():
        raise ValueError(f"{what}: coordinates hold NaN or inf")
    if color is None:
        color = np.full((len(coord), 3), 127.5, np.float32)
    color = np.asarray(color, np.float32)
    if color.shape != coord.shape:
        raise ValueError(f"{what}: color must be [{len(coord)}, 3], got {color.shape}")
    if color.size and color.max() <= 1.0:  # colours in [0, 1]
        color = color * 255.0
    return coord, color


def cells(coord: np.ndarray, color: np.ndarray, voxel: float) -> Cells:
    """Mean input features per voxel: rgb in [-1, 1] and the height above the scan's floor (its 1st
    percentile height) over 3 m; rotation about z does not change them."""
    rgb = color / 127.5 - 1.0
    z = coord[:, 2] - np.percentile(coord[:, 2], 1)
    feat = np.concatenate([rgb, z[:, None] / 3.0], 1)
    g = np.floor((coord - coord.min(0)) / voxel).astype(np.int64)
    span = g.max(0) + 1
    key = (g[:, 0] * span[1] + g[:, 1]) * span[2] + g[:, 2]  # one integer per cell: a 1-D unique is much faster
    ukey, inverse, count = np.unique(key, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    uniq = np.stack([ukey // (span[1] * span[2]), (ukey // span[2]) % span[1], ukey % span[2]], 1)

    def mean(x: np.ndarray) -> np.ndarray:  # per cell, over its points
        return np.stack([np.bincount(inverse, x[:, j], len(uniq)) for j in range(x.shape[1])], 1) / count[:, None]

    return Cells(uniq, mean(feat).astype(np.float32), inverse, count, mean(coord).astype(np.float32))


def augment(scan: TrainScan, rng: np.random.Generator) -> TrainScan:
    """Random rotation about z, mirroring, scaling (0.9-1.1), colour jitter and, half the time, a crop to a
    random 50-90% of the floor plan."""
    coord, color = scan.coord.astype(np.float32), scan.color.astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(a), np.sin(a)
    coord = coord @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float32).T
    if rng.random() < 0.5:
        coord[:, 0] *= -1
    coord = coord * rng.uniform(0.9, 1.1)
    color = np.clip(color * rng.uniform(0.8, 1.2) + rng.normal(0, 12, 3) + rng.normal(0, 4, color.shape), 0, 255)
    keep = slice(None)
    if rng.random() < 0.5:
        lo, hi = coord[:, :2].min(0), coord[:, :2].max(0)
        w = (hi - lo) * rng.uniform(0.5, 0.9)
        o = lo + rng.random(2) * (hi - lo - w)
        keep = np.all((coord[:, :2] >= o) & (coord[:, :2] <= o + w), 1)
        if keep.sum() < 1000:
            keep = slice(None)
    return TrainScan(scan.name, coord[keep], color[keep].astype(np.float32), scan.instance[keep], scan.semantic[keep])


# ---------------------------------------------------------------------------------------------- network
class InstanceNet(nn.Module):
    def __init__(self, cfg: InstanceConfig) -> None:
        super().__init__()
        self.unet = SparseUNet(BackboneConfig(in_channels=IN_CHANNELS, channels=cfg.channels, blocks=1))
        c = cfg.channels[0]
        self.semantic = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, NUM_CLASSES))
        self.offset = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 3))
        self.depth = len(cfg.channels) - 1

    def forward(self, cl: Cells) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per cell: features [V, C], class logits [V, 41], offsets [V, 3]."""
        idx = torch.from_numpy(cl.indices)
        step = 2 ** self.depth
        shape = [((int(s) + step) // step) * step for s in idx.max(0).values + 1]
        x = sparse_tensor(torch.from_numpy(cl.feat), torch.cat([torch.zeros(len(idx), 1, dtype=torch.long), idx], 1),
                          shape, 1)
        f = self.unet(x).features
        return f, self.semantic(f), self.offset(f)


def _cell_targets(scan: TrainScan, cl: Cells, structural: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: majority nyu40 class (-100 where no annotated point) and the mean offset of its object
    points to their box centres (NaN where none)."""
    v = len(cl.count)
    sem = scan.semantic.copy()
    sem[scan.instance < 0] = 0
    votes = coo_matrix((np.ones(len(sem)), (cl.inverse, sem)), shape=(v, NUM_CLASSES)).toarray()
    votes[:, 0] = 0
    cls = np.where(votes.sum(1) > 0, votes.argmax(1), -100)
    obj = (scan.instance >= 0) & ~np.isin(sem, structural) & (sem > 0)
    coord, inst = torch.from_numpy(scan.coord), torch.from_numpy(scan.instance)
    off = (instance_centers(coord, inst, torch.zeros_like(inst)) - coord).numpy()  # box centre of each object
    n = np.bincount(cl.inverse[obj], minlength=v)
    tgt = np.stack([np.bincount(cl.inverse[obj], off[obj, j], v) for j in range(3)], 1) / np.maximum(n, 1)[:, None]
    tgt[n == 0] = np.nan
    return cls, tgt.astype(np.float32)


# ---------------------------------------------------------------------------------------------- grouping
class _Candidates(NamedTuple):
    cells: list  # [P] arrays of cell ids
    radius: np.ndarray  # [P]
    shifted: np.ndarray  # [P] 1 on voted centres, 0 on cell positions


def _candidates(centre: np.ndarray, voted: np.ndarray, cls: np.ndarray, fg: np.ndarray, count: np.ndarray,
                cfg: InstanceConfig) -> _Candidates:
    out, rad, sh = [], [], []
    groups = [(np.nonzero(fg & (cls == c))[0], cfg.radii) for c in np.unique(cls[fg])]
    if cfg.agnostic_radii:
        groups.append((np.nonzero(fg)[0], cfg.agnostic_radii))
    for idx, radii in groups:
        if count[idx].sum() < cfg.min_points:
            continue
        for shifted, pts in ((1, voted[idx]), (0, centre[idx])):
            tree = cKDTree(pts)
            for r in radii:
                pairs = tree.query_pairs(r, output_type="ndarray")
                adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(idx), len(idx)))
                _, comp = connected_components(adj, directed=False)
                size = np.bincount(comp, weights=count[idx])
                ncell = np.bincount(comp)
                order = np.argsort(comp, kind="stable")
                bounds = np.searchsorted(comp[order], np.arange(len(size) + 1))
                for k in np.nonzero((size >= cfg.min_points) & (ncell >= cfg.min_cells))[0]:
                    out.append(idx[order[bounds[k]:bounds[k + 1]]])
                    rad.append(r)
                    sh.append(shifted)
    return _Candidates(out, np.asarray(rad, np.float32), np.asarray(sh, np.float32))


def _membership(cand: list, v: int) -> csr_matrix:
    rows = np.repeat(np.arange(len(cand)), [len(c) for c in cand])
    cols = np.concatenate(cand) if cand else np.zeros(0, np.int64)
    return csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(cand), v))


def _features(cand: _Candidates, member: csr_matrix, feat: np.ndarray, prob: np.ndarray, voted: np.ndarray,
              centre: np.ndarray, count: np.ndarray, structural: Sequence[int]) -> np.ndarray:
    """Per candidate: log cells, log extents (sorted), mean non-structural probability, mean probability and
    share of its majority class, spread of its votes, distance of the mean vote from its box centre, radius,
    which set, its height range, and the mean and the max of its cells' backbone features (cells weigh the
    same whatever their point counts)."""
    # statistics over cells, not points, so that they do not change with the scan's point density
    n = np.asarray(member.sum(1)).ravel()
    mean = lambda x: np.asarray(member @ x) / n[:, None]  # noqa: E731
    non_struct = 1.0 - prob[:, list(structural)].sum(1, keepdims=True)
    hard = np.zeros_like(prob)
    hard[np.arange(len(prob)), prob.argmax(1)] = 1
    share = mean(hard)
    maj = share.argmax(1)
    p_maj = mean(prob)[np.arange(len(maj)), maj]
    vm = mean(voted)
    spread = np.sqrt(np.maximum(mean(voted ** 2) - vm ** 2, 0)).mean(1)
    cells_all = np.concatenate(cand.cells)
    starts = np.cumsum([0] + [len(c) for c in cand.cells[:-1]])
    fmax = np.maximum.reduceat(feat[cells_all], starts, axis=0)
    lo = np.minimum.reduceat(centre[cells_all], starts, axis=0)
    hi = np.maximum.reduceat(centre[cells_all], starts, axis=0)
    ext = np.sort(hi - lo, 1)
    box_c = (lo + hi) / 2
    rows = np.column_stack([np.log(n), np.log(ext + 1e-2), mean(non_struct)[:, 0], p_maj, share.max(1), spread,
                            np.linalg.norm(vm - box_c, axis=1), cand.radius, cand.shifted, lo[:, 2], hi[:, 2]])
    return np.concatenate([rows, mean(feat), fmax], 1).astype(np.float32), maj


def _nms(member: csr_matrix, count: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    """Kept candidate rows, best first: a candidate is dropped when its point IoU with a kept one exceeds ``thr``."""
    w = member.multiply(count[None, :]).tocsr()
    inter = (w @ member.T).toarray()
    size = np.diag(inter)
    iou = inter / np.maximum(size[:, None] + size[None, :] - inter, 1e-9)
    keep: list = []
    for i in np.argsort(-scores, kind="stable"):
        if not keep or iou[i, keep].max() <= thr:
            keep.append(i)
    return np.asarray(keep, np.int64)


# ---------------------------------------------------------------------------------------------- model
class ScoreMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std)[:, 0]


def _feature_dim(cfg: InstanceConfig) -> int:
    return 13 + 2 * cfg.channels[0]


class InstanceProposer(nn.Module):
    """The trained U-Net and score MLP; :meth:`propose` gives one scene's proposals."""

    def __init__(self, cfg: Optional[InstanceConfig] = None, meta: Optional[dict] = None) -> None:
        super().__init__()
        self.cfg = cfg or InstanceConfig()
        self.net = InstanceNet(self.cfg)
        self.score = ScoreMLP(_feature_dim(self.cfg), self.cfg.score_hidden)
        self.meta = dict(meta or {})

    @torch.no_grad()
    def candidates(self, coord: np.ndarray, color: Optional[np.ndarray], what: str = "scan"):
        """(cells, candidates, membership [P, V], candidate features [P, D], majority classes [P])."""
        coord, color = _check_scan(coord, color, what)
        cl = cells(coord, color, self.cfg.voxel)
        f, logits, off = self.net(cl)
        prob = logits.softmax(1).numpy()
        feat, off, centre = f.numpy(), off.numpy(), cl.centre
        fg = prob[:, list(self.cfg.structural)].sum(1) < 0.5
        objectness = prob.copy()
        objectness[:, list(self.cfg.structural)] = -1
        cls = objectness.argmax(1)  # the most likely object class (a cell of fg is grouped with its class)
        cand = _candidates(centre, centre + off, cls, fg, cl.count, self.cfg)
        member = _membership(cand.cells, len(cl.count))
        if not cand.cells:
            return cl, cand, member, np.zeros((0, _feature_dim(self.cfg)), np.float32), np.zeros(0, np.int64)
        x, maj = _features(cand, member, feat, prob, centre + off, centre, cl.count, self.cfg.structural)
        return cl, cand, member, x, maj

    @contextlib.contextmanager
    def _evaluating(self):
        """Eval mode (batch-norm statistics fixed) for the block, the previous mode afterwards."""
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    @torch.no_grad()
    def point_probs(self, coord: np.ndarray, color: Optional[np.ndarray] = None, what: str = "scan") -> np.ndarray:
        """``[N, 41]`` float32: each point's nyu40 class probabilities (those of its cell)."""
        with self._evaluating():
            coord, color = _check_scan(coord, color, what)
            cl = cells(coord, color, self.cfg.voxel)
            return self.net(cl)[1].softmax(1).numpy()[cl.inverse]

    @torch.no_grad()
    def propose(self, coord: np.ndarray, color: Optional[np.ndarray] = None, what: str = "scan") -> InstanceProposals:
        """Proposals of one scan (``coord [N, 3]`` metres, ``color [N, 3]`` 0..255 or 0..1 or None)."""
        with self._evaluating():
            cl, cand, member, x, maj = self.candidates(coord, color, what)
            n = len(cl.inverse)
            if not cand.cells:
                return InstanceProposals(np.zeros((0, n), bool), np.zeros(0, np.float32), np.zeros(0, np.int64), 0)
            scores = torch.sigmoid(self.score(torch.from_numpy(x))).numpy()
            keep = _nms(member, cl.count, scores, self.cfg.nms_iou)
            dropped = max(len(keep) - self.cfg.max_proposals, 0)
            if dropped:
                warnings.warn(f"{what}: {len(keep)} proposals after suppression; the {dropped} lowest-scored past "
                              f"max_proposals={self.cfg.max_proposals} are dropped", stacklevel=2)
                keep = keep[: self.cfg.max_proposals]
            cell_mask = np.zeros((len(keep), len(cl.count)), bool)
            for row, k in enumerate(keep):
                cell_mask[row, cand.cells[k]] = True
            masks = np.take(cell_mask, cl.inverse, axis=1)  # [K, N]: each point takes its cell's membership
            return InstanceProposals(masks, scores[keep], maj[keep], len(cand.cells), dropped)

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each to a temp file, then renamed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (MODEL_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(d / MODEL_FILE)
        write_json_atomic(d / CONFIG_FILE, {"format": FORMAT, "kind": "instance_proposals",
                                            "config": asdict(self.cfg), **self.meta})
        return d

    @classmethod
    def load(cls, directory) -> "InstanceProposer":
        """A model written by :meth:`save` (safetensors, never unpickled)."""
        d = Path(directory).expanduser()
        cfg_path, model_path = d / CONFIG_FILE, d / MODEL_FILE
        for p in (cfg_path, model_path):
            if not p.is_file():
                raise FileNotFoundError(2, "no instance-proposal model file here (train one with "
                                           "`scene3d prep proposals`)", str(p))
        try:
            meta = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path}: not a JSON file ({e})") from None
        if meta.get("kind") != "instance_proposals" or meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: not an instance-proposal model of format {FORMAT} "
                             f"(kind {meta.get('kind')!r}, format {meta.get('format')!r})")
        cfg = InstanceConfig(**meta.pop("config"))
        meta.pop("kind"), meta.pop("format")
        model = cls(cfg, meta)
        try:
            state = load_file(str(model_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{model_path}: not a readable safetensors file ({e})") from None
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise ValueError(f"{model_path}: {len(missing)} tensors missing (e.g. {sorted(missing)[0]})")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{model_path}: does not fit its config.json ({str(e).splitlines()[0]})") from None
        return model.eval()


# ---------------------------------------------------------------------------------------------- training
def _best_iou(member: csr_matrix, cl: Cells, scan: TrainScan, structural: Sequence[int]) -> np.ndarray:
    """Best point IoU of each candidate with a ground-truth object (structural classes excluded)."""
    sem = scan.semantic
    obj = (scan.instance >= 0) & ~np.isin(sem, structural) & (sem > 0)
    if not obj.any():
        return np.zeros(member.shape[0], np.float32)
    ids, gt = np.unique(scan.instance[obj], return_inverse=True)
    pts = np.nonzero(obj)[0]
    g = csr_matrix((np.ones(len(pts), np.float32), (gt, cl.inverse[pts])), shape=(len(ids), len(cl.count)))
    # points of each GT object in each cell, and each candidate's points (cell counts)
    inter = (member @ g.T).toarray()
    cand_size = np.asarray(member.multiply(cl.count[None, :]).sum(1)).ravel()
    gt_size = np.bincount(gt, minlength=len(ids))
    union = cand_size[:, None] + gt_size[None, :] - inter
    return (inter / np.maximum(union, 1)).max(1).astype(np.float32)


def train_instance_model(scans: Sequence[TrainScan], steps: int = 1200, cfg: Optional[InstanceConfig] = None,
                         seed: int = 0, lr: float = 3e-3, score_passes: int = 6, progress: bool = True,
                         log=None) -> InstanceProposer:
    """Train the U-Net for ``steps`` steps (one augmented scan a step, in turn), then the score MLP on the
    candidates of ``score_passes`` passes over each scan (the first unaugmented). See the module docstring."""
    from tqdm.auto import tqdm

    if not scans:
        raise ValueError("train_instance_model: no training scans")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = cfg or InstanceConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = InstanceProposer(cfg, {"trained_on": [s.name for s in scans], "steps": int(steps), "seed": int(seed)})
    net = model.net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="train instance proposals", unit="step", disable=not progress)
    for step in bar:
        scan = augment(scans[step % len(scans)], rng)
        cl = cells(scan.coord, scan.color, cfg.voxel)
        cls, off_t = _cell_targets(scan, cl, cfg.structural)
        _, logits, off = net(cl)
        ce = nn.functional.cross_entropy(logits, torch.from_numpy(cls), ignore_index=-100)
        has = torch.from_numpy(~np.isnan(off_t[:, 0]))
        if bool(has.any()):
            t = torch.from_numpy(off_t)[has]
            p = off[has]
            w = torch.from_numpy(cl.count.astype(np.float32))[has]
            l1 = ((p - t).abs().sum(1) * w).sum() / w.sum()
            direction = ((1 - nn.functional.cosine_similarity(p, t, dim=1, eps=1e-6)) * w).sum() / w.sum()
            loss = ce + l1 + direction
        else:
            loss = ce
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    if log:
        log(f"instance U-Net: {steps} steps on {[s.name for s in scans]} in {time.perf_counter() - t0:.0f} s")
    net.eval()
    return fit_scorer(model, scans, score_passes, rng)


def fit_scorer(model: InstanceProposer, scans: Sequence[TrainScan], passes: int = 6,
               rng: Optional[np.random.Generator] = None) -> InstanceProposer:
    """(Re)fit the score MLP of ``model`` on the candidates of ``passes`` passes over each scan (the first
    unaugmented, the others through :func:`augment`) against their best IoU with the ground truth."""
    cfg = model.cfg
    rng = rng if rng is not None else np.random.default_rng(0)
    model.net.eval()
    xs, ys = [], []
    for scan in scans:
        for k in range(passes):
            s = scan if k == 0 else augment(scan, rng)
            cl, cand, member, x, _ = model.candidates(s.coord, s.color, s.name)
            if not cand.cells:
                continue
            xs.append(x)
            ys.append(_best_iou(member, cl, s, cfg.structural))
    if not xs:
        raise ValueError(f"no candidates on the training scans {[s.name for s in scans]}: too few steps?")
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    model.score = ScoreMLP(_feature_dim(cfg), cfg.score_hidden)  # a fresh fit
    model.score.mean.copy_(x.mean(0))
    model.score.std.copy_(x.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(model.score.mlp.parameters(), lr=1e-3, weight_decay=1e-3)
    model.score.train()
    for _ in range(1500):
        loss = nn.functional.binary_cross_entropy_with_logits(model.score(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.meta["score_candidates"] = int(len(y))
    return model.eval()


def as_proposer(value) -> Optional[InstanceProposer]:
    """``value`` as a model: None stays None, a directory (str / path) is loaded, a model is itself."""
    if value is None or hasattr(value, "propose"):
        return value
    if isinstance(value, (str, os.PathLike)):
        return InstanceProposer.load(value)
    raise TypeError(f"proposal_model must be an InstanceProposer, a model directory or None, got "
                    f"{type(value).__name__}")


def object_class_probs(model: InstanceProposer, points, point2obj: torch.Tensor, num_objects: int) -> torch.Tensor:
    """``[M, 41]`` float32: ``model``'s nyu40 class probabilities averaged over each object's points, for the
    objects ``point2obj [N]`` (-1 none) of a :class:`~scene3d.structures.points.PointBatch` ``points``
    (colours in [0, 1]); each scene of the batch is one scan. What the tokenizer's semantic prior and the
    prompts' object names (:func:`object_class_names`) read."""
    probs = torch.zeros(points.num_points, NUM_CLASSES, dtype=torch.float32)
    ids = getattr(points, "scene_ids", None) or []
    for b in range(points.batch_size):
        sel = (points.batch == b).cpu()
        if not bool(sel.any()):
            continue
        c = None if points.color is None else points.color[sel.to(points.color.device)].float().cpu().numpy() * 255.0
        probs[sel] = torch.from_numpy(model.point_probs(points.coord[sel.to(points.coord.device)].float().cpu().numpy(),
                                                        c, what=f"scene {ids[b]!r}" if b < len(ids) else "scene"))
    p2o = point2obj.cpu()
    has = p2o >= 0
    return scatter_pool(probs[has], p2o[has], num_objects, "mean")


def object_class_names(model: InstanceProposer, points, point2obj: torch.Tensor, num_objects: int) -> list:
    """Each object's predicted class name (:func:`scene3d.data.labels.nyu40_name` of the most probable nyu40 id
    of :func:`object_class_probs`; None for an object without points)."""
    probs = object_class_probs(model, points, point2obj, num_objects)
    counts = torch.bincount(point2obj[point2obj >= 0].cpu(), minlength=num_objects)
    best = probs[:, 1:].argmax(1) + 1  # id 0 (unannotated) is never a training target
    return [nyu40_name(int(c)) if int(n) else None for c, n in zip(best.tolist(), counts.tolist())]


def scan_objects(coord: np.ndarray, color: Optional[np.ndarray], model: Optional[InstanceProposer],
                 what: str = "scan") -> ProposalObjects:
    """Disjoint proposal objects of one scan: this module's with ``model``, else the geometric ones
    (:func:`scene3d.tokenizer.geometric_proposals.proposal_objects`). What evaluation and the API take."""
    if model is None:
        return geometric_objects(coord, color)
    return proposal_objects(coord, color, model, what)


def proposal_objects(coord: np.ndarray, color: Optional[np.ndarray], model: InstanceProposer,
                     what: str = "scan"):
    """The proposals made disjoint for the tokenizer (as :func:`scene3d.tokenizer.geometric_proposals.proposal_objects`:
    best first, skipping any that shares more than 10% of its points with those taken)."""
    p = model.propose(coord, color, what)
    labels, scores = flatten_masks(p.masks, p.scores)
    return ProposalObjects(labels, scores, len(scores), p.num_proposals, "instance")


__all__ = ["InstanceConfig", "InstanceProposals", "InstanceProposer", "TrainScan", "as_proposer", "fit_scorer",
           "object_class_names", "object_class_probs", "proposal_objects", "scan_from_scene", "scan_objects", "semantic_of", "train_instance_model"]
