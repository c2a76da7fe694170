"""A ragged batch of point clouds.

======================  ===============  =========================================================
field                   shape / dtype    meaning
======================  ===============  =========================================================
``coord``               [N, 3] float     xyz (metres, axis-aligned), all scenes concatenated
``offset``              [B] int64        cumulative point counts; scene b is rows offset[b-1]:offset[b]
``color``               [N, 3] float     rgb in [0, 1] (optional)
``normal``              [N, 3] float     unit normals (optional)
``superpoint``          [N] int64        over-segment id, local to its scene (optional)
``segment``             [N] int64        semantic class, -1 ignore (optional)
``instance``            [N] int64        object id (ScanNet objectId), -1 unannotated (optional)
``weight``              [N] float        input points each row stands for, as in a voxel-downsampled scene
                                         (optional; absent: 1 each). Proposal sizes count it
``scene_ids``           list[str] of B   scene names
======================  ===============  =========================================================

``batch`` (the scene index of each point) is derived from ``offset`` by :func:`batch_from_offset`, never
stored, so the two can never disagree. Instances are immutable in spirit: :meth:`replace` returns a copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from scene3d.structures.ragged import batch_from_offset, counts_from_offset, offset_from_counts

_PER_POINT = ("coord", "color", "normal", "superpoint", "segment", "instance", "weight")


@dataclass(frozen=True)
class PointBatch:
    coord: torch.Tensor
    offset: torch.Tensor
    color: Optional[torch.Tensor] = None
    normal: Optional[torch.Tensor] = None
    superpoint: Optional[torch.Tensor] = None
    segment: Optional[torch.Tensor] = None
    instance: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    scene_ids: Sequence[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.coord.dim() != 2 or self.coord.shape[1] != 3:
            raise ValueError(f"coord must be [N, 3], got {tuple(self.coord.shape)}")
        if not self.coord.is_floating_point():
            raise ValueError(f"coord must be floating point, got {self.coord.dtype}")
        counts = counts_from_offset(self.offset)  # validates offset
        n = self.coord.shape[0]
        if self.offset.numel() and int(self.offset[-1]) != n:
            raise ValueError(f"offset[-1]={int(self.offset[-1])} must equal the number of points {n}")
        if self.offset.numel() == 0 and n != 0:
            raise ValueError(f"empty offset but {n} points")
        for name in _PER_POINT[1:]:
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} rows but coord has {n}")
        if self.scene_ids and len(self.scene_ids) != len(counts):
            raise ValueError(f"{len(self.scene_ids)} scene_ids for {len(counts)} scenes")

    # ---- derived views -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.offset.numel())

    @property
    def num_points(self) -> int:
        return int(self.coord.shape[0])

    @property
    def counts(self) -> torch.Tensor:
        """Points per scene ``[B]``."""
        return counts_from_offset(self.offset)

    @property
    def batch(self) -> torch.Tensor:
        """Scene index of each point ``[N]`` (derived from ``offset``)."""
        return batch_from_offset(self.offset)

    @property
    def device(self) -> torch.device:
        return self.coord.device

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_list(cls, scenes: Sequence[dict], scene_ids: Sequence[str] | None = None) -> "PointBatch":
        """Collate per-scene dicts (keys among the per-point fields, arrays or tensors) into one batch.

        Every scene must carry the same set of optional fields.
        """
        if len(scenes) == 0:
            raise ValueError("cannot collate an empty list of scenes")
        keys = [k for k in _PER_POINT if scenes[0].get(k) is not None]
        if "coord" not in keys:
            raise ValueError("every scene needs 'coord'")
        for i, s in enumerate(scenes):
            have = [k for k in _PER_POINT if s.get(k) is not None]
            if have != keys:
                raise ValueError(f"scene {i} has fields {have}, scene 0 has {keys}")
        fields = {k: torch.cat([torch.as_tensor(s[k]) for s in scenes], 0) for k in keys}
        counts = torch.tensor([len(s["coord"]) for s in scenes], dtype=torch.long)
        if scene_ids is None:
            scene_ids = [str(s.get("scene_id", i)) for i, s in enumerate(scenes)]
        return cls(offset=offset_from_counts(counts), scene_ids=list(scene_ids), **fields)

    def replace(self, **changes) -> "PointBatch":
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "PointBatch":
        changes = {
            name: getattr(self, name).to(device)
            for name in (*_PER_POINT, "offset")
            if getattr(self, name) is not None
        }
        return self.replace(**changes)

    # ---- splitting -----------------------------------------------------------------------------
    def split(self) -> list[dict]:
        """Undo :meth:`from_list`: one dict of per-point tensors per scene (views, no copies)."""
        counts = self.counts.tolist()
        parts = {
            name: torch.split(getattr(self, name), counts)
            for name in _PER_POINT
            if getattr(self, name) is not None
        }
        out = []
        for b in range(self.batch_size):
            item = {name: chunks[b] for name, chunks in parts.items()}
            if self.scene_ids:
                item["scene_id"] = self.scene_ids[b]
            out.append(item)
        return out

    def scene(self, b: int) -> "PointBatch":
        """Scene ``b`` as a batch of one."""
        if not 0 <= b < self.batch_size:
            raise IndexError(f"scene index {b} out of range for a batch of {self.batch_size}")
        item = self.split()[b]
        ids = [item.pop("scene_id")] if "scene_id" in item else None
        return PointBatch.from_list([item], scene_ids=ids)

    def __len__(self) -> int:
        return self.batch_size
