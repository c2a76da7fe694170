"""Grounding head: which objects a question refers to, read from the LLM's states.

The head gets, for ``B`` questions on one scene, the LLM's last-layer hidden states at the question's own
tokens (``words [B, T, H_llm]``, causal: each word has already read the object tokens and the words before it)
and at ``[SEG]`` (``seg [B, H_llm]``: the whole question, after the LLM has read the scene). The question's
words reach this head only through those states — there is no side text encoder and no shortcut through the
input embeddings (``ReferringConfig.decoder_states="embeddings"`` is the ablation that feeds the input
embeddings at the same positions instead).

Per question the object tokens pass through ``relation_layers`` text-conditioned spatial relation layers
(:class:`RelationLayer`, after ViL3DRel): each object attends to the question's word states, then to the
other objects with a pairwise-geometry bias weighted by the sentence state, taking in the relative geometry
of what it attends to. Object logits score each object state against the sentence state; the "no target"
logit (``null_object``) compares the sentence state with the strongest object state, in one softmax with the
object logits (``scene3d.models.losses.rank_loss``).

===================  ===================  ========================================================
input / output       shape                meaning
===================  ===================  ========================================================
``seg``              [B, H_llm]           LLM state at each question's ``[SEG]``
``words``            [B, T, H_llm]        LLM states at each question's text tokens (padded)
``word_mask``        [B, T] bool          True at real tokens
``objects``          [B, M, D]            per-question, relation-aware object states
``obj_logits``       [B, M]               target logit per object
``null_logits``      [B] or None          "no target" logit (``null_object``)
``sentence``         [B, D]               projected ``[SEG]`` state
``anchor_attention`` [B, L, M, M] / None  attention of head 0 of each relation layer (object i -> j)
===================  ===================  ========================================================

Head 0 of every relation layer is the *anchor head*: where a row names its anchors (Sr3D's ``anchor_ids``, the
synthetic programs' anchors) :func:`scene3d.models.losses.anchor_loss` asks every other object to put its
attention there. Without that signal the attention did not find the anchor (SmolLM2 x 4 layers, 30
CPU-minutes: every chair put < 0.2 of its attention on the window of "the chair closest to the window", and
the superlatives stayed at chance although the pair features hold the answer).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from scene3d.tokenizer.relation import PAIR_DIM, pair_encoding


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


def pair_geometry(center: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Pairwise box geometry ``[M, M, PAIR_DIM + 3]``: the tokenizer's :func:`pair_encoding` (offset ``c_j - c_i``,
    its length, both sizes, log size ratio) plus the per-axis gap between the boxes, ``|c_j - c_i| - (s_i +
    s_j) / 2`` (negative where they overlap) — what "next to", "on" and the side relations with a margin read."""
    enc = pair_encoding(center, size)
    d = center[None, :, :] - center[:, None, :]
    gap = d.abs() - (size[:, None, :] + size[None, :, :]) / 2
    return torch.cat([enc, gap], -1)


def superlative_rank(center: torch.Tensor, sim: torch.Tensor, softness: float = 0.1) -> torch.Tensor:
    """Superlative pair features ``[M, M, 2]`` from box centres ``[M, 3]`` and a similarity ``sim [M, M]`` in
    (0, 1): for the pair (i, j), (1) the soft fraction of the objects like i (weights ``sim[i, k]``, k neither i
    nor j) that lie nearer to j than i does — horizontal distance of the centres, "nearer" a sigmoid over
    ``softness`` metres — so ~0 for the object of its kind nearest to j and ~1 for the farthest; (2) ``log(1 +``
    the weight of those objects``)``, how many there are to compare with.

    Why a hand-built feature: "the chair closest to the desk" compares the chairs' distances to the desk, a
    second-order relation that attention over pairs did not learn in a 15-minute CPU budget (held-out closest
    / farthest ~0.5, chance among two chairs); with this feature (and oracle classes) a standalone relation
    model reached 0.93 on both in 6 minutes, 0.64 / 0.56 without. ``O(M^3)`` memory and time, once per scene."""
    m = center.shape[0]
    xy = center[:, :2]
    d = (xy[:, None, :] - xy[None, :, :]).norm(dim=-1)  # (i, j)
    eye = torch.eye(m, dtype=torch.bool, device=center.device)
    w = sim[:, None, :].masked_fill(eye[:, None, :], 0.0).expand(m, m, m).masked_fill(eye[None], 0.0)  # w[i, j, k]
    nearer = torch.sigmoid((d[:, :, None] - d.T[None, :, :]) / softness)  # [i, j, k]: d(k, j) < d(i, j)
    n = w.sum(-1)
    return torch.stack([(w * nearer).sum(-1) / (n + 1e-3), torch.log1p(n)], -1)


