"""Mask decoder after PLM's geometric reactivation decoder: the ``[SEG]`` state re-attends to geometry.

The LLM's ``[SEG]`` hidden state is turned into ``num_queries`` queries. Each layer lets the queries
(1) cross-attend to the object tokens, whose keys carry a Fourier encoding of the box centers and sizes,
(2) cross-attend to dense per-point — or per-superpoint — features with a Fourier encoding of their
coordinates ("reactivating" the geometry the LLM only saw through pooled object tokens),
(3) self-attend, then (4) pass an FFN. Mask logits are dot products of the queries' mask embeddings with the
dense features; object scores are dot products of their class embeddings with the object tokens. The union
over queries (max) gives one mask per sample, so zero, one or many targets come out of the same head: zero
targets are a mask and object scores all below threshold.

Coordinates are centred on each scene's point mean before encoding, so the encoding is translation invariant.

=====================  ====================  ==========================================================
input                  shape                 meaning
=====================  ====================  ==========================================================
``seg_hidden``         [B, H_llm]            hidden state at the ``[SEG]`` position of each sample
``point_feat``         [N, C_pt]             dense backbone features of all points
``coord``              [N, 3]                point coordinates
``point_offset``       [B] int64             cumulative point counts
``tokens``             ObjectTokens          ``feat [M, C_obj]``, ``center``, ``size``, ``obj_offset``
``superpoint``         [N] int64 or None     superpoint id of each point, local to its scene
output                 shape
``point_logits``       [N]                   union-mask logit per point (ragged like the points)
``obj_logits``         [M]                   target logit per object (ragged like ``obj_offset``)
``query_point_logits`` list of [Q, N_b]      per-query mask logits of each scene
=====================  ====================  ==========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from scene3d.structures.objects import ObjectTokens
from scene3d.structures.ragged import counts_from_offset


@dataclass
class MaskDecoderConfig:
    llm_dim: int = 128
    point_dim: int = 32
    obj_dim: int = 32
    dim: int = 128
    num_queries: int = 4
    num_layers: int = 2
    num_heads: int = 4
    num_freqs: int = 8
    #: Largest scene extent (m) the lowest Fourier frequency resolves without wrapping.
    coord_scale: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        for name in ("llm_dim", "point_dim", "obj_dim", "dim", "num_queries", "num_layers", "num_freqs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class DecoderOutput(NamedTuple):
    point_logits: torch.Tensor
    obj_logits: torch.Tensor
    query_point_logits: list


class FourierEncoding(nn.Module):
    """xyz ``[..., 3]`` -> ``[..., dim]``: sin/cos at octave frequencies, then a linear layer."""

    def __init__(self, num_freqs: int, scale: float, dim: int, in_dim: int = 3) -> None:
        super().__init__()
        freqs = (2.0 ** torch.arange(num_freqs)) * (2 * math.pi / scale)
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(in_dim * num_freqs * 2 + in_dim, dim)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        ang = xyz.unsqueeze(-1) * self.freqs  # (..., 3, F)
        enc = torch.cat([ang.sin().flatten(-2), ang.cos().flatten(-2), xyz], dim=-1)
        return self.proj(enc)


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.obj_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.pt_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, q, obj, obj_pos, pts, pts_pos):
        # q (1, Q, D); obj (1, M, D); pts (1, S, D). Empty key sets are skipped (attention over nothing).
        if obj.shape[1]:
            q = self.norms[0](q + self.obj_attn(q, obj + obj_pos, obj, need_weights=False)[0])
        if pts.shape[1]:
            q = self.norms[1](q + self.pt_attn(q, pts + pts_pos, pts, need_weights=False)[0])
        q = self.norms[2](q + self.self_attn(q, q, q, need_weights=False)[0])
        return self.norms[3](q + self.ffn(q))


class MaskDecoder(nn.Module):
    """See the module docstring for the inputs and outputs."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        c = self.config = config
        self.seg_to_queries = nn.Linear(c.llm_dim, c.num_queries * c.dim)
        self.query_embed = nn.Parameter(torch.randn(c.num_queries, c.dim) * 0.02)
        self.point_proj = nn.Sequential(nn.Linear(c.point_dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        self.obj_proj = nn.Sequential(nn.Linear(c.obj_dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        self.point_pos = FourierEncoding(c.num_freqs, c.coord_scale, c.dim)
        self.obj_pos = FourierEncoding(c.num_freqs, c.coord_scale, c.dim, in_dim=6)
        self.layers = nn.ModuleList(_Layer(c.dim, c.num_heads, c.dropout) for _ in range(c.num_layers))
        self.mask_embed = nn.Sequential(nn.Linear(c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        self.cls_embed = nn.Sequential(nn.Linear(c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        self.obj_out = nn.Linear(c.dim, c.dim)

    def forward(self, seg_hidden: torch.Tensor, point_feat: torch.Tensor, coord: torch.Tensor,
                point_offset: torch.Tensor, tokens: ObjectTokens,
                superpoint: Optional[torch.Tensor] = None) -> DecoderOutput:
        c = self.config
        b = seg_hidden.shape[0]
        p_counts = counts_from_offset(point_offset)
        o_counts = tokens.obj_counts
        if len(p_counts) != b or len(o_counts) != b:
            raise ValueError(f"seg_hidden has {b} samples but point_offset has {len(p_counts)} scenes and "
                             f"obj_offset {len(o_counts)}")
        if point_feat.shape[0] != coord.shape[0] or (superpoint is not None and superpoint.shape[0] != coord.shape[0]):
            raise ValueError("point_feat, coord and superpoint must have one row per point")
        if not torch.isfinite(coord).all():
            raise ValueError("coord holds NaN or inf")
        pts_all = self.point_proj(point_feat)  # (N, D)
        obj_all = self.obj_proj(tokens.feat)  # (M, D)
        queries = self.seg_to_queries(seg_hidden).view(b, c.num_queries, c.dim) + self.query_embed  # (B, Q, D)
        scale = 1.0 / math.sqrt(c.dim)
        point_logits, obj_logits, per_query = [], [], []
        p0 = o0 = 0
        for i in range(b):
            p1, o1 = p0 + int(p_counts[i]), o0 + int(o_counts[i])
            xyz = coord[p0:p1]
            origin = xyz.mean(0) if p1 > p0 else coord.new_zeros(3)
            pts, rel = pts_all[p0:p1], xyz - origin
            inverse = None
            if superpoint is not None and p1 > p0:
                # pool to superpoints (native scatter_reduce mean); logits are broadcast back below
                _, inverse = torch.unique(superpoint[p0:p1], return_inverse=True)
                s = int(inverse.max()) + 1
                idx = inverse.unsqueeze(1)
                pts = pts.new_zeros(s, c.dim).scatter_reduce(0, idx.expand(-1, c.dim), pts, "mean", include_self=False)
                rel = rel.new_zeros(s, 3).scatter_reduce(0, idx.expand(-1, 3), rel, "mean", include_self=False)
            geo = torch.cat([tokens.center[o0:o1] - origin, tokens.size[o0:o1]], dim=1)  # (M_b, 6)
            obj, obj_pos = obj_all[o0:o1], self.obj_pos(geo)
            pts_pos = self.point_pos(rel)
            q = queries[i : i + 1]
            for layer in self.layers:
                q = layer(q, obj[None], obj_pos[None], pts[None], pts_pos[None])
            q = q[0]  # (Q, D)
            qm = self.mask_embed(q) @ (pts + pts_pos).T * scale  # (Q, S)
            if inverse is not None:
                qm = qm[:, inverse]  # (Q, N_b)
            per_query.append(qm)
            point_logits.append(qm.max(0).values if qm.shape[1] else qm.new_zeros(0))
            ol = self.cls_embed(q) @ self.obj_out(obj + obj_pos).T * scale  # (Q, M_b)
            obj_logits.append(ol.max(0).values if ol.shape[1] else ol.new_zeros(0))
            p0, o0 = p1, o1
        return DecoderOutput(torch.cat(point_logits), torch.cat(obj_logits), per_query)
