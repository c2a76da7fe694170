"""Geometry encoder: one vector per object from its octree token stream (:mod:`scene3d.tokenizer.octree`).

Per token (all tokens of all objects at once, no per-object loop)::

    e_t = EmbeddingBag_sum({slot * 256 + byte : byte != 0})      # the token's bitmap as a bag of sub-tokens
        + E_height[height_t] + E_level[level_t]                   # absolute scale, depth below the root
        + Linear(fourier(centre_t))                               # node centre in the object's unit cube
    h_t = e_t + MLP(LayerNorm(e_t))

Per object (torch's native ``scatter_reduce`` / ``index_add_``; torch-scatter is not a dependency)::

    attention pool  a_m = sum_t softmax_m(w . h_t) h_t      (softmax inside each object)
    mean pool       u_m = mean_t h_t,      max pool  x_m = max_t h_t
    out_m = Linear([a_m, u_m, x_m]) + E_depth[depth_m]      (objects with tokens)
    out_m = empty                                           (objects with zero tokens: a learned vector)

============  =================  ==================================================================
input         shape / dtype      meaning
============  =================  ==================================================================
``code``      OctreeCode         M objects, T tokens of width W = 8**(levels_per_token-1)
``nodes``     TokenNodes         optional, the result of ``token_nodes(code)`` when already computed
output        [M, out_dim]       one geometry vector per object
============  =================  ==================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from scene3d.tokenizer.octree import (
    DEFAULT_LEVELS_PER_TOKEN,
    MAX_DEPTH,
    OctreeCode,
    TokenNodes,
    token_nodes,
    token_positions,
    token_width,
)


@dataclass
class GeometryEncoderConfig:
    """Sizes of :class:`GeometryEncoder`."""

    out_dim: int = 256  #: C, size of the per-object vector
    hidden_dim: int = 128  #: size of the per-token features
    levels_per_token: int = DEFAULT_LEVELS_PER_TOKEN  #: must match the codes it reads
    num_frequencies: int = 6  #: Fourier frequencies of the node-centre encoding
    pool: Literal["attention", "meanmax"] = "attention"  #: "attention" uses attention + mean + max

    def __post_init__(self) -> None:
        if self.out_dim < 1 or self.hidden_dim < 1:
            raise ValueError(f"out_dim and hidden_dim must be >= 1, got {self.out_dim}, {self.hidden_dim}")
        if not 1 <= self.levels_per_token <= 4:
            raise ValueError(f"levels_per_token must lie in [1, 4], got {self.levels_per_token}")
        if self.num_frequencies < 0:
            raise ValueError(f"num_frequencies must be >= 0, got {self.num_frequencies}")
        if self.pool not in ("attention", "meanmax"):
            raise ValueError(f"pool must be 'attention' or 'meanmax', got {self.pool!r}")


class GeometryEncoder(nn.Module):
    """Embeds each object's octree tokens and pools them into one vector per object (see module doc)."""

    def __init__(self, config: GeometryEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or GeometryEncoderConfig()
        h = cfg.hidden_dim
        self.vocab_size = token_width(cfg.levels_per_token) * 256
        self.sub_token = nn.EmbeddingBag(self.vocab_size, h, mode="sum")
        self.height = nn.Embedding(MAX_DEPTH + 1, h)
        self.level = nn.Embedding(MAX_DEPTH + 1, h)
        self.depth = nn.Embedding(MAX_DEPTH + 1, cfg.out_dim)
        self.register_buffer(
            "freqs", (2.0 ** torch.arange(cfg.num_frequencies, dtype=torch.float32)) * math.pi, persistent=False
        )
        self.pos = nn.Linear(3 + 6 * cfg.num_frequencies, h)
        self.norm = nn.LayerNorm(h)
        self.mlp = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))
        n_pooled = 3 if cfg.pool == "attention" else 2
        self.score = nn.Linear(h, 1) if cfg.pool == "attention" else None
        self.out = nn.Linear(n_pooled * h, cfg.out_dim)
        self.empty = nn.Parameter(torch.randn(cfg.out_dim) * 0.02)
        nn.init.normal_(self.sub_token.weight, std=0.02)

    def _fourier(self, x: torch.Tensor) -> torch.Tensor:
        ang = x[:, :, None] * self.freqs  # (T, 3, F)
        return torch.cat([x, torch.sin(ang).flatten(1), torch.cos(ang).flatten(1)], 1)

    def forward(self, code: OctreeCode, nodes: Optional[TokenNodes] = None) -> torch.Tensor:
        cfg = self.config
        if code.levels_per_token != cfg.levels_per_token:
            raise ValueError(
                f"code has levels_per_token={code.levels_per_token} but the encoder was built for "
                f"{cfg.levels_per_token}")
        dev = self.empty.device
        code = code.to(dev)
        m, t = code.num_objects, code.num_tokens
        counts = code.counts
        out = self.empty.expand(m, -1)
        if t == 0:
            return out.clone()
        with torch.no_grad():  # structure only: node centres from the (validating) top-down walk
            nodes = token_nodes(code) if nodes is None else nodes
            pos = token_positions(code, nodes).to(self.empty.dtype)
        obj = code.token_obj  # (T,)
        # the token's bitmap as a bag of sub-token ids slot * 256 + byte (non-zero bytes only)
        row, slot = (code.tokens != 0).nonzero(as_tuple=True)
        ids = slot * 256 + code.tokens[row, slot].long()
        bag_offsets = torch.cumsum(torch.bincount(row, minlength=t), 0) - torch.bincount(row, minlength=t)
        e = self.sub_token(ids, bag_offsets)  # (T, H)
        e = e + self.height(code.token_height) + self.level(code.token_level) + self.pos(self._fourier(pos))
        h = e + self.mlp(self.norm(e))  # (T, H)

        hd = h.shape[1]
        cnt = counts.clamp_min(1).to(h.dtype)[:, None]  # (M, 1)
        mean = h.new_zeros(m, hd).index_add_(0, obj, h) / cnt
        idx = obj[:, None].expand(-1, hd)
        mx = h.new_zeros(m, hd).scatter_reduce(0, idx, h, "amax", include_self=False)
        pooled = [mean, mx]
        if self.score is not None:
            s = self.score(h).squeeze(1)  # (T,)
            smax = s.new_full((m,), -torch.inf).scatter_reduce(0, obj, s.detach(), "amax", include_self=True)
            w = torch.exp(s - smax[obj])
            z = w.new_zeros(m).index_add_(0, obj, w)
            attn = h.new_zeros(m, hd).index_add_(0, obj, h * (w / z[obj])[:, None])
            pooled = [attn] + pooled
        full = self.out(torch.cat(pooled, 1)) + self.depth(code.depth)  # (M, C)
        return torch.where((counts > 0)[:, None], full, out)
