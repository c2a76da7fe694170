"""The gating module: a light query-conditioned token scorer plus the ``token_gate`` op, and an
attention-derived scorer (AdaToken-3D style) as an alternative source of scores.

Query-conditioned scorer (per object token ``x_m`` of scene ``b`` and pooled query text embedding ``q_b``)::

    s_m = sigmoid( w . gelu(W_t x_m + W_q q_b) + c )          in (0, 1)

The op keeps the best tokens per scene and multiplies each by ``s_m``, so the scorer is trained by the loss of
whatever consumes the gated tokens. The bias ``c`` starts at ``init_bias`` (sigmoid(2) ~ 0.88) so that the gate
starts close to "keep, barely scaled".

Keep ratio: in training it anneals from ``anneal_start`` to ``anneal_end`` over ``anneal_steps`` optimiser steps
after ``anneal_warmup`` steps (cosine or linear; :func:`keep_ratio_schedule`); at inference it is the fixed
``keep_ratio`` with the optional ``threshold``. ``min_keep`` always holds.

=================  =============  ==============================================================
name               shape          meaning
=================  =============  ==============================================================
tokens             [M, C]         object tokens of B scenes, ragged by ``offset`` [B]
query              [B, D]         pooled query embedding, or [B, L, D] with ``query_mask`` [B, L]
scores             [M]            gate of every token (before selection)
gated              [K, C]         kept tokens scaled by their gate, compacted
kept_index         [K]            global row of each kept token (int64)
new_offset         [B]            cumulative kept counts (int64)
=================  =============  ==============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from scene3d.gating.op import token_gate

__all__ = [
    "TokenGateConfig", "TokenGate", "TokenGateOutput", "keep_ratio_schedule", "pool_query",
    "attention_scores",
]


@dataclass
class TokenGateConfig:
    """Sizes of the scorer and the keep-ratio policy (training schedule, inference ratio / threshold)."""

    token_dim: int = 256  # C of the object tokens
    query_dim: int = 128  # D of the query text embedding (LLM hidden size, say)
    hidden_dim: int = 128  # width of the scorer
    init_bias: float = 2.0  # initial logit: gates start near sigmoid(2) ~ 0.88
    min_keep: int = 1  # every scene keeps at least min(min_keep, n) tokens
    # inference
    keep_ratio: float = 0.5
    threshold: float = -math.inf  # drop kept candidates scoring below it (-inf: off)
    # training: keep ratio annealed from start to end
    anneal_start: float = 1.0
    anneal_end: float = 0.5
    anneal_steps: int = 1000
    anneal_warmup: int = 0
    anneal_shape: str = "cosine"  # "cosine" or "linear"
    train_threshold: float = -math.inf

    def __post_init__(self) -> None:
        for name in ("token_dim", "query_dim", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("keep_ratio", "anneal_start", "anneal_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.min_keep < 0 or self.anneal_steps < 0 or self.anneal_warmup < 0:
            raise ValueError("min_keep, anneal_steps and anneal_warmup must be >= 0")
        if self.anneal_shape not in ("cosine", "linear"):
            raise ValueError(f"anneal_shape must be 'cosine' or 'linear', got {self.anneal_shape!r}")


def keep_ratio_schedule(step: int, start: float, end: float, steps: int, warmup: int = 0,
                        shape: str = "cosine") -> float:
    """Keep ratio at optimiser ``step``: ``start`` during ``warmup``, then to ``end`` over ``steps`` steps.

    ``p = clamp((step - warmup) / steps, 0, 1)``; linear ``start + (end - start) p``; cosine
    ``end + (start - end) (1 + cos(pi p)) / 2``. ``steps == 0`` jumps to ``end`` after the warm-up.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return float(start)
    p = 1.0 if steps == 0 else min(1.0, (step - warmup) / steps)
    if shape == "linear":
        return float(start + (end - start) * p)
    if shape == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))
    raise ValueError(f"shape must be 'cosine' or 'linear', got {shape!r}")


