"""Shared test helpers (importable from test modules: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from scene3d.models.pipeline import PipelineConfig
from scene3d.models.referring import ReferringConfig
from scene3d.tokenizer.backbone import BackboneConfig
from scene3d.tokenizer.model import ObjectTokenizerConfig
from scene3d.tokenizer.relation import RelationConfig


def small_config(**referring) -> PipelineConfig:
    """A Scene3DModel config that builds and trains in seconds on CPU (``referring``: ReferringConfig fields)."""
    tok = ObjectTokenizerConfig(voxel_size=0.08, out_dim=64, backbone=BackboneConfig(channels=(16, 24)),
                                relation=RelationConfig(dim=64), geometry_dim=32)
    return PipelineConfig(tokenizer=tok, referring=ReferringConfig(**referring))
