"""Voxelization of a ragged point batch, with the inverse map back to points.

Each scene is quantised on its own grid (origin = the scene's minimum corner), so voxel coordinates are
small non-negative integers; voxels of all scenes are concatenated, sorted by (scene, x, y, z).

==================  ===============  ==========================================================================
field of Voxels     shape / dtype    meaning
==================  ===============  ==========================================================================
``indices``         [V, 4] int32     (scene, x, y, z) grid coordinates -- spconv's layout
``inverse``         [N] int64        voxel row of every point: ``voxel_feat[inverse]`` walks back to points
``feat``            [V, C] float     point features pooled per voxel (``None`` if no features were given)
``num_points``      [V] int64        points per voxel
``voxel_offset``    [B] int64        cumulative voxel counts per scene (ragged like ``PointBatch.offset``)
``origin``          [B, 3] float     world position of grid corner (0, 0, 0) of each scene
``spatial_shape``   tuple of 3 int   grid extent covering every scene (the spconv ``spatial_shape``)
``voxel_size``      float            edge length in metres
==================  ===============  ==========================================================================
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from scene3d.structures.points import PointBatch
from scene3d.structures.ragged import offset_from_batch

REDUCTIONS = ("mean", "amax", "amin", "sum")


class Voxels(NamedTuple):
    indices: torch.Tensor
    inverse: torch.Tensor
    feat: Optional[torch.Tensor]
    num_points: torch.Tensor
    voxel_offset: torch.Tensor
    origin: torch.Tensor
    spatial_shape: tuple[int, int, int]
    voxel_size: float

    @property
    def num_voxels(self) -> int:
        return int(self.indices.shape[0])

    def centers(self) -> torch.Tensor:
        """World coordinates ``[V, 3]`` of the voxel centres."""
        b = self.indices[:, 0].long()
        return self.origin[b] + (self.indices[:, 1:].to(self.origin.dtype) + 0.5) * self.voxel_size


def scatter_pool(src: torch.Tensor, index: torch.Tensor, num_segments: int, reduce: str = "mean") -> torch.Tensor:
    """Reduce rows of ``src [N, C]`` into ``[num_segments, C]`` by ``index [N]`` (torch's ``scatter_reduce``).

    Segments that receive no row are zero. Gradients flow to ``src`` (torch defines them for every reduce).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if src.dim() != 2:
        raise ValueError(f"src must be [N, C], got {tuple(src.shape)}")
    if index.shape != (src.shape[0],):
        raise ValueError(f"index must be [{src.shape[0]}], got {tuple(index.shape)}")
    out = src.new_zeros(num_segments, src.shape[1])
    if src.shape[0] == 0:
        return out
    return out.scatter_reduce(0, index.long()[:, None].expand_as(src), src, reduce=reduce, include_self=False)


def voxelize(
    points: PointBatch,
    voxel_size: float = 0.02,
    feat: Optional[torch.Tensor] = None,
    reduce: str = "mean",
) -> Voxels:
    """Quantise every scene of ``points`` to a grid of ``voxel_size`` metres.

    ``feat [N, C]`` (optional) are pooled per voxel with ``reduce`` (mean, amax, amin, sum).
    Raises ``ValueError`` for a non-positive voxel size, NaN/inf coordinates, an empty batch or a feature
    tensor whose row count differs from the points.
    """
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    if points.num_points == 0:
        raise ValueError("cannot voxelize an empty point batch (0 points)")
    coord = points.coord
    if not torch.isfinite(coord).all():
        raise ValueError("points.coord holds NaN or inf values")
    if feat is not None and feat.shape[0] != points.num_points:
        raise ValueError(f"feat has {feat.shape[0]} rows but the batch has {points.num_points} points")

    batch = points.batch
    nb = points.batch_size
    origin = coord.new_zeros(nb, 3).scatter_reduce(
        0, batch[:, None].expand(-1, 3), coord, reduce="amin", include_self=False
    )
    grid = torch.floor((coord - origin[batch]) / voxel_size).long()  # [N, 3], >= 0
    extent = (grid.max(0).values + 1).tolist()
    # one int64 key per (scene, x, y, z); sorted unique keeps scenes grouped and Morton-free row order
    total = nb * extent[0] * extent[1] * extent[2]
    if total >= 2**62:
        raise ValueError(f"grid too large for voxel_size={voxel_size}: {extent} cells per scene")
    key = ((batch * extent[0] + grid[:, 0]) * extent[1] + grid[:, 1]) * extent[2] + grid[:, 2]
    ukey, inverse = torch.unique(key, sorted=True, return_inverse=True)
    z = ukey % extent[2]
    rest = ukey // extent[2]
    y = rest % extent[1]
    rest = rest // extent[1]
    x = rest % extent[0]
    vb = rest // extent[0]
    indices = torch.stack([vb, x, y, z], 1).to(torch.int32).contiguous()
    num_points = torch.bincount(inverse, minlength=len(ukey))
    pooled = scatter_pool(feat, inverse, len(ukey), reduce) if feat is not None else None
    return Voxels(
        indices=indices,
        inverse=inverse,
        feat=pooled,
        num_points=num_points,
        voxel_offset=offset_from_batch(vb, nb),
        origin=origin,
        spatial_shape=(int(extent[0]), int(extent[1]), int(extent[2])),
        voxel_size=float(voxel_size),
    )
