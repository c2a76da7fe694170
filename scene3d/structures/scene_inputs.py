"""The segmenter's view of a ragged batch of scenes: object tokens, dense point features and the points.

:class:`SceneInputs` is what the 3D tokenizer hands the referring segmenter (:mod:`scene3d.models.referring`);
it differs from :class:`scene3d.data.scene.Scene` (a processed scene on disk, numpy) in holding the tokenizer's
outputs as tensors. :func:`synthetic_scene` makes random ones for tests, benchmarks and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from scene3d.structures.objects import ObjectTokens
from scene3d.structures.points import PointBatch
from scene3d.structures.ragged import counts_from_offset


@dataclass
class SceneInputs:
    """A ragged batch of scenes: object tokens, dense point features ``[N, C_pt]`` and the points.

    ``object_names`` (optional, ``[M]`` over the batch): each object's class name (None where unknown), written
    into the prompt by a model that reads names (``ReferringConfig.object_labels``).

    ``frame_turns`` (optional, one per scene): the quarter turns counter-clockwise that took each scene's points
    into the frame they are held in here (a model with ``canonical_frame``; None: the points as given). Questions
    about scene ``b`` must have their compass words turned as many (:func:`scene3d.models.turns.frame_texts`)."""

    tokens: ObjectTokens
    point_feat: torch.Tensor
    points: PointBatch
    object_names: Optional[list] = None
    frame_turns: Optional[list] = None

    def __post_init__(self) -> None:
        if self.point_feat.dim() != 2 or self.point_feat.shape[0] != self.points.coord.shape[0]:
            raise ValueError(f"point_feat must be [N={self.points.coord.shape[0]}, C], got {tuple(self.point_feat.shape)}")
        if self.tokens.point2obj.shape[0] != self.points.coord.shape[0]:
            raise ValueError("tokens.point2obj must have one entry per point")
        if self.tokens.batch_size != len(counts_from_offset(self.points.offset)):
            raise ValueError(f"{self.tokens.batch_size} scenes of objects but "
                             f"{len(self.points.offset)} scenes of points")
        if self.object_names is not None and len(self.object_names) != self.tokens.num_objects:
            raise ValueError(f"object_names has {len(self.object_names)} entries for {self.tokens.num_objects} objects")
        if self.frame_turns is not None and len(self.frame_turns) != self.batch_size:
            raise ValueError(f"frame_turns has {len(self.frame_turns)} entries for {self.batch_size} scenes")

    @property
    def batch_size(self) -> int:
        return self.tokens.batch_size

    def take(self, index: Sequence[int]) -> "SceneInputs":
        """The scenes ``index`` (repeats allowed) as a new ragged batch, in that order: one row per question
        when several questions share a scene. Built from slices and ``cat``, so gradients flow back into the
        one shared encoding of each scene."""
        if not len(index):
            raise ValueError("take() needs at least one scene index")
        bad = [i for i in index if not 0 <= int(i) < self.batch_size]
        if bad:
            raise ValueError(f"scene indices {bad[:5]} out of range for {self.batch_size} scenes")
        one = {int(i): self.scene(int(i)) for i in set(index)}
        parts = [one[int(i)] for i in index]
        toks = [p.tokens for p in parts]
        o_counts = torch.tensor([t.num_objects for t in toks])
        start = torch.cumsum(o_counts, 0) - o_counts
        p2o = torch.cat([torch.where(t.point2obj >= 0, t.point2obj + int(s0), t.point2obj)
                         for t, s0 in zip(toks, start)])
        ids = None if any(t.object_ids is None for t in toks) else torch.cat([t.object_ids for t in toks])
        tokens = ObjectTokens(torch.cat([t.feat for t in toks]), torch.cat([t.center for t in toks]),
                              torch.cat([t.size for t in toks]), torch.cumsum(o_counts, 0).to(toks[0].obj_offset),
                              p2o, ids)
        sids = [sid for p in parts for sid in p.points.scene_ids] if all(p.points.scene_ids for p in parts) else []
        points = PointBatch.from_list([p.points.split()[0] for p in parts], scene_ids=sids)
        names = None if self.object_names is None else [n for p in parts for n in p.object_names]
        turns = None if self.frame_turns is None else [self.frame_turns[int(i)] for i in index]
        return SceneInputs(tokens, torch.cat([p.point_feat for p in parts]), points, names, turns)

    def scene(self, b: int) -> "SceneInputs":
        """Scene ``b`` alone (rows re-based)."""
        o = torch.cat([self.tokens.obj_offset.new_zeros(1), self.tokens.obj_offset])
        p = torch.cat([self.points.offset.new_zeros(1), self.points.offset])
        o0, o1, p0, p1 = int(o[b]), int(o[b + 1]), int(p[b]), int(p[b + 1])
        p2o = self.tokens.point2obj[p0:p1]
        t = self.tokens
        tokens = ObjectTokens(t.feat[o0:o1], t.center[o0:o1], t.size[o0:o1], t.obj_offset.new_tensor([o1 - o0]),
                              torch.where(p2o >= 0, p2o - o0, p2o),
                              None if t.object_ids is None else t.object_ids[o0:o1])
        pb = self.points
        fields = {k: (getattr(pb, k)[p0:p1] if getattr(pb, k) is not None else None)
                  for k in ("coord", "color", "normal", "superpoint", "segment", "instance")}
        points = PointBatch(offset=pb.offset.new_tensor([p1 - p0]),
                            scene_ids=list(pb.scene_ids[b : b + 1]) if pb.scene_ids else [], **fields)
        names = None if self.object_names is None else list(self.object_names[o0:o1])
        turns = None if self.frame_turns is None else [self.frame_turns[b]]
        return SceneInputs(tokens, self.point_feat[p0:p1], points, names, turns)

    def local_names(self, b: int) -> Optional[list]:
        """Class names of scene ``b``'s objects (local order), or None when the batch has none."""
        if self.object_names is None:
            return None
        o = self.tokens.obj_offset
        o0, o1 = (int(o[b - 1]) if b else 0), int(o[b])
        return list(self.object_names[o0:o1])


