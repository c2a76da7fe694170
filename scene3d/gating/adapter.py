"""The token gate as the referring model's gating hook.

:class:`~scene3d.models.referring.ReferringSegmenter` calls ``gate(tokens: ObjectTokens, query [B, H])`` and
expects ``GateSelection(kept_index, feat)``. :class:`LLMTokenGate` scores every object token against the
pooled query embedding with :class:`~scene3d.gating.module.TokenGate`, keeps the top ones per scene with the
``scene3d::token_gate`` op and returns the kept rows with their gated (score-scaled) features. In training
the keep ratio is annealed with a step counter that lives in a buffer, so it is checkpointed and a resumed
run continues the same schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scene3d.gating.module import TokenGate, TokenGateConfig
from scene3d.structures.objects import ObjectTokens


class LLMTokenGate(nn.Module):
    def __init__(self, obj_dim: int, query_dim: int, config) -> None:
        super().__init__()
        threshold = config.threshold if config.threshold > 0 else -math.inf  # sigmoid scores: 0 means off
        self.gate = TokenGate(TokenGateConfig(
            token_dim=obj_dim, query_dim=query_dim, hidden_dim=config.hidden, min_keep=config.min_keep,
            keep_ratio=config.keep_ratio, threshold=threshold, anneal_start=1.0, anneal_end=config.keep_ratio,
            anneal_steps=config.anneal_steps))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, tokens: ObjectTokens, query: torch.Tensor):
        from scene3d.models.referring import GateSelection

        step = int(self.step)
        if self.training:
            self.step += 1
        out = self.gate(tokens.feat, tokens.obj_offset, query.to(tokens.feat.dtype), step=step)
        return GateSelection(out.kept_index, out.gated)