def pool_query(query: torch.Tensor, query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, D]`` as is, or the masked mean of ``[B, L, D]`` over valid positions (``query_mask [B, L]``)."""
    if query.dim() == 2:
        return query
    if query.dim() != 3:
        raise ValueError(f"query must be [B, D] or [B, L, D], got shape {tuple(query.shape)}")
    if query_mask is None:
        return query.mean(1)
    if query_mask.shape != query.shape[:2]:
        raise ValueError(f"query_mask shape {tuple(query_mask.shape)} must be [B, L] = {tuple(query.shape[:2])}")
    w = query_mask.to(query.dtype).unsqueeze(-1)  # (B, L, 1)
    n = w.sum(1)
    if bool((n == 0).any()):
        raise ValueError("query_mask has a sample without any valid query position")
    return (query * w).sum(1) / n


class TokenGateOutput(NamedTuple):
    gated: torch.Tensor  # (K, C)
    kept_index: torch.Tensor  # (K,) int64
    new_offset: torch.Tensor  # (B,) int64
    scores: torch.Tensor  # (M,) gate of every token
    keep_ratio: float  # ratio used for this call


class TokenGate(nn.Module):
    """Query-conditioned scorer + ``token_gate`` (see the module docstring)."""

    def __init__(self, config: TokenGateConfig) -> None:
        super().__init__()
        self.config = config
        self.token_proj = nn.Linear(config.token_dim, config.hidden_dim)
        self.query_proj = nn.Linear(config.query_dim, config.hidden_dim, bias=False)
        self.out = nn.Linear(config.hidden_dim, 1)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.constant_(self.out.bias, config.init_bias)

    def keep_ratio_at(self, step: Optional[int]) -> float:
        """Training keep ratio at ``step`` (``None``: the annealed end value)."""
        c = self.config
        if step is None:
            return float(c.anneal_end)
        return keep_ratio_schedule(step, c.anneal_start, c.anneal_end, c.anneal_steps, c.anneal_warmup,
                                   c.anneal_shape)

    def score(self, tokens: torch.Tensor, offset: torch.Tensor, query: torch.Tensor,
              query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Gate in (0, 1) of every token ``[M]`` against its scene's pooled query."""
        if tokens.dim() != 2 or tokens.shape[1] != self.config.token_dim:
            raise ValueError(f"tokens must be [M, {self.config.token_dim}], got shape {tuple(tokens.shape)}")
        q = pool_query(query, query_mask)  # (B, D)
        if q.shape != (offset.numel(), self.config.query_dim):
            raise ValueError(f"query must give [B, D] = [{offset.numel()}, {self.config.query_dim}], "
                             f"got {tuple(q.shape)}")
        counts = torch.diff(offset.long(), prepend=offset.new_zeros(1, dtype=torch.long))
        if bool((counts < 0).any()) or (offset.numel() and int(offset[-1]) != tokens.shape[0]):
            raise ValueError(f"offset must be non-decreasing and end at M={tokens.shape[0]}")
        batch = torch.repeat_interleave(torch.arange(offset.numel(), device=tokens.device), counts)  # (M,)
        h = F.gelu(self.token_proj(tokens) + self.query_proj(q)[batch])  # (M, H)
        return torch.sigmoid(self.out(h).squeeze(-1))  # (M,)

    def forward(self, tokens: torch.Tensor, offset: torch.Tensor, query: Optional[torch.Tensor] = None,
                query_mask: Optional[torch.Tensor] = None, *, step: Optional[int] = None,
                scores: Optional[torch.Tensor] = None) -> TokenGateOutput:
        """Score (or take ``scores``, e.g. from :func:`attention_scores`) and gate the tokens.

        In training mode the keep ratio is ``keep_ratio_at(step)`` with ``train_threshold``; in eval mode the
        fixed ``keep_ratio`` and ``threshold``.
        """
        c = self.config
        if scores is None:
            if query is None:
                raise ValueError("TokenGate needs a query embedding (or precomputed scores)")
            scores = self.score(tokens, offset, query, query_mask)
        scores = scores.to(tokens.dtype)
        if self.training:
            ratio, threshold = self.keep_ratio_at(step), c.train_threshold
        else:
            ratio, threshold = c.keep_ratio, c.threshold
        gated, kept_index, new_offset = token_gate(tokens, scores, offset, ratio, c.min_keep, threshold)
        return TokenGateOutput(gated, kept_index, new_offset, scores, ratio)


