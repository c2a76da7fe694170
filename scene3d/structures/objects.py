"""Object tokens: one row per object of a ragged batch of scenes, walkable back to points.

=================  ===============  ==========================================================================
field              shape / dtype    meaning
=================  ===============  ==========================================================================
``feat``           [M, C] float     object token features (pooled backbone features + geometry + relations)
``center``         [M, 3] float     axis-aligned box center (metres)
``size``           [M, 3] float     axis-aligned box size (metres)
``obj_offset``     [B] int64        cumulative object counts per scene (ragged like ``PointBatch.offset``)
``point2obj``      [N] int64        row of ``feat`` each point belongs to, -1 for points of no object
``object_ids``     [M] int64        the source object id (ScanNet objectId) of each row, -1 for proposals
                                    that match none
=================  ===============  ==========================================================================

Object ``m`` belongs to scene ``obj_batch[m]`` (derived from ``obj_offset``); its points are
``(point2obj == m).nonzero()``. Rows are ordered by scene, so ``point2obj`` indexes the concatenated rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from scene3d.structures.ragged import batch_from_offset, counts_from_offset


@dataclass(frozen=True)
class ObjectTokens:
    feat: torch.Tensor
    center: torch.Tensor
    size: torch.Tensor
    obj_offset: torch.Tensor
    point2obj: torch.Tensor
    object_ids: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        m = self.feat.shape[0]
        if self.feat.dim() != 2:
            raise ValueError(f"feat must be [M, C], got {tuple(self.feat.shape)}")
        for name in ("center", "size"):
            t = getattr(self, name)
            if t.shape != (m, 3):
                raise ValueError(f"{name} must be [{m}, 3], got {tuple(t.shape)}")
        counts_from_offset(self.obj_offset)  # validates
        if self.obj_offset.numel() and int(self.obj_offset[-1]) != m:
            raise ValueError(f"obj_offset[-1]={int(self.obj_offset[-1])} must equal the number of objects {m}")
        if self.point2obj.dim() != 1:
            raise ValueError("point2obj must be 1-D")
        if self.point2obj.numel() and (int(self.point2obj.max()) >= m or int(self.point2obj.min()) < -1):
            raise ValueError(f"point2obj values must lie in [-1, {m - 1}]")
        if self.object_ids is not None and self.object_ids.shape != (m,):
            raise ValueError(f"object_ids must be [{m}], got {tuple(self.object_ids.shape)}")

    @property
    def num_objects(self) -> int:
        return int(self.feat.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.obj_offset.numel())

    @property
    def obj_counts(self) -> torch.Tensor:
        return counts_from_offset(self.obj_offset)

    @property
    def obj_batch(self) -> torch.Tensor:
        """Scene index of each object ``[M]`` (derived from ``obj_offset``)."""
        return batch_from_offset(self.obj_offset)

    def replace(self, **changes) -> "ObjectTokens":
        return dataclasses.replace(self, **changes)

    def replace_feature(self, feat: torch.Tensor) -> "ObjectTokens":
        return self.replace(feat=feat)

    def to(self, device) -> "ObjectTokens":
        return self.replace(**{
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        })

    def point_mask(self, m: int) -> torch.Tensor:
        """Boolean mask ``[N]`` of the points of object row ``m``."""
        return self.point2obj == m
