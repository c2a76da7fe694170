"""Object tokenizer: voxelize -> sparse U-Net -> per-object pooling (+ octree geometry) -> relation context.

The octree codec lives in :mod:`scene3d.tokenizer.octree`; its encoder (:mod:`scene3d.tokenizer.geometry`)
is re-exported here.

The package is the 3D *object* tokenizer; the name stays (not ``object_tokenizer``) because the config group
``tokenizer`` and the checkpoint keys ``tokenizer3d.*`` spell it so. The LLM's text tokenizer is called
``text_tokenizer`` where both meet.
"""

from scene3d.tokenizer.backbone import BackboneConfig, SparseUNet
from scene3d.tokenizer.geometry import GeometryEncoder, GeometryEncoderConfig
from scene3d.tokenizer.model import ObjectTokenizer, ObjectTokenizerConfig, TokenizerLosses, TokenizerOutput
from scene3d.tokenizer.pooling import STATS_DIM, pool_objects, token_dim
from scene3d.tokenizer.proposals import (
    OffsetLoss,
    ProposalConfig,
    ProposalHead,
    Recall,
    cluster_proposals,
    offset_loss,
    proposal_recall,
)
from scene3d.tokenizer.relation import RelationConfig, RelationContext, pair_encoding
from scene3d.tokenizer.voxelize import Voxels, scatter_pool, voxelize

__all__ = [
    "BackboneConfig", "GeometryEncoder", "GeometryEncoderConfig", "ObjectTokenizer", "ObjectTokenizerConfig", "OffsetLoss", "ProposalConfig", "ProposalHead",
    "Recall", "RelationConfig", "RelationContext", "STATS_DIM", "SparseUNet", "TokenizerLosses", "TokenizerOutput",
    "Voxels", "cluster_proposals", "offset_loss", "pair_encoding", "pool_objects", "proposal_recall",
    "scatter_pool", "token_dim", "voxelize",
]