def synthetic_scene(num_objects: Sequence[int] = (6,), points_per_object: int = 20, obj_dim: int = 32,
                    point_dim: int = 32, seed: int = 0, unassigned: int = 5) -> SceneInputs:
    """Random scenes for tests, benchmarks and the demo: object ``j`` of a scene is a blob of points around a
    random center, with ``unassigned`` extra points of no object; superpoints are pairs of points of one object.
    Object ids are ``10 * (j + 1)`` so they differ from row indices."""
    gen = torch.Generator().manual_seed(seed)
    feats, centers, sizes, coords, p2o, sps, ids, pfeat = [], [], [], [], [], [], [], []
    o_counts, p_counts, row = [], [], 0
    for m in num_objects:
        c = torch.rand(m, 3, generator=gen) * 6.0
        s = torch.rand(m, 3, generator=gen) * 0.8 + 0.2
        xyz = (c.repeat_interleave(points_per_object, 0)
               + (torch.rand(m * points_per_object, 3, generator=gen) - 0.5) * s.repeat_interleave(points_per_object, 0))
        owner = torch.arange(m).repeat_interleave(points_per_object)
        xyz = torch.cat([xyz, torch.rand(unassigned, 3, generator=gen) * 6.0])
        owner = torch.cat([owner + row, torch.full((unassigned,), -1)])
        sp = torch.cat([torch.arange(m * points_per_object) // 2, m * points_per_object + torch.arange(unassigned)])
        feats.append(torch.randn(m, obj_dim, generator=gen))
        centers.append(c); sizes.append(s); coords.append(xyz); p2o.append(owner); sps.append(sp)
        ids.append(10 * (torch.arange(m) + 1))
        pfeat.append(torch.randn(xyz.shape[0], point_dim, generator=gen))
        o_counts.append(m); p_counts.append(xyz.shape[0]); row += m
    tokens = ObjectTokens(torch.cat(feats), torch.cat(centers), torch.cat(sizes),
                          torch.cumsum(torch.tensor(o_counts), 0), torch.cat(p2o), torch.cat(ids))
    points = PointBatch(torch.cat(coords), torch.cumsum(torch.tensor(p_counts), 0), superpoint=torch.cat(sps))
    return SceneInputs(tokens, torch.cat(pfeat), points)
