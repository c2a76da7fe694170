"""Per-object pooling of point features into :class:`~scene3d.structures.objects.ObjectTokens`.

Objects are given per point (``point_obj [N]``: object id local to the point's scene, ``< 0`` for points of
no object) -- ground-truth instances in training, proposals at inference. Rows are ordered by (scene, id).

Token feature layout (``feat`` of the returned tokens, ``C`` = point feature channels)::

    [ mean of point features (C) | max of point features (C) | stats (STATS_DIM) ]
    stats = center - scene mean (3) | size (3) | colour mean (3) | colour std (3) | log(1 + #points) (1)
"""

from __future__ import annotations

from typing import Optional

import torch

from scene3d.structures.objects import ObjectTokens
from scene3d.structures.points import PointBatch
from scene3d.tokenizer.voxelize import scatter_pool

STATS_DIM = 13


def object_rows(point_obj: torch.Tensor, batch: torch.Tensor, num_scenes: int):
    """Map (scene, local id) to object rows: returns ``point2obj [N]`` (-1 for none), ``object_ids [M]``,
    ``obj_batch [M]`` with rows sorted by scene, then id."""
    if point_obj.shape != batch.shape:
        raise ValueError(f"point_obj must be [{batch.shape[0]}], got {tuple(point_obj.shape)}")
    valid = point_obj >= 0
    ids = point_obj.long()
    span = int(ids.max()) + 1 if valid.any() else 1
    key = torch.where(valid, batch * span + ids, torch.full_like(ids, -1))
    ukey, inv = torch.unique(key[valid], sorted=True, return_inverse=True)
    point2obj = torch.full_like(ids, -1)
    point2obj[valid] = inv
    return point2obj, ukey % span, ukey // span


def pool_objects(
    point_feat: torch.Tensor,
    points: PointBatch,
    point_obj: torch.Tensor,
) -> ObjectTokens:
    """Pool ``point_feat [N, C]`` per object of ``point_obj [N]`` into tokens ``feat [M, 2C + STATS_DIM]``.

    Centre and size are the axis-aligned box of the object's points. Colour statistics use
    ``points.color`` (zeros when absent). Raises ``ValueError`` on mismatched lengths.
    """
    n = points.num_points
    if point_feat.dim() != 2 or point_feat.shape[0] != n:
        raise ValueError(f"point_feat must be [{n}, C], got {tuple(point_feat.shape)}")
    if point_obj.shape != (n,):
        raise ValueError(f"point_obj must be [{n}], got {tuple(point_obj.shape)}")
    batch = points.batch
    point2obj, object_ids, obj_batch = object_rows(point_obj, batch, points.batch_size)
    m = int(object_ids.shape[0])
    sel = point2obj >= 0
    idx = point2obj[sel]

    feat = point_feat[sel]
    f_mean = scatter_pool(feat, idx, m, "mean")
    f_max = scatter_pool(feat, idx, m, "amax")

    coord = points.coord[sel]
    lo = scatter_pool(coord, idx, m, "amin")
    hi = scatter_pool(coord, idx, m, "amax")
    center, size = (lo + hi) / 2, hi - lo
    scene_mean = scatter_pool(points.coord, batch, points.batch_size, "mean")
    color = points.color[sel].to(coord.dtype) if points.color is not None else coord.new_zeros(len(coord), 3)
    c_mean = scatter_pool(color, idx, m, "mean")
    c_sq = scatter_pool(color * color, idx, m, "mean")
    c_std = (c_sq - c_mean * c_mean).clamp_min(0).sqrt()
    count = torch.bincount(idx, minlength=m).to(coord.dtype)
    stats = torch.cat([center - scene_mean[obj_batch], size, c_mean, c_std, torch.log1p(count)[:, None]], 1)

    obj_offset = torch.cumsum(torch.bincount(obj_batch, minlength=points.batch_size), 0)
    return ObjectTokens(
        feat=torch.cat([f_mean, f_max, stats.to(point_feat.dtype)], 1),
        center=center,
        size=size,
        obj_offset=obj_offset,
        point2obj=point2obj,
        object_ids=object_ids,
    )


#: width of :func:`object_descriptors`
DESCRIPTOR_DIM = 5


def object_descriptors(points: PointBatch, tokens: ObjectTokens, floor_quantile: float = 0.01) -> torch.Tensor:
    """``[M, DESCRIPTOR_DIM]`` shape descriptors of each object of ``tokens`` that a rescan of the same object
    keeps: log of its two horizontal box extents, larger first (so a quarter turn of the scan leaves them as
    they are), log of its height, and the heights of its bottom and top above the floor of its scene (the
    ``floor_quantile`` quantile of the scene's z). Unlike ``pool_objects``' stats they depend neither on where
    the object stands in the room, nor on which wall faces +x, nor on the scan's point density.

    Why hand-written: no library computes per-object box descriptors over ragged batches, and they are a few
    scatter reductions. Measured on the real rescans (``bench/real_rescan.py``'s reference line): these
    descriptors and the colour mean / std, by the nearest object of scene0000_01, name 50 of scene0000_02's 59
    objects, where the learned object tokens of the shipped runs lie nearest their own class name for 22-28."""
    ext = tokens.size.float().clamp_min(0)  # pool_objects' axis-aligned box of each object's points
    xy = ext[:, :2].sort(1, descending=True).values
    floors = []
    for b in range(points.batch_size):  # kthvalue, not torch.quantile: that refuses inputs over 16M values
        z = points.coord[points.batch == b, 2].float()
        floors.append(z.kthvalue(max(1, int(floor_quantile * len(z))))[0] if len(z) else z.new_zeros(()))
    mid = tokens.center[:, 2].float() - torch.stack(floors)[tokens.obj_batch]
    out = torch.cat([torch.log(xy + 0.01), torch.log(ext[:, 2:] + 0.01),
                     (mid - ext[:, 2] / 2)[:, None], (mid + ext[:, 2] / 2)[:, None]], 1)
    return out.to(tokens.feat.dtype)


def token_dim(point_channels: int) -> int:
    """Width of ``pool_objects`` features for ``point_channels`` point feature channels."""
    return 2 * point_channels + STATS_DIM


def pooled_parts(tokens: ObjectTokens, point_channels: int) -> dict[str, Optional[torch.Tensor]]:
    """Split a ``pool_objects`` feature back into its named parts (views)."""
    c = point_channels
    f = tokens.feat
    return {"mean": f[:, :c], "max": f[:, c : 2 * c], "stats": f[:, 2 * c :]}
