"""Relation context for object tokens (after Chat-3D v2's relation-aware tokens).

Every object attends to the other objects *of its own scene*; the attention logits get a learned bias from a
pairwise spatial encoding, so a token also carries where it sits relative to the others.

Pairwise encoding for objects i (query) and j (key), ``PAIR_DIM`` = 13 numbers::

    d = c_j - c_i (3) | |d| (1) | s_i (3) | s_j (3) | log((s_j + eps) / (s_i + eps)) (3)

=================  ===========  =========================================================
forward            shape        meaning
=================  ===========  =========================================================
feat               [M, D]       object tokens of a ragged batch (rows grouped by scene)
center, size       [M, 3]       box centre / size in metres
obj_offset         [B]          cumulative objects per scene
returns            [M, D]       relation-aware tokens (residual: feat + context)
=================  ===========  =========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scene3d.structures.ragged import batch_from_offset, counts_from_offset

PAIR_DIM = 13


@dataclass
class RelationConfig:
    dim: int = 256
    heads: int = 4
    layers: int = 1
    pair_hidden: int = 32
    ffn_mult: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0, got {self.layers}")


def pair_encoding(center: torch.Tensor, size: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Pairwise geometry ``[..., K, K, PAIR_DIM]`` from centres/sizes ``[..., K, 3]``."""
    d = center[..., None, :, :] - center[..., :, None, :]  # [.., i, j, 3] = c_j - c_i
    k = center.shape[-2]
    si = size[..., :, None, :].expand(*size.shape[:-2], k, k, 3)
    sj = size[..., None, :, :].expand(*size.shape[:-2], k, k, 3)
    ratio = torch.log((sj + eps) / (si + eps))
    return torch.cat([d, d.norm(dim=-1, keepdim=True), si, sj, ratio], -1)


def to_padded(x: torch.Tensor, obj_offset: torch.Tensor):
    """Ragged rows ``[M, ...]`` -> padded ``[B, K, ...]`` and a valid mask ``[B, K]``."""
    counts = counts_from_offset(obj_offset)
    b = batch_from_offset(obj_offset)
    k = int(counts.max()) if counts.numel() else 0
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(x.shape[0], device=x.device) - start[b]
    out = x.new_zeros(len(counts), k, *x.shape[1:])
    out[b, pos] = x
    mask = torch.zeros(len(counts), k, dtype=torch.bool, device=x.device)
    mask[b, pos] = True
    return out, mask


class RelationLayer(nn.Module):
    """Pre-norm attention with a pairwise-geometry bias per head, then a feed-forward block."""

    def __init__(self, cfg: RelationConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.pair = nn.Sequential(nn.Linear(PAIR_DIM, cfg.pair_hidden), nn.GELU(), nn.Linear(cfg.pair_hidden, cfg.heads))
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim), nn.GELU(), nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pair: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bsz, k, d = x.shape  # (B, K, D)
        h = self.cfg.heads
        q, kk, v = self.qkv(self.norm1(x)).view(bsz, k, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (B, H, K, d/H)
        bias = self.pair(pair).permute(0, 3, 1, 2)  # (B, H, K, K)
        # valid keys only; a padded query row attends to itself so no row is all -inf (NaN-free backward)
        allowed = mask[:, None, :] | torch.eye(k, dtype=torch.bool, device=x.device)  # (B, K, K)
        bias = bias.masked_fill(~allowed[:, None], float("-inf"))
        att = torch.nn.functional.scaled_dot_product_attention(
            q, kk, v, attn_mask=bias, dropout_p=self.cfg.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(bsz, k, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class RelationContext(nn.Module):
    def __init__(self, cfg: RelationConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or RelationConfig()
        self.layers = nn.ModuleList(RelationLayer(cfg) for _ in range(cfg.layers))

    def forward(
        self, feat: torch.Tensor, center: torch.Tensor, size: torch.Tensor, obj_offset: torch.Tensor
    ) -> torch.Tensor:
        m = feat.shape[0]
        if feat.dim() != 2 or feat.shape[1] != self.cfg.dim:
            raise ValueError(f"feat must be [M, {self.cfg.dim}], got {tuple(feat.shape)}")
        if center.shape != (m, 3) or size.shape != (m, 3):
            raise ValueError(f"center and size must be [{m}, 3], got {tuple(center.shape)}, {tuple(size.shape)}")
        if obj_offset.numel() and int(obj_offset[-1]) != m:
            raise ValueError(f"obj_offset[-1]={int(obj_offset[-1])} but feat has {m} rows")
        if m == 0 or not self.layers:
            return feat
        x, mask = to_padded(feat, obj_offset)  # (B, K, D), (B, K)
        c, _ = to_padded(center.to(feat.dtype), obj_offset)
        s, _ = to_padded(size.to(feat.dtype), obj_offset)
        pair = pair_encoding(c, s)  # (B, K, K, PAIR_DIM)
        for layer in self.layers:
            x = layer(x, pair, mask)
        return x[mask]  # back to ragged rows, same order
