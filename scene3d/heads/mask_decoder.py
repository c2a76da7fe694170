"""Mask decoder after PLM's geometric reactivation decoder: the ``[SEG]`` state re-attends to geometry.

Two parts, each in its own module:

* the grounding head (:mod:`scene3d.heads.grounding`): the LLM's states at the question's words and at
  ``[SEG]`` condition text-aware spatial relation layers over the object tokens; it scores the objects and
  "no target";
* the mask head (this module): the ``[SEG]`` state becomes ``num_queries`` queries. Each layer lets the
  queries (1) cross-attend to the grounded, per-question object states, (2) cross-attend to dense per-point —
  or per-superpoint — features with a Fourier encoding of their coordinates ("reactivating" the geometry the
  LLM only saw through pooled object tokens), (3) self-attend, then (4) pass an FFN. Mask logits are dot
  products of the queries' mask embeddings with the dense features. The union over queries (max) gives one
  mask per question, so zero, one or many targets come out of the same head.

Coordinates are centred on each scene's point mean before encoding, so the encoding is translation invariant.

=====================  ====================  ==========================================================
input                  shape                 meaning
=====================  ====================  ==========================================================
``seg``                [B, H_llm]            LLM state at the ``[SEG]`` position of each question
``words``              [B, T, H_llm]         LLM states at each question's text tokens, ``word_mask [B, T]``
``point_feat``         [N, C_pt]             dense backbone features of all points
``coord``              [N, 3]                point coordinates
``point_offset``       [B] int64             cumulative point counts
``tokens``             ObjectTokens          ``feat [M, C_obj]``, ``center``, ``size``, ``obj_offset``
``superpoint``         [N] int64 or None     superpoint id of each point, local to its scene
output                 shape
``point_logits``       [N]                   union-mask logit per point (ragged like the points)
``obj_logits``         [M]                   target logit per object (ragged like ``obj_offset``)
``query_point_logits`` list of [Q, N_b]      per-query mask logits of each scene
``null_logits``        [B] or None           "no target" logit per question (``null_object``)
``anchor_attention``   list of [L, M_b, M_b]  the grounding head's anchor-head attention per question (or None)
=====================  ====================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from scene3d.heads.grounding import FourierEncoding, GroundingHead, ObjectEncoding
from scene3d.structures.objects import ObjectTokens
from scene3d.structures.ragged import counts_from_offset


@dataclass
class MaskDecoderConfig:
    """The grounding head and the mask head. The defaults are the shipped values (``configs/head/mask_decoder.yaml``)."""

    llm_dim: int = 128  # set by the model from the LLM
    point_dim: int = 32  # set by the model from the 3D tokenizer
    obj_dim: int = 32  # set by the model from the 3D tokenizer
    dim: int = 128
    num_queries: int = 4
    num_layers: int = 2
    num_heads: int = 4
    num_freqs: int = 8
    #: Largest scene extent (m) the lowest Fourier frequency resolves without wrapping.
    coord_scale: float = 16.0
    dropout: float = 0.0
    #: text-conditioned spatial relation layers over the objects (:class:`scene3d.heads.grounding.RelationLayer`)
    relation_layers: int = 2
    #: width of the pairwise geometry embedding those layers share
    pair_hidden: int = 32
    #: a learned "no target" logit per question that competes with the object logits in one softmax
    #: (:func:`scene3d.models.losses.rank_loss`)
    null_object: bool = True
    #: superlative pair features (:func:`scene3d.heads.grounding.superlative_rank`): for objects i, j the soft
    #: rank of i's distance to j among the objects like i ("the chair closest to the desk"), with "like" a
    #: learned similarity of the object tokens (trained on same-class pairs: ``ReferringConfig.sim_weight``)
    rank_pairs: bool = True
    #: metres over which "nearer than" softens (sigmoid temperature of the rank)
    rank_softness: float = 0.1
    #: the grounding head's object features also read the LLM's last-layer state at each object's token
    #: (:meth:`scene3d.heads.grounding.GroundingHead.encode_objects`): with object names in the prompt
    #: (``ReferringConfig.object_labels``) that state has read the object's name, which the 3D token of a scan
    #: never seen in training may not show; objects left out of the prompt get a zero state
    object_states: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        for name in ("llm_dim", "point_dim", "obj_dim", "dim", "num_queries", "num_layers", "num_freqs",
                     "pair_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.relation_layers < 0:
            raise ValueError(f"relation_layers must be >= 0, got {self.relation_layers}")
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
    #: per question, the attention ``[L, M, M]`` of the grounding head's anchor head (head 0 of each relation
    #: layer; ``scene3d.models.losses.anchor_loss``); None without relation layers
    anchor_attention: Optional[list] = None


class SceneEncoding(NamedTuple):
    """What the decoder's keys need of one scene (:meth:`MaskDecoder.encode_scene`); ``S`` is the number of
    superpoints (or points)."""

    pts: torch.Tensor  # [S, D] projected point/superpoint features
    pts_pos: torch.Tensor  # [S, D] their position encoding
    mask_key: torch.Tensor  # [S, D] pts + pts_pos: what mask embeddings are scored against
    inverse: Optional[torch.Tensor]  # [N] superpoint row of each point, None when S is the points
    objects: ObjectEncoding  # the grounding head's half


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.obj_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.pt_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, q, obj, pts, pts_pos):
        # q (B, Q, D) queries of B questions on one scene; obj (B, M, D) their grounded object states; pts
        # (1, S, D) shared: cross-attention to shared keys runs the B*Q queries as one sequence. Empty key sets
        # are skipped.
        b, nq, d = q.shape
        if obj.shape[1]:
            q = self.norms[0](q + self.obj_attn(q, obj, obj, need_weights=False)[0])
        if pts.shape[1]:
            flat = q.reshape(1, b * nq, d)
            q = self.norms[1](q + self.pt_attn(flat, pts + pts_pos, pts, need_weights=False)[0].view(b, nq, d))
        q = self.norms[2](q + self.self_attn(q, q, q, need_weights=False)[0])
        return self.norms[3](q + self.ffn(q))


class MaskDecoder(nn.Module):
    """See the module docstring for the inputs and outputs."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        c = self.config = config
        self.grounding = GroundingHead(c)
        self.seg_in = nn.LayerNorm(c.llm_dim)
        self.seg_to_queries = nn.Linear(c.llm_dim, c.num_queries * c.dim)
        self.query_embed = nn.Parameter(torch.randn(c.num_queries, c.dim) * 0.02)
        self.point_proj = nn.Sequential(nn.Linear(c.point_dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        self.point_pos = FourierEncoding(c.num_freqs, c.coord_scale, c.dim)
        self.layers = nn.ModuleList(_Layer(c.dim, c.num_heads, c.dropout) for _ in range(c.num_layers))
        self.mask_embed = nn.Sequential(nn.Linear(c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        # Learnable log-scale of the mask logits (a temperature, as in CLIP), starting at 1. A fixed
        # 1/sqrt(dim) on top of normalised queries made the starting logits so small that the head sat on a
        # plateau: measured on a class-matching toy task, ~700 steps to learn at 1/sqrt(64), ~150 at 1.
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def encode_scene(self, point_feat: torch.Tensor, coord: torch.Tensor, tokens: ObjectTokens,
                     superpoint: Optional[torch.Tensor] = None, obj_rows: slice = slice(None),
                     obj_states: Optional[torch.Tensor] = None) -> SceneEncoding:
        """The question-independent half of the decoder for one scene: projected (and superpoint-pooled) point
        features, object features, their position encodings and pair geometry. Computed once per scene for all
        its questions. ``obj_states [M, H_llm]``: the LLM's states at the object tokens (``object_states``)."""
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
        objects = self.grounding.encode_objects(tokens.feat[obj_rows], tokens.center[obj_rows],
                                                tokens.size[obj_rows], origin, obj_states)
        pts_pos = self.point_pos(rel)
        return SceneEncoding(pts, pts_pos, pts + pts_pos, inverse, objects)

    def decode(self, seg: torch.Tensor, enc: SceneEncoding, words: torch.Tensor, word_mask: torch.Tensor) -> list:
        """``B`` questions (``seg [B, H_llm]``, ``words [B, T, H_llm]``, ``word_mask [B, T]``) on one encoded
        scene -> one :class:`DecoderOutput` per question (``point_logits [N]``, ``obj_logits [M]``,
        ``query_point_logits [Q, N]``, ``null_logits []``)."""
        c = self.config
        b = seg.shape[0]
        g = self.grounding(enc.objects, seg, words, word_mask)
        q = self.seg_to_queries(self.seg_in(seg.float())).view(b, c.num_queries, c.dim) + self.query_embed
        for layer in self.layers:
            q = layer(q, g.objects, enc.pts[None], enc.pts_pos[None])
        qm = self.mask_embed(q) @ enc.mask_key.T * self.logit_scale.exp().clamp(max=100.0)  # (B, Q, S)
        if enc.inverse is not None:
            qm = qm[:, :, enc.inverse]  # (B, Q, N)
        out = []
        for i in range(b):
            pl = qm[i].max(0).values if qm.shape[2] else qm.new_zeros(0)
            out.append(DecoderOutput(pl, g.obj_logits[i], qm[i], None if g.null_logits is None else g.null_logits[i],
                                     None if g.anchor_attention is None else g.anchor_attention[i]))
        return out

    def forward(self, seg: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, point_feat: torch.Tensor,
                coord: torch.Tensor, point_offset: torch.Tensor, tokens: ObjectTokens,
                superpoint: Optional[torch.Tensor] = None) -> DecoderOutput:
        """Question ``b`` on scene ``b`` of a ragged batch (each scene encoded on its own)."""
        b = seg.shape[0]
        p_counts = counts_from_offset(point_offset)
        o_counts = tokens.obj_counts
        if len(p_counts) != b or len(o_counts) != b:
            raise ValueError(f"seg has {b} questions but point_offset has {len(p_counts)} scenes and "
                             f"obj_offset {len(o_counts)}")
        outs = []
        p0 = o0 = 0
        for i in range(b):
            p1, o1 = p0 + int(p_counts[i]), o0 + int(o_counts[i])
            enc = self.encode_scene(point_feat[p0:p1], coord[p0:p1], tokens,
                                    None if superpoint is None else superpoint[p0:p1], slice(o0, o1))
            outs.extend(self.decode(seg[i : i + 1], enc, words[i : i + 1], word_mask[i : i + 1]))
            p0, o0 = p1, o1
        return stack_outputs(outs)


def stack_outputs(outs: list) -> DecoderOutput:
    """Per-question outputs laid out as one ragged :class:`DecoderOutput` (``null_logits [B]``)."""
    null = torch.stack([o.null_logits for o in outs]) if outs and outs[0].null_logits is not None else None
    att = [o.anchor_attention for o in outs] if outs and outs[0].anchor_attention is not None else None
    return DecoderOutput(torch.cat([o.point_logits for o in outs]), torch.cat([o.obj_logits for o in outs]),
                         [o.query_point_logits for o in outs], null, att)
