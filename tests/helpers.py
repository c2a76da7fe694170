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


def assert_merged_lora_exact(lm, ids, tol: float) -> None:
    """Inside ``lm.merged_lora()`` the logits of ``ids [B, L]`` equal the unmerged ones (to ``tol``), some base
    weight really is merged, and afterwards every parameter is bit-exactly what it was (adapters unmerged)."""
    import torch

    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    with torch.no_grad():
        ref = lm(lm.embed(ids)).logits
        with lm.merged_lora():
            merged = {n: p.detach().clone() for n, p in lm.named_parameters()}
            out = lm(lm.embed(ids)).logits
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert any(not torch.equal(merged[n], before[n]) for n in before if "base_layer" in n), "nothing merged"
    for n, p in lm.named_parameters():  # bit-exact restore
        assert torch.equal(p, before[n]), n