# --- attention-derived scores (AdaToken-3D) ---------------------------------------------------------------------

def attention_scores(attn_probs: torch.Tensor, obj_positions: torch.Tensor, obj_offset: torch.Tensor,
                     query_mask: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                     normalize: str = "max") -> torch.Tensor:
    """Rate each object token by the attention it receives from the later (query) positions of one LLM layer.

    ``score_m = mean_heads mean_{q in Q_b} attn[b, h, q, pos_m]`` for object ``m`` of sample ``b``, where
    ``Q_b`` is ``query_mask[b]`` or, by default, every position after the sample's last object token (that are
    not padding in ``attention_mask``). ``normalize="max"`` divides by the sample's largest score, giving
    values in [0, 1] with the most-attended token at 1; ``"none"`` keeps the raw mean attention.

    =================  ==========  ============================================================
    attn_probs         [B,H,L,L]   attention probabilities of one layer (or [B, L, L])
    obj_positions      [M]         sequence position of each object token in its sample
    obj_offset         [B]         cumulative object counts (ragged like the tokens)
    query_mask         [B, L]      optional bool: positions whose attention counts
    attention_mask     [B, L]      optional 1 = real token, 0 = padding
    returns            [M]         score per object token (dtype of attn_probs)
    =================  ==========  ============================================================
    """
    if attn_probs.dim() == 3:
        attn_probs = attn_probs.unsqueeze(1)
    if attn_probs.dim() != 4 or attn_probs.shape[-1] != attn_probs.shape[-2]:
        raise ValueError(f"attn_probs must be [B, H, L, L] or [B, L, L], got shape {tuple(attn_probs.shape)}")
    b, _, length, _ = attn_probs.shape
    if obj_offset.dim() != 1 or obj_offset.numel() != b:
        raise ValueError(f"obj_offset must be [B={b}], got shape {tuple(obj_offset.shape)}")
    counts = torch.diff(obj_offset.long(), prepend=obj_offset.new_zeros(1, dtype=torch.long))
    if bool((counts < 0).any()) or int(obj_offset[-1]) != obj_positions.numel():
        raise ValueError(f"obj_offset must be non-decreasing and end at M={obj_positions.numel()}")
    pos = obj_positions.long()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
        raise ValueError(f"obj_positions must lie in [0, {length}), got range "
                         f"[{int(pos.min())}, {int(pos.max())}]")
    if normalize not in ("max", "none"):
        raise ValueError(f"normalize must be 'max' or 'none', got {normalize!r}")
    device = attn_probs.device
    batch = torch.repeat_interleave(torch.arange(b, device=device), counts)  # (M,)
    if query_mask is None:
        last = torch.full((b,), -1, dtype=torch.long, device=device).scatter_reduce(
            0, batch, pos, reduce="amax")  # (B,) last object position per sample
        query_mask = torch.arange(length, device=device)[None, :] > last[:, None]  # (B, L)
    elif query_mask.shape != (b, length):
        raise ValueError(f"query_mask must be [B, L] = [{b}, {length}], got {tuple(query_mask.shape)}")
    qmask = query_mask.bool()
    if attention_mask is not None:
        if attention_mask.shape != (b, length):
            raise ValueError(f"attention_mask must be [B, L] = [{b}, {length}], got {tuple(attention_mask.shape)}")
        qmask = qmask & attention_mask.bool()
    nq = qmask.sum(1)  # (B,)
    if bool(((nq == 0) & (counts > 0)).any()):
        bad = ((nq == 0) & (counts > 0)).nonzero().flatten().tolist()
        raise ValueError(f"samples {bad} have object tokens but no query position after them")
    a = attn_probs.mean(1)  # (B, L, L): query position x key position
    received = torch.einsum("bq,bqk->bk", qmask.to(a.dtype), a) / nq.clamp(min=1)[:, None].to(a.dtype)  # (B, L)
    scores = received[batch, pos]  # (M,)
    if normalize == "max" and scores.numel():
        top = torch.zeros(b, dtype=scores.dtype, device=device).scatter_reduce(0, batch, scores, reduce="amax")
        scores = scores / top[batch].clamp(min=torch.finfo(scores.dtype).tiny)
    return scores
