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

Relation layers (``relation_layers > 0``; the shipped head config uses 2): before the queries see them, the
object tokens of each question pass through text-conditioned spatial relation layers (:class:`_RelationLayer`,
after ViL3DRel): they attend to the question's words (a small bidirectional encoder over the LLM's input
embeddings) and to each other with a pairwise-geometry bias weighted by the sentence, taking in the relative
geometry of what they attend to. The object logits are then scored from these per-question object states.
This is what answers relations ("left of the desk from the south", "between", "on top of") with a small LLM
(figures with and without: ``bench/learn_synthetic.py`` and the README).

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
``null_logits``        [B] or None           "no target" logit per sample (``null_object``), one softmax
                                             with the sample's object logits
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
from scene3d.tokenizer.relation import PAIR_DIM, pair_encoding


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
    #: text-conditioned spatial relation layers over the objects (0: off; see :class:`_RelationLayer`)
    relation_layers: int = 0
    #: width of the pairwise geometry embedding those layers share
    pair_hidden: int = 32
    #: bidirectional transformer layers that encode the question's words for the relation layers
    text_layers: int = 2
    #: longest question (tokens) the text encoder's learned positions cover
    max_words: int = 128
    #: a learned "no target" logit per question (``DecoderOutput.null_logits``) that competes with the
    #: object logits in one softmax: the decision "none, or which object" is then a comparison among the
    #: candidates (see :meth:`scene3d.models.referring.ReferringSegmenter._rank_loss`)
    null_object: bool = False
    #: superlative pair features for the relation layers (:func:`superlative_rank`): for objects i, j the soft
    #: rank of i's distance to j among the objects like i ("the chair closest to the desk"), with "like" a
    #: learned similarity of the object tokens (trained on same-class pairs where labels are known:
    #: ``ReferringConfig.sim_weight``). Needs ``relation_layers > 0``.
    rank_pairs: bool = False
    #: metres over which "nearer than" softens (sigmoid temperature of the rank)
    rank_softness: float = 0.1

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        for name in ("llm_dim", "point_dim", "obj_dim", "dim", "num_queries", "num_layers", "num_freqs",
                     "pair_hidden", "max_words"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("relation_layers", "text_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rank_pairs and not self.relation_layers:
            raise ValueError("rank_pairs feeds the relation layers: set relation_layers > 0 too")
        if not self.rank_softness > 0:
            raise ValueError(f"rank_softness must be positive, got {self.rank_softness}")


class DecoderOutput(NamedTuple):
    point_logits: torch.Tensor
    obj_logits: torch.Tensor
    query_point_logits: list
    #: the "no target" logit of each question (``[]`` for one question, ``[B]`` from :meth:`MaskDecoder.forward`);
    #: None unless ``config.null_object``
    null_logits: Optional[torch.Tensor] = None


class SceneEncoding(NamedTuple):
    """What the decoder's keys need of one scene (:meth:`MaskDecoder.encode_scene`); ``S`` is the number of
    superpoints (or points), ``M`` of objects."""

    pts: torch.Tensor  # [S, D] projected point/superpoint features
    pts_pos: torch.Tensor  # [S, D] their position encoding
    mask_key: torch.Tensor  # [S, D] pts + pts_pos: what mask embeddings are scored against
    inverse: Optional[torch.Tensor]  # [N] superpoint row of each point, None when S is the points
    obj: torch.Tensor  # [M, D] projected object tokens
    obj_pos: torch.Tensor  # [M, D] encoding of box center (scene-centred) and size
    obj_key: Optional[torch.Tensor]  # [M, D] what class embeddings are scored against (None: relation layers)
    pair: Optional[torch.Tensor] = None  # [M, M, pair_hidden] embedded pairwise geometry (relation layers)
    pair_values: tuple = ()  # per relation layer, [M * heads, M, dim / heads] (_RelationLayer.pair_values)


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

    def forward(self, q, obj_key, obj, pts, pts_pos):
        # q (B, Q, D) queries of B questions on one scene; obj_key / obj (1 or B, M, D): shared by the questions
        # or their own (relation layers); pts (1, S, D). Cross-attention to shared keys runs the B*Q queries
        # as one sequence. Empty key sets are skipped.
        b, nq, d = q.shape
        if obj.shape[1] and obj.shape[0] == 1:
            flat = q.reshape(1, b * nq, d)
            q = self.norms[0](q + self.obj_attn(flat, obj_key, obj, need_weights=False)[0].view(b, nq, d))
        elif obj.shape[1]:
            q = self.norms[0](q + self.obj_attn(q, obj_key, obj, need_weights=False)[0])
        if pts.shape[1]:
            flat = q.reshape(1, b * nq, d)
            q = self.norms[1](q + self.pt_attn(flat, pts + pts_pos, pts, need_weights=False)[0].view(b, nq, d))
        q = self.norms[2](q + self.self_attn(q, q, q, need_weights=False)[0])
        return self.norms[3](q + self.ffn(q))


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


class _TextEncoder(nn.Module):
    """Question word embeddings ``[B, T, H_llm]`` (+ padding mask ``[B, T]``, True at real words) -> word states
    ``[B, T, D]`` and a sentence state ``[B, D]`` (masked mean), bidirectional. The causal LLM's own states
    are not used here: a randomly initialised small LLM learns to route words too slowly (module docstring of
    :mod:`scene3d.models.referring`), and a few bidirectional layers over its word embeddings give the
    relation layers word roles (target noun vs. anchor noun) from the first steps."""

    def __init__(self, c: MaskDecoderConfig) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(c.llm_dim), nn.Linear(c.llm_dim, c.dim))
        self.pos = nn.Embedding(c.max_words, c.dim)
        layer = nn.TransformerEncoderLayer(c.dim, c.num_heads, 2 * c.dim, c.dropout, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, c.text_layers, enable_nested_tensor=False) if c.text_layers else None
        self.max_words = c.max_words

    def forward(self, words: torch.Tensor, mask: torch.Tensor):
        t = words.shape[1]
        if t > self.max_words:
            raise ValueError(f"question has {t} tokens; the decoder's text encoder covers max_words="
                             f"{self.max_words}")
        x = self.inp(words.float()) + self.pos.weight[:t]
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        return x, (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class _RelationLayer(nn.Module):
    """One text-conditioned spatial relation layer over the objects of one scene, for ``B`` questions.

    After ViL3DRel's language-conditioned spatial self-attention (Chen et al., NeurIPS 2022): every object
    (1) cross-attends to the question's words, then (2) attends to the other objects with attention logits
    ``q_i . k_j / sqrt(d) + g_h(sentence) . pair_ij`` — the pairwise geometry weighted by what the question
    asks for — and takes in, beside ``v_j``, an embedding of ``pair_ij`` itself, so an object that attends to
    the anchor learns where the anchor lies relative to it ("left of the desk", "between", "closest to");
    (3) an FFN. Post-norm residual blocks. ``o [B, M, D]``, ``words [B, T, D]``, ``pair [M, M, P]``."""

    def __init__(self, c: MaskDecoderConfig) -> None:
        super().__init__()
        self.heads, self.dh, self.p = c.num_heads, c.dim // c.num_heads, c.pair_hidden
        self.cross = nn.MultiheadAttention(c.dim, c.num_heads, dropout=c.dropout, batch_first=True)
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.gate = nn.Linear(c.dim, c.num_heads * c.pair_hidden)
        self.pair_value = nn.Linear(c.pair_hidden, c.dim)
        self.out = nn.Linear(c.dim, c.dim)
        self.ffn = nn.Sequential(nn.Linear(c.dim, 2 * c.dim), nn.GELU(), nn.Linear(2 * c.dim, c.dim))
        self.norms = nn.ModuleList(nn.LayerNorm(c.dim) for _ in range(3))

    def pair_values(self, pair: torch.Tensor) -> torch.Tensor:
        """What an attended pair adds to the values, laid out ``[M * h, M, dh]`` (row ``i * h + head``) for one
        batched matmul per layer: question-independent, so computed once per scene
        (:meth:`MaskDecoder.encode_scene`)."""
        m = pair.shape[0]
        pv = self.pair_value(pair).view(m, m, self.heads, self.dh)  # (i, j, h, dh)
        return pv.permute(0, 2, 1, 3).reshape(m * self.heads, m, self.dh)

    def forward(self, o, words, word_mask, sent, pair, pv):
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
        return self.norms[2](o + self.ffn(o))


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
        if not c.relation_layers:  # with relation layers the object logits come from rel_score instead
            self.cls_embed = nn.Sequential(nn.Linear(c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
            self.obj_out = nn.Linear(c.dim, c.dim)
        else:
            self.cls_embed = self.obj_out = None
        # Learnable log-scale of the mask and object logits (a temperature, as in CLIP), starting at 1. A fixed
        # 1/sqrt(dim) on top of normalised queries made the starting logits so small that the head sat on a
        # plateau: measured on a class-matching toy task, ~700 steps to learn at 1/sqrt(64), ~150 at 1.
        self.logit_scale = nn.Parameter(torch.zeros(()))
        if c.relation_layers:
            self.text_encoder = _TextEncoder(c)
            geo_dim = PAIR_DIM + 3 + (2 if c.rank_pairs else 0)
            self.pair_embed = nn.Sequential(nn.Linear(geo_dim, c.pair_hidden), nn.GELU(),
                                            nn.Linear(c.pair_hidden, c.pair_hidden))
            self.relation = nn.ModuleList(_RelationLayer(c) for _ in range(c.relation_layers))
            self.rel_score = nn.Sequential(nn.Linear(2 * c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, 1))
        else:
            self.text_encoder = self.pair_embed = self.relation = self.rel_score = None
        # "no target" logit from the question (sentence state, or the mean query without relation layers) and
        # the strongest object state (max-pooled), so it can compare what was asked for with what is there
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

    @property
    def needs_words(self) -> bool:
        """Whether :meth:`decode` needs the question's word embeddings (relation layers are on)."""
        return self.relation is not None

    def encode_scene(self, point_feat: torch.Tensor, coord: torch.Tensor, tokens: ObjectTokens,
                     superpoint: Optional[torch.Tensor] = None, obj_rows: slice = slice(None)) -> SceneEncoding:
        """The query-independent half of the decoder for one scene: projected (and superpoint-pooled) point
        features, object features and their position encodings. :meth:`predict` on one scene computes it
        once for all its questions; :meth:`forward` once per sample."""
        c = self.config
        if point_feat.shape[0] != coord.shape[0] or (superpoint is not None and superpoint.shape[0] != coord.shape[0]):
            raise ValueError("point_feat, coord and superpoint must have one row per point")
        if not torch.isfinite(coord).all():
            raise ValueError("coord holds NaN or inf")
        n = coord.shape[0]
        origin = coord.mean(0) if n else coord.new_zeros(3)
        pts, rel = self.point_proj(point_feat), coord - origin
        inverse = None
        if superpoint is not None and n:
            # pool to superpoints (native scatter_reduce mean); logits are broadcast back in decode()
            _, inverse = torch.unique(superpoint, return_inverse=True)
            s = int(inverse.max()) + 1
            idx = inverse.unsqueeze(1)
            pts = pts.new_zeros(s, c.dim).scatter_reduce(0, idx.expand(-1, c.dim), pts, "mean", include_self=False)
            rel = rel.new_zeros(s, 3).scatter_reduce(0, idx.expand(-1, 3), rel, "mean", include_self=False)
        center, size = tokens.center[obj_rows], tokens.size[obj_rows]
        obj = self.obj_proj(tokens.feat[obj_rows])
        obj_pos = self.obj_pos(torch.cat([center - origin, size], dim=1))  # (M, D)
        pts_pos = self.point_pos(rel)
        pair, pvs = None, ()
        if self.relation is not None:
            geo = pair_geometry(center.to(obj.dtype), size.to(obj.dtype))
            if self.sim_embed is not None:
                sim = torch.sigmoid(self.similarity_logits(obj))
                geo = torch.cat([geo, superlative_rank(center.detach().to(obj.dtype), sim, c.rank_softness)], -1)
            pair = self.pair_embed(geo)
            pvs = tuple(layer.pair_values(pair) for layer in self.relation)
        obj_key = self.obj_out(obj + obj_pos) if self.obj_out is not None else None
        return SceneEncoding(pts, pts_pos, pts + pts_pos, inverse, obj, obj_pos, obj_key, pair, pvs)

    def decode(self, seg_hidden: torch.Tensor, enc: SceneEncoding, words: Optional[torch.Tensor] = None,
               word_mask: Optional[torch.Tensor] = None) -> list:
        """Queries of ``B`` questions ``seg_hidden [B, H_llm]`` on one encoded scene -> one
        :class:`DecoderOutput` per question (``point_logits [N]``, ``obj_logits [M]``, ``query_point_logits
        [Q, N]``).

        Cross-attention treats every query row on its own, so the ``B x Q`` queries attend to the scene's keys
        as one sequence (the keys are projected once, not once per question); self-attention stays within
        each question's ``Q`` queries.

        With relation layers (``config.relation_layers > 0``) the question's word embeddings ``words [B, T,
        H_llm]`` (``word_mask [B, T]`` True at real tokens) are required: each question gets its own
        text-conditioned, relation-aware object states; the queries attend to those, and the object logits
        are scored from them (``rel_score``) instead of by the queries."""
        c = self.config
        b = seg_hidden.shape[0]
        q = self.seg_to_queries(seg_hidden).view(b, c.num_queries, c.dim) + self.query_embed  # (B, Q, D)
        scale = self.logit_scale.exp().clamp(max=100.0)
        obj_key, obj, rel_logits = (enc.obj + enc.obj_pos)[None], enc.obj[None], None
        if self.relation is not None:
            if words is None or word_mask is None or words.shape[0] != b or word_mask.shape != words.shape[:2]:
                raise ValueError("this decoder has relation layers: pass words [B, T, H] and word_mask [B, T] "
                                 f"for the B={b} questions")
            w, sent = self.text_encoder(words, word_mask)
            o = (enc.obj + enc.obj_pos).expand(b, -1, -1)  # (B, M, D)
            if o.shape[1]:
                for layer, pv in zip(self.relation, enc.pair_values):
                    o = layer(o, w, word_mask, sent, enc.pair, pv)
            obj_key = obj = o
            rel_logits = self.rel_score(torch.cat([o, sent[:, None].expand_as(o)], -1)).squeeze(-1)  # (B, M)
        for layer in self.layers:
            q = layer(q, obj_key, obj, enc.pts[None], enc.pts_pos[None])
        null = None
        if self.null_score is not None:
            ctx = sent if self.relation is not None else q.mean(1)  # (B, D)
            pooled = obj.max(1).values if obj.shape[1] else obj.new_zeros(b, c.dim)
            null = self.null_score(torch.cat([ctx, pooled.expand(b, -1)], -1)).squeeze(-1)  # (B,)
        qm = self.mask_embed(q) @ enc.mask_key.T * scale  # (B, Q, S)
        if enc.inverse is not None:
            qm = qm[:, :, enc.inverse]  # (B, Q, N)
        if rel_logits is None:
            ol = (self.cls_embed(q) @ enc.obj_key.T * scale)  # (B, Q, M)
            rel_logits = ol.max(1).values if ol.shape[2] else ol.new_zeros(b, 0)
        out = []
        for i in range(b):
            pl = qm[i].max(0).values if qm.shape[2] else qm.new_zeros(0)
            out.append(DecoderOutput(pl, rel_logits[i], qm[i], None if null is None else null[i]))
        return out

    def forward(self, seg_hidden: torch.Tensor, point_feat: torch.Tensor, coord: torch.Tensor,
                point_offset: torch.Tensor, tokens: ObjectTokens,
                superpoint: Optional[torch.Tensor] = None, words: Optional[torch.Tensor] = None,
                word_mask: Optional[torch.Tensor] = None) -> DecoderOutput:
        b = seg_hidden.shape[0]
        p_counts = counts_from_offset(point_offset)
        o_counts = tokens.obj_counts
        if len(p_counts) != b or len(o_counts) != b:
            raise ValueError(f"seg_hidden has {b} samples but point_offset has {len(p_counts)} scenes and "
                             f"obj_offset {len(o_counts)}")
        point_logits, obj_logits, per_query, nulls = [], [], [], []
        p0 = o0 = 0
        for i in range(b):
            p1, o1 = p0 + int(p_counts[i]), o0 + int(o_counts[i])
            enc = self.encode_scene(point_feat[p0:p1], coord[p0:p1], tokens,
                                    None if superpoint is None else superpoint[p0:p1], slice(o0, o1))
            w = None if words is None else words[i : i + 1]
            wm = None if word_mask is None else word_mask[i : i + 1]
            (pl, ol, qm, nl), = self.decode(seg_hidden[i : i + 1], enc, w, wm)
            nulls.append(nl)
            point_logits.append(pl)
            obj_logits.append(ol)
            per_query.append(qm)
            p0, o0 = p1, o1
        null = torch.stack(nulls) if self.null_score is not None and nulls else None
        return DecoderOutput(torch.cat(point_logits), torch.cat(obj_logits), per_query, null)