class RelationLayer(nn.Module):
    """One text-conditioned spatial relation layer over the objects of one scene, for ``B`` questions.

    After ViL3DRel's language-conditioned spatial self-attention (Chen et al., NeurIPS 2022): every object
    (1) cross-attends to the question's word states, then (2) attends to the other objects with attention
    logits ``q_i . k_j / sqrt(d) + g_h(sentence) . pair_ij`` — the pairwise geometry weighted by what the
    question asks for — and takes in, beside ``v_j``, an embedding of ``pair_ij`` itself, so an object that
    attends to the anchor learns where the anchor lies relative to it ("left of the desk", "between",
    "closest to"); (3) an FFN. Post-norm residual blocks. ``o [B, M, D]``, ``words [B, T, D]``, ``pair [M, M,
    P]``."""

    def __init__(self, dim: int, heads: int, pair_hidden: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dh, self.p = heads, dim // heads, pair_hidden
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.gate = nn.Linear(dim, heads * pair_hidden)
        self.pair_value = nn.Linear(pair_hidden, dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def pair_values(self, pair: torch.Tensor) -> torch.Tensor:
        """What an attended pair adds to the values, laid out ``[M * h, M, dh]`` (row ``i * h + head``) for one
        batched matmul per layer: question-independent, so computed once per scene."""
        m = pair.shape[0]
        pv = self.pair_value(pair).view(m, m, self.heads, self.dh)  # (i, j, h, dh)
        return pv.permute(0, 2, 1, 3).reshape(m * self.heads, m, self.dh)

    def forward(self, o, words, word_mask, sent, pair, pv):
        """-> ``(o [B, M, D], att [B, heads, M, M])``."""
        b, m, d = o.shape
        h, p = self.heads, self.p
        o = self.norms[0](o + self.cross(o, words, words, key_padding_mask=~word_mask, need_weights=False)[0])
        q, k, v = self.qkv(o).view(b, m, 3, h, self.dh).permute(2, 0, 3, 1, 4)  # (B, h, M, dh) each
        bias = (pair.reshape(m * m, p) @ self.gate(sent).view(b * h, p).T).view(m, m, b, h).permute(2, 3, 0, 1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(self.dh) + bias).softmax(-1)  # (B, h, M, M)
        ctx = att @ v  # (B, h, M, dh)
        # + sum_j att[b, h, i, j] pv[i, j, h]: one matmul per (object, head) over the questions
        ctx = ctx + (att.permute(2, 1, 0, 3).reshape(m * h, b, m) @ pv).view(m, h, b, self.dh).permute(2, 1, 0, 3)
        o = self.norms[1](o + self.out(ctx.transpose(1, 2).reshape(b, m, d)))
        return self.norms[2](o + self.ffn(o)), att


class ObjectEncoding(NamedTuple):
    """The question-independent half of the grounding head for one scene (:meth:`GroundingHead.encode_objects`)."""

    obj: torch.Tensor  # [M, D] projected object tokens
    obj_pos: torch.Tensor  # [M, D] encoding of box center (scene-centred) and size
    pair: torch.Tensor  # [M, M, pair_hidden] embedded pairwise geometry
    pair_values: tuple  # per relation layer, [M * heads, M, dim / heads] (RelationLayer.pair_values)


class Grounding(NamedTuple):
    objects: torch.Tensor  # [B, M, D]
    obj_logits: torch.Tensor  # [B, M]
    null_logits: Optional[torch.Tensor]  # [B]
    sentence: torch.Tensor  # [B, D]
    anchor_attention: Optional[torch.Tensor] = None  # [B, L, M, M]: head 0 of each relation layer


class GroundingHead(nn.Module):
    """See the module docstring. ``config`` is a :class:`scene3d.heads.mask_decoder.MaskDecoderConfig`."""

    def __init__(self, c) -> None:
        super().__init__()
        self.config = c
        # LayerNorm first: the LLM's states and (in the ablation) its input embeddings differ in scale by ~50x
        self.word_in = nn.Sequential(nn.LayerNorm(c.llm_dim), nn.Linear(c.llm_dim, c.dim))
        self.sentence_in = nn.Sequential(nn.LayerNorm(c.llm_dim), nn.Linear(c.llm_dim, c.dim))
        self.obj_proj = nn.Sequential(nn.Linear(c.obj_dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        self.obj_pos = FourierEncoding(c.num_freqs, c.coord_scale, c.dim, in_dim=6)
        self.state_in = (nn.Sequential(nn.LayerNorm(c.llm_dim), nn.Linear(c.llm_dim, c.dim))
                         if getattr(c, "object_states", False) else None)
        geo_dim = PAIR_DIM + 3 + (2 if c.rank_pairs else 0)
        self.pair_embed = nn.Sequential(nn.Linear(geo_dim, c.pair_hidden), nn.GELU(),
                                        nn.Linear(c.pair_hidden, c.pair_hidden))
        self.relation = nn.ModuleList(RelationLayer(c.dim, c.num_heads, c.pair_hidden, c.dropout)
                                      for _ in range(c.relation_layers))
        self.score = nn.Sequential(nn.Linear(2 * c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, 1))
        # "no target" from the sentence and the strongest object state (max-pooled): what was asked for
        # against what is there
        self.null_score = (nn.Sequential(nn.Linear(2 * c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, 1))
                           if c.null_object else None)
        if c.rank_pairs:  # object similarity for superlative_rank: cosine of an embedding, learned scale / offset
            self.sim_embed = nn.Linear(c.dim, 32)
            self.sim_affine = nn.Parameter(torch.tensor([10.0, -5.0]))
        else:
            self.sim_embed = self.sim_affine = None

    def similarity_logits(self, obj: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, M]`` that two objects are alike (same class), from projected object tokens ``obj [M, D]``
        (``obj_proj`` of the features, no position: a class does not depend on where the object is)."""
        e = nn.functional.normalize(self.sim_embed(obj), dim=-1)
        return self.sim_affine[0] * (e @ e.T) + self.sim_affine[1]

    def encode_objects(self, feat: torch.Tensor, center: torch.Tensor, size: torch.Tensor,
                       origin: torch.Tensor, states: Optional[torch.Tensor] = None) -> ObjectEncoding:
        """Object tokens of one scene (``feat [M, C]``, box ``center`` / ``size [M, 3]``, scene ``origin [3]``;
        with ``config.object_states`` also ``states [M, H_llm]``, the LLM's states at the object tokens)."""
        c = self.config
        obj = self.obj_proj(feat)
        if self.state_in is not None:
            if states is None or states.shape != (feat.shape[0], c.llm_dim):
                raise ValueError(f"decoder.object_states needs the LLM's state at each of the {feat.shape[0]} "
                                 f"object tokens ([M, {c.llm_dim}]), got "
                                 f"{None if states is None else tuple(states.shape)}")
            obj = obj + self.state_in(states.float()).to(obj.dtype)
        obj_pos = self.obj_pos(torch.cat([center - origin, size], dim=1))  # (M, D)
        geo = pair_geometry(center.to(obj.dtype), size.to(obj.dtype))
        if self.sim_embed is not None:
            sim = torch.sigmoid(self.similarity_logits(obj))
            geo = torch.cat([geo, superlative_rank(center.detach().to(obj.dtype), sim, c.rank_softness)], -1)
        pair = self.pair_embed(geo)
        return ObjectEncoding(obj, obj_pos, pair, tuple(layer.pair_values(pair) for layer in self.relation))

    def forward(self, enc: ObjectEncoding, seg: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor) -> Grounding:
        b = seg.shape[0]
        if words.shape[0] != b or word_mask.shape != words.shape[:2]:
            raise ValueError(f"words must be [B={b}, T, H] with word_mask [B, T], got {tuple(words.shape)} and "
                             f"{tuple(word_mask.shape)}")
        if not bool(word_mask.any(1).all()):
            raise ValueError("every question needs at least one word state (word_mask has an empty row)")
        w = self.word_in(words.float())  # (B, T, D)
        sent = self.sentence_in(seg.float())  # (B, D)
        o = (enc.obj + enc.obj_pos).expand(b, -1, -1)  # (B, M, D)
        anchor_att = []
        if o.shape[1]:
            for layer, pv in zip(self.relation, enc.pair_values):
                o, att = layer(o, w, word_mask, sent, enc.pair, pv)
                anchor_att.append(att[:, 0])
        logits = self.score(torch.cat([o, sent[:, None].expand_as(o)], -1)).squeeze(-1)  # (B, M)
        null = None
        if self.null_score is not None:
            pooled = o.max(1).values if o.shape[1] else o.new_zeros(b, o.shape[-1])
            null = self.null_score(torch.cat([sent, pooled], -1)).squeeze(-1)  # (B,)
        return Grounding(o, logits, null, sent, torch.stack(anchor_att, 1) if anchor_att else None)
