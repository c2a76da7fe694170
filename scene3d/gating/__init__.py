"""Spatial token gating: the ``scene3d::token_gate`` op (Python side) and the query-conditioned gate module."""

from scene3d.gating.module import (
    TokenGate,
    TokenGateConfig,
    TokenGateOutput,
    attention_scores,
    keep_ratio_schedule,
)
from scene3d.gating.op import TokenGateResult, has_native_op, token_gate, token_gate_reference

__all__ = [
    "TokenGate", "TokenGateConfig", "TokenGateOutput", "TokenGateResult", "attention_scores",
    "has_native_op", "keep_ratio_schedule", "token_gate", "token_gate_reference",
]
