"""ObjectTokenizer: points -> voxels -> sparse U-Net -> per-object pooling (+ octree geometry) -> relations.

::

    PointBatch (N points, B scenes)
      | input features [N, 6] = rgb (zeros without colour) | xyz - scene mean
      v voxelize (voxel_size), mean per voxel                         -> [V, 6]
      v SparseUNet                                                    -> [V, C];   [inverse] -> point_feat [N, C]
      v ProposalHead                                                  -> offset [N, 3] (centre votes)
      v objects: GT instances (training / given) or proposals (clustered votes, inference)
      v pool_objects: mean | max | stats                              -> [M, 2C + 13]
      (+ GeometryEncoder(octree code of each object's points)         -> [M, G], concatenated)
      (+ object_descriptors: extents, height, bottom / top above floor -> [M, 5], with ``descriptors``)
      v projection MLP                                                -> [M, out_dim]
      v RelationContext (attention with pairwise centre/size bias, per scene)
    ObjectTokens(feat [M, out_dim], center, size, obj_offset, point2obj, object_ids)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn

from scene3d.sparse.spconv_compat import sparse_tensor
from scene3d.structures.objects import ObjectTokens
from scene3d.structures.points import PointBatch
from scene3d.tokenizer.backbone import BackboneConfig, SparseUNet
from scene3d.tokenizer.geometry import GeometryEncoder, GeometryEncoderConfig
from scene3d.tokenizer.octree import encode_objects, voxelize_objects
from scene3d.tokenizer.pooling import DESCRIPTOR_DIM, object_descriptors, pool_objects, token_dim
from scene3d.tokenizer.proposals import OffsetLoss, ProposalConfig, ProposalHead, cluster_proposals, offset_loss
from scene3d.tokenizer.relation import RelationConfig, RelationContext
from scene3d.tokenizer.voxelize import Voxels, scatter_pool, voxelize

IN_CHANNELS = 6


@dataclass
class ObjectTokenizerConfig:
    voxel_size: float = 0.02
    out_dim: int = 256
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(in_channels=IN_CHANNELS))
    relation: RelationConfig = field(default_factory=RelationConfig)
    proposal: ProposalConfig = field(default_factory=ProposalConfig)
    use_geometry: bool = True  # octree geometry code (needs scene3d.tokenizer.geometry)
    geometry_dim: int = 64
    geometry_voxel_size: float = 0.02
    #: a learned instance-proposal model directory (``scene3d prep proposals``, frozen): the nyu40 class
    #: probabilities it gives each point, averaged over each object, join the object's pooled features (as
    #: Chat-Scene's object features come from encoders trained on ScanNet); None: none
    semantic_model: Optional[str] = None
    #: False: the backbone's input keeps rgb and the height relative to the scene mean, and its x / y are
    #: zeros, so point features cannot encode where in the room a point lies (a network that sees absolute x /
    #: y can learn one training scan's layout instead of what its objects look like). Object positions still
    #: reach the model through each token's pooled centre and size and the relation layers. True: rgb + xyz
    point_xy: bool = True
    #: append each object's rescan-stable shape descriptors (:func:`scene3d.tokenizer.pooling.object_descriptors`:
    #: sorted horizontal extents, height, bottom and top above the floor) to its pooled features
    descriptors: bool = False
    #: training only: each object's learned features (the backbone's pooled mean / max and the octree geometry
    #: code) are zeroed with this probability (the rest scaled by 1 / (1 - p), as dropout does), so the token
    #: must also be told apart from the hand-made statistics and descriptors, which a rescan keeps. One real
    #: scan is enough for the backbone to memorise its objects (README, real-rescan experiment); 0: off
    learned_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.voxel_size > 0 or not self.geometry_voxel_size > 0:
            raise ValueError("voxel sizes must be > 0")
        if not 0.0 <= self.learned_dropout < 1.0:
            raise ValueError(f"learned_dropout must be in [0, 1), got {self.learned_dropout!r}")
        if self.backbone.in_channels != IN_CHANNELS:
            raise ValueError(f"backbone.in_channels must be {IN_CHANNELS} (rgb + xyz), got {self.backbone.in_channels}")
        if self.relation.dim != self.out_dim:
            raise ValueError(f"relation.dim ({self.relation.dim}) must equal out_dim ({self.out_dim})")


class TokenizerOutput(NamedTuple):
    tokens: ObjectTokens  # feat [M, out_dim]
    point_feat: torch.Tensor  # [N, C] backbone features per point
    offset: torch.Tensor  # [N, 3] predicted centre offsets
    point_obj: torch.Tensor  # [N] object id per point used for pooling (GT or proposal), -1 none
    voxels: Voxels


class TokenizerLosses(NamedTuple):
    offset: OffsetLoss
    total: torch.Tensor


def input_features(points: PointBatch, xy: bool = True) -> torch.Tensor:
    """``[N, 6]``: rgb in [0, 1] (zeros when absent) and xyz relative to the scene mean; x and y are zeros when
    ``xy`` is False (:attr:`ObjectTokenizerConfig.point_xy`)."""
    coord = points.coord
    batch = points.batch
    mean = scatter_pool(coord, batch, points.batch_size, "mean")
    color = points.color.to(coord.dtype) if points.color is not None else coord.new_zeros(len(coord), 3)
    rel = coord - mean[batch]
    if not xy:
        rel = torch.cat([torch.zeros_like(rel[:, :2]), rel[:, 2:]], 1)
    return torch.cat([color, rel], 1)


class ObjectTokenizer(nn.Module):
    def __init__(self, cfg: ObjectTokenizerConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ObjectTokenizerConfig()
        self.backbone = SparseUNet(cfg.backbone)
        c = self.backbone.out_channels
        self.proposal_head = ProposalHead(c, cfg.proposal)
        self.geometry = None
        geo_dim = 0
        if cfg.use_geometry:
            self.geometry = GeometryEncoder(GeometryEncoderConfig(out_dim=cfg.geometry_dim))
            geo_dim = cfg.geometry_dim
        # frozen and not a submodule (object.__setattr__ keeps nn.Module from registering it): neither trained
        # nor saved in checkpoints, which name its directory in their config instead
        object.__setattr__(self, "_semantic", None)
        sem_dim = 0
        if cfg.semantic_model:
            # instance_proposals imports this package's backbone: importing it at the top would be circular
            from scene3d.tokenizer.instance_proposals import NUM_CLASSES, InstanceProposer

            sem = InstanceProposer.load(Path(cfg.semantic_model).expanduser()).requires_grad_(False)
            object.__setattr__(self, "_semantic", sem)
            sem_dim = NUM_CLASSES
        d_in = token_dim(c) + geo_dim + sem_dim + (DESCRIPTOR_DIM if cfg.descriptors else 0)
        self.project = nn.Sequential(nn.Linear(d_in, cfg.out_dim), nn.GELU(), nn.Linear(cfg.out_dim, cfg.out_dim))
        self.relation = RelationContext(cfg.relation)

    # ---- stages ---------------------------------------------------------------------------------------
    def point_features(self, points: PointBatch) -> tuple[torch.Tensor, Voxels]:
        """Backbone features per point ``[N, C]`` and the voxelization used."""
        vox = voxelize(points, self.cfg.voxel_size, feat=input_features(points, self.cfg.point_xy), reduce="mean")
        step = 2 ** self.cfg.backbone.depth  # pad so every down-sampling keeps every voxel
        shape = [((s + step - 1) // step) * step for s in vox.spatial_shape]
        x = sparse_tensor(vox.feat, vox.indices, shape, points.batch_size)
        return self.backbone(x).features[vox.inverse], vox

    def geometry_code(self, points: PointBatch, point2obj: torch.Tensor, num_objects: int) -> torch.Tensor:
        """Octree geometry vector per object ``[M, geometry_dim]`` from each object's points."""
        sel = point2obj >= 0
        vox = voxelize_objects(points.coord[sel].float(), point2obj[sel], self.cfg.geometry_voxel_size,
                               num_objects=num_objects, on_overflow="coarsen")
        code = encode_objects(vox.voxels, vox.obj, vox.depth, num_objects=num_objects,
                              levels_per_token=self.geometry.config.levels_per_token,
                              origin=vox.origin, voxel_size=vox.voxel_size)
        return self.geometry(code)

    @torch.no_grad()
    def semantic_prior(self, points: PointBatch, point2obj: torch.Tensor, num_objects: int) -> torch.Tensor:
        """``[M, 41]``: the frozen semantic model's class probabilities averaged over each object's points."""
        from scene3d.tokenizer.instance_proposals import object_class_probs  # circular at the top (see __init__)

        return object_class_probs(self._semantic, points, point2obj, num_objects).to(point2obj.device)

    def forward(self, points: PointBatch, objects: Optional[torch.Tensor] = None) -> TokenizerOutput:
        """Tokens for ``points``; objects per point from ``objects [N]`` if given, else the GT instances in
        training mode and clustered proposals in eval mode."""
        point_feat, vox = self.point_features(points)
        offset = self.proposal_head(point_feat)
        proposed = False
        if objects is None:
            if self.training:
                if points.instance is None:
                    raise ValueError("training needs points.instance (or pass objects=)")
                objects = points.instance
            else:
                objects = cluster_proposals(points, offset.detach(), self.cfg.proposal)
                proposed = True
        elif objects.shape != (points.num_points,):
            raise ValueError(f"objects must be [{points.num_points}], got {tuple(objects.shape)}")
        pooled = pool_objects(point_feat, points, objects.long())
        c = point_feat.shape[1]
        learned = [pooled.feat[:, : 2 * c]]  # the backbone's mean | max; the stats follow
        if self.geometry is not None:
            learned.append(self.geometry_code(points, pooled.point2obj, pooled.num_objects).to(pooled.feat.dtype))
        if self.training and self.cfg.learned_dropout > 0:
            p = self.cfg.learned_dropout
            keep = (torch.rand(pooled.num_objects, 1, device=point_feat.device) >= p).to(pooled.feat.dtype) / (1 - p)
            learned = [x * keep for x in learned]
        parts = [learned[0], pooled.feat[:, 2 * c :]] + learned[1:]
        if self.cfg.descriptors:
            parts.append(object_descriptors(points, pooled))
        if self._semantic is not None:
            parts.append(self.semantic_prior(points, pooled.point2obj, pooled.num_objects).to(pooled.feat.dtype))
        feat = self.project(torch.cat(parts, 1))  # (M, out_dim)
        feat = self.relation(feat, pooled.center, pooled.size, pooled.obj_offset)
        tokens = pooled.replace_feature(feat)
        if proposed:  # proposal ids are not source object ids
            tokens = tokens.replace(object_ids=torch.full_like(tokens.object_ids, -1))
        return TokenizerOutput(tokens, point_feat, offset, objects.long(), vox)

    def losses(self, points: PointBatch, out: TokenizerOutput) -> TokenizerLosses:
        """Proposal-head loss (centre-offset L1 + direction) against ``points.instance``."""
        off = offset_loss(out.offset, points)
        return TokenizerLosses(off, off.total)
