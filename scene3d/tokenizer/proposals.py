"""Class-agnostic object proposals for scenes without annotations: centre-offset voting + clustering.

A small head predicts, for every point, the offset to the centre of its object (PointGroup-style voting).
At inference the shifted points are averaged per superpoint (superpoint ids come with processed scenes; when
absent, voxels of ``fallback_voxel`` metres stand in) and superpoints whose voted centres lie within
``radius`` of each other are joined (connected components of the radius graph, scipy ``cKDTree`` +
``csgraph``). Clusters with fewer than ``min_points`` points are dropped (-1); a point counts as
``points.weight`` points when the batch has weights (a voxel-downsampled scene: the input points each
representative stands for), so downsampling does not drop objects.

A head that has not learnt the scene's kind (untrained, or trained on other scenes) votes every centre into
one place and the clustering returns a proposal that swallows the room; :func:`oversized_proposals` finds
those (more than ``OVERSIZED_FRACTION`` of the scene's points) so callers can say so.

===================  ============  ==============================================================
name                 shape         meaning
===================  ============  ==============================================================
point_feat           [N, C]        backbone features per point
offset (head out)    [N, 3]        predicted vector from each point to its object's box centre
instance (target)    [N]           ground-truth id per point, < 0 ignored
proposals            [N] int64     proposal id per point, local to its scene, -1 = no proposal
===================  ============  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from torch import nn

from scene3d.structures.points import PointBatch
from scene3d.tokenizer.pooling import object_rows
from scene3d.tokenizer.voxelize import scatter_pool, voxelize


@dataclass
class ProposalConfig:
    hidden: int = 64
    radius: float = 0.15  # metres between voted superpoint centres to join them
    min_points: int = 50
    fallback_voxel: float = 0.05  # "superpoint" size when a scene has none

    def __post_init__(self) -> None:
        if self.radius <= 0 or self.fallback_voxel <= 0 or self.min_points < 1:
            raise ValueError(f"invalid proposal config {self}")


class OffsetLoss(NamedTuple):
    l1: torch.Tensor  # mean |pred - target| over annotated points
    direction: torch.Tensor  # mean (1 - cos) between predicted and target offsets
    total: torch.Tensor


class ProposalHead(nn.Module):
    def __init__(self, in_channels: int, cfg: ProposalConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ProposalConfig()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, cfg.hidden), nn.LayerNorm(cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 3)
        )

    def forward(self, point_feat: torch.Tensor) -> torch.Tensor:
        """Offsets ``[N, 3]`` from point features ``[N, C]``."""
        return self.mlp(point_feat)


def instance_centers(coord: torch.Tensor, instance: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Axis-aligned box centre of each point's instance ``[N, 3]`` (rows of ignored points are zero)."""
    point2obj, object_ids, _ = object_rows(instance, batch, int(batch.max()) + 1 if batch.numel() else 0)
    sel = point2obj >= 0
    m = len(object_ids)
    lo = scatter_pool(coord[sel], point2obj[sel], m, "amin")
    hi = scatter_pool(coord[sel], point2obj[sel], m, "amax")
    out = torch.zeros_like(coord)
    out[sel] = ((lo + hi) / 2)[point2obj[sel]]
    return out


def offset_loss(pred: torch.Tensor, points: PointBatch, instance: Optional[torch.Tensor] = None) -> OffsetLoss:
    """L1 + direction loss between predicted offsets and the offsets to instance box centres."""
    instance = points.instance if instance is None else instance
    if instance is None:
        raise ValueError("offset_loss needs instance labels (points.instance or instance=)")
    if pred.shape != (points.num_points, 3):
        raise ValueError(f"pred must be [{points.num_points}, 3], got {tuple(pred.shape)}")
    target = instance_centers(points.coord, instance, points.batch) - points.coord
    sel = instance >= 0
    if not sel.any():
        zero = pred.sum() * 0
        return OffsetLoss(zero, zero, zero)
    p, t = pred[sel], target[sel].to(pred.dtype)
    l1 = (p - t).abs().sum(1).mean()
    cos = torch.nn.functional.cosine_similarity(p, t, dim=1, eps=1e-6)
    direction = (1 - cos).mean()
    return OffsetLoss(l1, direction, l1 + direction)


def _groups(points: PointBatch, fallback_voxel: float) -> torch.Tensor:
    """Superpoint group per point, globally unique over the batch ``[N]``."""
    batch = points.batch
    if points.superpoint is not None:
        local = points.superpoint.long()
        if (local < 0).any():
            raise ValueError("superpoint ids must be >= 0")
    else:  # voxel connectivity stand-in
        return voxelize(points, fallback_voxel).inverse
    span = int(local.max()) + 1 if local.numel() else 1
    return torch.unique(batch * span + local, return_inverse=True)[1]


