"""Sparse U-Net on spconv (through :mod:`scene3d.sparse.spconv_compat`), giving per-voxel / per-point features.

Layout for ``channels = (c0, c1, ..., cL)`` (L = depth)::

    stem  SubMConv3d(in, c0, 3)                                   key "subm0"
    enc_i ResBlock(c_i) x blocks                                  key "subm{i}"
    down_i SparseConv3d(c_i, c_{i+1}, 2, stride 2)                key "down{i}"   (i < L)
    ...bottom ResBlocks at level L...
    up_i  SparseInverseConv3d(c_{i+1}, c_i, 2)  reusing key "down{i}" (exact inverse of the down sampling)
    dec_i concat(skip_i, up_i) -> Linear -> ResBlock(c_i) x blocks  key "subm{i}"

Neighbour maps are computed once per level and reused through ``indice_key``. Only spconv paths that work on
CPU are used: ``ConvAlgo.Native`` convolutions (spconv's choice in a CPU build); no spconv global pooling
(not implemented on CPU -- pool with ``scatter_reduce`` instead, see :func:`scene3d.sparse.global_pool`).

==============  ===================  =======================================================
forward         shape                meaning
==============  ===================  =======================================================
input           SparseConvTensor     features [V, in_channels], indices [V, 4] int32
output          SparseConvTensor     features [V, out_channels] on the *input* voxels
==============  ===================  =======================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from scene3d.sparse.spconv_compat import (
    SparseConv3d,
    SparseConvTensor,
    SparseInverseConv3d,
    SubMConv3d,
)


@dataclass
class BackboneConfig:
    in_channels: int = 6  # rgb + xyz by default (see ObjectTokenizer)
    channels: Sequence[int] = (32, 64, 96, 128)  # per level; depth = len(channels) - 1 down-samplings
    blocks: int = 1  # residual blocks per level and per side
    norm: str = "batch"  # "batch" or "none"

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 1 or min(self.channels) <= 0:
            raise ValueError(f"channels must be positive ints, got {self.channels}")
        if self.in_channels <= 0:
            raise ValueError(f"in_channels must be > 0, got {self.in_channels}")
        if self.blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {self.blocks}")
        if self.norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {self.norm!r}")

    @property
    def depth(self) -> int:
        return len(self.channels) - 1

    @property
    def out_channels(self) -> int:
        return self.channels[0]


def _norm(c: int, kind: str) -> nn.Module:
    return nn.BatchNorm1d(c, eps=1e-4, momentum=0.1) if kind == "batch" else nn.Identity()


class ResBlock(nn.Module):
    """Two submanifold 3x3x3 convs with norm + ReLU and an identity shortcut (same channels)."""

    def __init__(self, channels: int, indice_key: str, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.norm1 = _norm(channels, norm)
        self.conv2 = SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.norm2 = _norm(channels, norm)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        h = self.conv1(x)
        h = h.replace_feature(torch.relu(self.norm1(h.features)))
        h = self.conv2(h)
        return h.replace_feature(torch.relu(self.norm2(h.features) + x.features))


class SparseUNet(nn.Module):
    def __init__(self, cfg: BackboneConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BackboneConfig()
        ch, nk = cfg.channels, cfg.norm
        self.stem = SubMConv3d(cfg.in_channels, ch[0], 3, padding=1, bias=False, indice_key="subm0")
        self.stem_norm = _norm(ch[0], nk)
        self.enc = nn.ModuleList(
            nn.ModuleList(ResBlock(ch[i], f"subm{i}", nk) for _ in range(cfg.blocks)) for i in range(len(ch))
        )
        self.down = nn.ModuleList(
            SparseConv3d(ch[i], ch[i + 1], 2, stride=2, bias=False, indice_key=f"down{i}") for i in range(cfg.depth)
        )
        self.down_norm = nn.ModuleList(_norm(ch[i + 1], nk) for i in range(cfg.depth))
        self.up = nn.ModuleList(
            SparseInverseConv3d(ch[i + 1], ch[i], 2, bias=False, indice_key=f"down{i}") for i in range(cfg.depth)
        )
        self.up_norm = nn.ModuleList(_norm(ch[i], nk) for i in range(cfg.depth))
        self.fuse = nn.ModuleList(nn.Linear(2 * ch[i], ch[i], bias=False) for i in range(cfg.depth))
        self.fuse_norm = nn.ModuleList(_norm(ch[i], nk) for i in range(cfg.depth))
        self.dec = nn.ModuleList(
            nn.ModuleList(ResBlock(ch[i], f"subm{i}", nk) for _ in range(cfg.blocks)) for i in range(cfg.depth)
        )

    @property
    def out_channels(self) -> int:
        return self.cfg.out_channels

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        if x.features.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected {self.cfg.in_channels} input channels, got {x.features.shape[1]}")
        x = self.stem(x)
        x = x.replace_feature(torch.relu(self.stem_norm(x.features)))
        skips = []
        for i in range(self.cfg.depth + 1):
            for block in self.enc[i]:
                x = block(x)
            if i < self.cfg.depth:
                skips.append(x)
                x = self.down[i](x)
                x = x.replace_feature(torch.relu(self.down_norm[i](x.features)))
        for i in reversed(range(self.cfg.depth)):
            x = self.up[i](x)  # back onto exactly the voxels of skips[i], in the same order
            x = x.replace_feature(torch.relu(self.up_norm[i](x.features)))
            fused = self.fuse[i](torch.cat([skips[i].features, x.features], 1))
            x = skips[i].replace_feature(torch.relu(self.fuse_norm[i](fused)))
            for block in self.dec[i]:
                x = block(x)
        return x