@torch.no_grad()
def cluster_proposals(points: PointBatch, offset: torch.Tensor, cfg: ProposalConfig | None = None) -> torch.Tensor:
    """Group points into proposals from voted centres; returns per-point ids local to each scene (-1 none)."""
    cfg = cfg or ProposalConfig()
    if offset.shape != (points.num_points, 3):
        raise ValueError(f"offset must be [{points.num_points}, 3], got {tuple(offset.shape)}")
    if not torch.isfinite(offset).all():
        raise ValueError("offset holds NaN or inf values")
    batch = points.batch
    group = _groups(points, cfg.fallback_voxel)
    g = int(group.max()) + 1 if group.numel() else 0
    voted = scatter_pool((points.coord + offset).double(), group, g, "mean").cpu().numpy()
    g_batch = scatter_pool(batch[:, None].double(), group, g, "amax")[:, 0].long().cpu().numpy()
    g_count = torch.bincount(group, weights=None if points.weight is None else points.weight.double(),
                             minlength=g).cpu().numpy()
    labels = np.full(g, -1, dtype=np.int64)
    for b in range(points.batch_size):  # one KD-tree per scene (scenes must not merge)
        ids = np.nonzero(g_batch == b)[0]
        if len(ids) == 0:
            continue
        pairs = cKDTree(voted[ids]).query_pairs(cfg.radius, output_type="ndarray")
        adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(ids), len(ids)))
        _, comp = connected_components(adj, directed=False)
        size = np.bincount(comp, weights=g_count[ids])
        keep = size[comp] >= cfg.min_points
        # renumber kept components 0..k-1 in order of first appearance
        _, new = np.unique(comp[keep], return_inverse=True)
        labels[ids[keep]] = new
    return torch.from_numpy(labels).to(points.device)[group]


#: a proposal holding more than this fraction of its scene's points is "most of the scene", not an object
OVERSIZED_FRACTION = 0.5


def oversized_proposals(point2obj: torch.Tensor, num_objects: int, weight: Optional[torch.Tensor] = None,
                        fraction: float = OVERSIZED_FRACTION) -> torch.Tensor:
    """Rows ``[K]`` (sorted) of the objects of ONE scene that hold more than ``fraction`` of its points.

    ``point2obj [N]``: object row per point, -1 none (those still count in the scene's total);
    ``weight [N]``: points each row stands for (a downsampled scene's counts), default 1.
    """
    if point2obj.dim() != 1:
        raise ValueError(f"point2obj must be [N], got {tuple(point2obj.shape)}")
    if weight is not None and weight.shape != point2obj.shape:
        raise ValueError(f"weight must be [{point2obj.shape[0]}], got {tuple(weight.shape)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    w = torch.ones_like(point2obj, dtype=torch.float64) if weight is None else weight.double()
    total = float(w.sum())
    if num_objects == 0 or total == 0:
        return point2obj.new_zeros(0, dtype=torch.long)
    sel = point2obj >= 0
    size = torch.zeros(num_objects, dtype=torch.float64, device=point2obj.device)
    size.index_add_(0, point2obj[sel].long(), w[sel])
    return (size > fraction * total).nonzero().flatten()


class Recall(NamedTuple):
    thresholds: tuple[float, ...]
    recall: tuple[float, ...]  # fraction of GT instances with best IoU >= threshold
    best_iou: torch.Tensor  # [G] best IoU of each GT instance
    num_gt: int


def proposal_recall(
    pred_instance: torch.Tensor,
    gt_instance: torch.Tensor,
    thresholds: Sequence[float] = (0.25, 0.5),
    batch: Optional[torch.Tensor] = None,
) -> Recall:
    """Recall of GT instances by proposals at IoU thresholds (``>=``, as ScanRefer's evaluator).

    Ids ``< 0`` are ignored on both sides (ignored GT points still count in a proposal's size, as in
    ScanNet's instance evaluation they count as the proposal's points). ``batch [N]`` keeps ids of different
    scenes apart.
    """
    if pred_instance.shape != gt_instance.shape or pred_instance.dim() != 1:
        raise ValueError(
            f"pred_instance and gt_instance must be 1-D of one length, got {tuple(pred_instance.shape)} "
            f"and {tuple(gt_instance.shape)}"
        )
    batch = torch.zeros_like(gt_instance, dtype=torch.long) if batch is None else batch.long()
    nb = int(batch.max()) + 1 if batch.numel() else 1
    gt_row, _, _ = object_rows(gt_instance.long(), batch, nb)
    pr_row, _, _ = object_rows(pred_instance.long(), batch, nb)
    ng = int(gt_row.max()) + 1 if (gt_row >= 0).any() else 0
    npr = int(pr_row.max()) + 1 if (pr_row >= 0).any() else 0
    if ng == 0:
        raise ValueError("gt_instance holds no instance (all ids < 0)")
    gt_size = torch.bincount(gt_row[gt_row >= 0], minlength=ng)
    pr_size = torch.bincount(pr_row[pr_row >= 0], minlength=npr)
    both = (gt_row >= 0) & (pr_row >= 0)
    inter = torch.bincount(gt_row[both] * max(npr, 1) + pr_row[both], minlength=ng * max(npr, 1))
    inter = inter.view(ng, max(npr, 1)).double()
    if npr == 0:
        best = torch.zeros(ng, dtype=torch.float64)
    else:
        union = gt_size[:, None] + pr_size[None, :] - inter
        best = (inter / union.clamp_min(1)).max(1).values
    rec = tuple(float((best >= t).double().mean()) for t in thresholds)
    return Recall(tuple(float(t) for t in thresholds), rec, best, ng)
