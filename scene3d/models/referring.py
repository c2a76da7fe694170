"""ReferringSegmenter: the one place where object tokens, gating, the LLM and the mask decoder meet.

Data flow of one sample (shapes for one scene with ``M`` objects, ``N`` points, LLM width ``H``)::

    ObjectTokens feat [M, C] --(optional gate(tokens, query_emb) -> kept rows + gated feat)--> [M', C]
        --projector(feat, center, size)--> [M', H] spliced at the <obj_feat> positions of
    "system ... <OBJs> <obj_feat> ... user ... <text> assistant : <OBJa> <OBJb> [SEG]"
        --LLM (frozen + LoRA; the tiny model trains whole)--> logits [L, V] (LM loss on the answer only),
          hidden at [SEG] [H] (+ projected mean embedding of the text's words when ``text_query``)
        --MaskDecoder(points, objects; the question's word embeddings when it has relation layers)-->
          point logits [N] (BCE + Dice), object logits [M] (weighted BCE + softmax CE on single-target samples)

Losses (:class:`ReferringLoss`): LM cross-entropy over answer tokens; mask BCE (mean over points) + Dice
(per scene, smoothed so zero-target scenes push the mask to empty); per-object target BCE where *hard
negatives* — objects of a target's class that are not targets (when ``object_class`` is given) and Sr3D
``distractors`` — weigh ``hard_negative_weight`` instead of 1; ``obj_rank``: softmax cross-entropy over a
sample's objects when it has exactly one target, or — when the decoder has a "no target" logit
(``MaskDecoderConfig.null_object``) — over the objects and the null for every sample (``rank_weight``; see
:meth:`ReferringSegmenter._rank_loss`); ``obj_sim``: with superlative pair features in the decoder
(``MaskDecoderConfig.rank_pairs``), BCE of its object similarity against "same class" where ``object_class``
is given (``sim_weight``).
Samples that share a scene (``ReferringBatch.shared``) have the decoder encode it once.

Inference (:meth:`ReferringSegmenter.predict`) returns, per query, the decoder mask, the mask of the
identifiers the answer names, and a reconciled result. Reconciliation rule (``reconcile="identifiers"``, the
default): the objects are the ones whose identifiers the answer names (identifiers map back to objects
exactly); when the answer names none, the decoder's objects are taken instead (:meth:`select_objects`: those
scored ``>= threshold``; with a "no target" logit, nothing when the null wins the softmax, else the best
object and any over the threshold); ``reconcile="decoder"`` asks the decoder first and the answer second
(a decoder with a "no target" logit decides alone: its "none" is final). When neither gives any object the
result is empty (zero targets). The reconciled point mask is the union of the chosen objects' points (instance
masks are exact where the dense head is smooth); the raw decoder mask is returned beside it. The texts of
one scene are answered as a batch (one LLM call per greedy step for all of them); with the scene cache the
prefix is encoded once and the questions are packed behind it (see :meth:`ReferringSegmenter.predict`).

Gating is pluggable: any callable ``gate(tokens, query_embedding [B, H]) -> GateSelection`` (an ``nn.Module``
is registered, so its scorer trains and is checkpointed). The query embedding is the mean input embedding of
the question tokens. Because a query-conditioned gate changes the scene prefix per query, the scene cache
(:mod:`scene3d.models.cache`) is only used without a gate.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scene3d.constants import IGNORE_INDEX
from scene3d.gating.adapter import GateFn, GateSelection  # noqa: F401  (GateSelection: re-exported)
from scene3d.heads.mask_decoder import DecoderOutput, MaskDecoder, MaskDecoderConfig
from scene3d.llm.loader import IdentifierLM, LLMConfig, load_llm
from scene3d.llm.prompt import (IdentifierVocab, PromptConfig, ScenePrompt, build_prefix, build_prompt,
                                build_query, identifier_permutation, parse_answer, resolve_prompt, text_token_ids,
                                select_objects)
from scene3d.structures.objects import ObjectTokens
from scene3d.structures.points import PointBatch
from scene3d.structures.ragged import counts_from_offset


# ---------------------------------------------------------------------------------------------- config
@dataclass
class ReferringConfig:
    """Everything that builds a :class:`ReferringSegmenter` (saved as json beside checkpoints)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    obj_dim: int = 32  # C of ObjectTokens.feat
    point_dim: int = 32  # C of the dense point features
    projector_hidden: int = 256
    overflow: str = "error"  # more objects than identifiers: "error" or "topk" (most points kept)
    shuffle_identifiers: bool = True  # in training mode only; evaluation uses the identity
    lm_weight: float = 1.0
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    obj_weight: float = 1.0
    hard_negative_weight: float = 3.0
    rank_weight: float = 1.0  # softmax cross-entropy over the objects of single-target samples (_rank_loss)
    #: BCE of the decoder's object similarity (``MaskDecoderConfig.rank_pairs``) against "same class", on
    #: samples whose object classes are known (``_similarity_loss``)
    sim_weight: float = 0.5
    threshold: float = 0.5
    #: which path leads the reconciled result: "identifiers" (the objects the answer names; the decoder's
    #: objects when it names none) or "decoder" (the decoder's objects, :meth:`ReferringSegmenter.select_objects`;
    #: the named ones when it picks none — unless the decoder has a "no target" logit, whose "none" is final).
    #: "decoder" suits a small LLM that names identifiers less reliably than the relation-aware decoder scores
    #: objects.
    reconcile: str = "identifiers"
    max_new_tokens: int = 16
    predict_batch_size: int = 16  # texts of one scene that predict answers as one batch
    #: condition the mask decoder on the referring text's words too (mean input embedding, layer-normed and
    #: projected), not only on the [SEG] state: a randomly initialised LLM learns only slowly to route the
    #: words into [SEG] (synthetic benchmark, 6 CPU-minutes: decoder-only mIoU 0.05 without, 0.24 with)
    text_query: bool = True

    def __post_init__(self) -> None:
        for name, cls in (("llm", LLMConfig), ("decoder", MaskDecoderConfig), ("prompt", PromptConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if self.overflow not in ("error", "topk"):
            raise ValueError(f"overflow must be 'error' or 'topk', got {self.overflow!r}")
        if self.predict_batch_size < 1:
            raise ValueError(f"predict_batch_size must be >= 1, got {self.predict_batch_size}")
        if self.reconcile not in ("identifiers", "decoder"):
            raise ValueError(f"reconcile must be 'identifiers' or 'decoder', got {self.reconcile!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReferringConfig":
        return cls(**d)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class SceneInputs:
    """A ragged batch of scenes: object tokens, dense point features ``[N, C_pt]`` and the points."""

    tokens: ObjectTokens
    point_feat: torch.Tensor
    points: PointBatch

    def __post_init__(self) -> None:
        if self.point_feat.dim() != 2 or self.point_feat.shape[0] != self.points.coord.shape[0]:
            raise ValueError(f"point_feat must be [N={self.points.coord.shape[0]}, C], got {tuple(self.point_feat.shape)}")
        if self.tokens.point2obj.shape[0] != self.points.coord.shape[0]:
            raise ValueError("tokens.point2obj must have one entry per point")
        if self.tokens.batch_size != len(counts_from_offset(self.points.offset)):
            raise ValueError(f"{self.tokens.batch_size} scenes of objects but "
                             f"{len(self.points.offset)} scenes of points")

    @property
    def batch_size(self) -> int:
        return self.tokens.batch_size

    def take(self, index: Sequence[int]) -> "SceneInputs":
        """The scenes ``index`` (repeats allowed) as a new ragged batch, in that order: one row per question
        when several questions share a scene. Built from slices and ``cat``, so gradients flow back into the
        one shared encoding of each scene."""
        if not len(index):
            raise ValueError("take() needs at least one scene index")
        bad = [i for i in index if not 0 <= int(i) < self.batch_size]
        if bad:
            raise ValueError(f"scene indices {bad[:5]} out of range for {self.batch_size} scenes")
        one = {int(i): self.scene(int(i)) for i in set(index)}
        parts = [one[int(i)] for i in index]
        toks = [p.tokens for p in parts]
        o_counts = torch.tensor([t.num_objects for t in toks])
        start = torch.cumsum(o_counts, 0) - o_counts
        p2o = torch.cat([torch.where(t.point2obj >= 0, t.point2obj + int(s0), t.point2obj)
                         for t, s0 in zip(toks, start)])
        ids = None if any(t.object_ids is None for t in toks) else torch.cat([t.object_ids for t in toks])
        tokens = ObjectTokens(torch.cat([t.feat for t in toks]), torch.cat([t.center for t in toks]),
                              torch.cat([t.size for t in toks]), torch.cumsum(o_counts, 0).to(toks[0].obj_offset),
                              p2o, ids)
        sids = [sid for p in parts for sid in p.points.scene_ids] if all(p.points.scene_ids for p in parts) else []
        points = PointBatch.from_list([p.points.split()[0] for p in parts], scene_ids=sids)
        return SceneInputs(tokens, torch.cat([p.point_feat for p in parts]), points)

    def scene(self, b: int) -> "SceneInputs":
        """Scene ``b`` alone (rows re-based)."""
        o = torch.cat([self.tokens.obj_offset.new_zeros(1), self.tokens.obj_offset])
        p = torch.cat([self.points.offset.new_zeros(1), self.points.offset])
        o0, o1, p0, p1 = int(o[b]), int(o[b + 1]), int(p[b]), int(p[b + 1])
        p2o = self.tokens.point2obj[p0:p1]
        t = self.tokens
        tokens = ObjectTokens(t.feat[o0:o1], t.center[o0:o1], t.size[o0:o1], t.obj_offset.new_tensor([o1 - o0]),
                              torch.where(p2o >= 0, p2o - o0, p2o),
                              None if t.object_ids is None else t.object_ids[o0:o1])
        pb = self.points
        fields = {k: (getattr(pb, k)[p0:p1] if getattr(pb, k) is not None else None)
                  for k in ("coord", "color", "normal", "superpoint", "segment", "instance")}
        points = PointBatch(offset=pb.offset.new_tensor([p1 - p0]),
                            scene_ids=list(pb.scene_ids[b : b + 1]) if pb.scene_ids else [], **fields)
        return SceneInputs(tokens, self.point_feat[p0:p1], points)


@dataclass
class ReferringBatch:
    """``B`` samples, sample ``b`` on scene ``b`` of ``scene``.

    ``targets[b]`` / ``distractors[b]`` are source object ids (matched against ``tokens.object_ids``);
    ``object_class [M]`` (optional) gives same-class hard negatives; ``seeds[b]`` (optional) seeds the
    identifier shuffle of sample ``b`` in training. When several samples share a scene, ``shared`` (the
    distinct scenes) and ``scene_index`` (the scene of each sample; ``scene == shared.take(scene_index)``)
    let the mask decoder encode each scene once and decode its questions together, as :meth:`predict` does.
    """

    scene: SceneInputs
    texts: list
    targets: list
    distractors: Optional[list] = None
    object_class: Optional[torch.Tensor] = None
    seeds: Optional[list] = None
    shared: Optional[SceneInputs] = None
    scene_index: Optional[list] = None

    def __post_init__(self) -> None:
        b = self.scene.batch_size
        for name in ("texts", "targets", "distractors", "seeds"):
            v = getattr(self, name)
            if v is not None and len(v) != b:
                raise ValueError(f"{name} has {len(v)} entries for {b} scenes")
        if self.object_class is not None and self.object_class.shape != (self.scene.tokens.num_objects,):
            raise ValueError(f"object_class must be [{self.scene.tokens.num_objects}]")
        if (self.shared is None) != (self.scene_index is None):
            raise ValueError("shared and scene_index go together")
        if self.scene_index is not None and len(self.scene_index) != b:
            raise ValueError(f"scene_index has {len(self.scene_index)} entries for {b} samples")


class ReferringLoss(NamedTuple):
    total: torch.Tensor
    lm: torch.Tensor
    mask_bce: torch.Tensor
    mask_dice: torch.Tensor
    obj: torch.Tensor
    obj_rank: torch.Tensor
    obj_sim: torch.Tensor


class ModelInputs(NamedTuple):
    """Padded LLM inputs of a batch: embeds ``[B, L, H]``, mask ``[B, L]``, labels ``[B, L]``, ``seg_pos [B]``."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    seg_pos: torch.Tensor
    prompts: list


class Prediction(NamedTuple):
    """One query's result on one scene (local object indices; masks over the scene's ``N`` points)."""

    point_mask: torch.Tensor  # [N] bool, reconciled
    objects: torch.Tensor  # [T] long, reconciled local object indices (may be empty)
    object_ids: torch.Tensor  # [T] long, their source ids (-1 where unknown)
    decoder_mask: torch.Tensor  # [N] bool
    identifier_mask: torch.Tensor  # [N] bool
    obj_scores: torch.Tensor  # [M] float, sigmoid of the decoder's object logits
    answer_ids: list  # generated token ids (ends with [SEG])
    identifiers: list  # identifiers named in the answer
    source: str  # "identifiers", "decoder" or "none"
    #: [L] long, local rows of the objects left out of the LLM prompt (more objects than identifiers,
    #: ``overflow="topk"``): the answer cannot name them; the decoder still scores them
    left_out: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------- model
class ReferringSegmenter(nn.Module):
    """See the module docstring. ``lm`` may be passed in (already loaded) to share one across models."""

    def __init__(self, config: ReferringConfig, gate: Optional[GateFn] = None,
                 lm: Optional[IdentifierLM] = None) -> None:
        super().__init__()
        self.lm = lm if lm is not None else load_llm(config.llm)
        self.vocab = IdentifierVocab.from_lm(self.lm)
        h = self.lm.hidden_size
        # the decoder's widths follow the LLM and the inputs (a resolved copy; the caller's config is untouched)
        config = dataclasses.replace(config, decoder=dataclasses.replace(
            config.decoder, llm_dim=h, point_dim=config.point_dim, obj_dim=config.obj_dim),
            prompt=resolve_prompt(config.prompt, self.lm.tokenizer))
        if config.decoder.relation_layers and config.decoder.max_words < config.prompt.max_text_tokens:
            raise ValueError(f"decoder.max_words={config.decoder.max_words} is below prompt.max_text_tokens="
                             f"{config.prompt.max_text_tokens}: the decoder could not read a text the prompt keeps")
        self.config = config
        self.projector = nn.Sequential(nn.Linear(config.obj_dim + 6, config.projector_hidden), nn.GELU(),
                                       nn.Linear(config.projector_hidden, h))
        self.decoder = MaskDecoder(config.decoder)
        # LayerNorm first: word embeddings of a small model are ~50x smaller than the normalised [SEG] state
        self.text_proj = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h)) if config.text_query else None
        self.gate = gate  # an nn.Module gate is registered as a submodule by nn.Module.__setattr__

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    # -- planning: which objects, which identifiers, which features ----------------------------------
    def _keep(self, scene: SceneInputs, b: int, kept_rows: Optional[torch.Tensor]) -> torch.Tensor:
        t = scene.tokens
        o0 = int(t.obj_offset[b - 1]) if b else 0
        m = int(t.obj_counts[b])
        keep = torch.arange(m) if kept_rows is None else kept_rows[(kept_rows >= o0) & (kept_rows < o0 + m)] - o0
        k = self.vocab.num_identifiers
        if keep.numel() > k:
            if self.config.overflow == "error":
                raise ValueError(f"scene {b} has {keep.numel()} objects for {k} identifiers; raise "
                                 "llm.num_obj_tokens or set overflow='topk'")
            p2o = t.point2obj
            npts = torch.bincount(p2o[p2o >= 0], minlength=t.num_objects)[o0 : o0 + m].cpu()
            keep = keep[select_objects(keep.numel(), k, npts[keep])]
        return keep.cpu()

    def _gate(self, scene: SceneInputs, texts: Sequence[str]):
        """Run the gate (if any): (kept global rows or None, feature table [M, C] with gated rows)."""
        feat = scene.tokens.feat
        if self.gate is None:
            return None, feat
        qe = self._mean_embeddings([build_query(self.tokenizer, t, self.config.prompt) for t in texts])  # (B, H)
        sel = self.gate(scene.tokens, qe)
        kept = sel.kept_index.long()
        if sel.feat.shape != (kept.numel(), feat.shape[1]):
            raise ValueError(f"gate returned feat {tuple(sel.feat.shape)} for {kept.numel()} kept rows")
        return kept.cpu(), feat.index_put((kept,), sel.feat.to(feat.dtype))

    def _object_embeds(self, scene: SceneInputs, feat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Projected object tokens ``[P, H]`` of global ``rows``."""
        t = scene.tokens
        rows = rows.to(feat.device)
        x = torch.cat([feat[rows], t.center[rows].to(feat.dtype), t.size[rows].to(feat.dtype)], dim=1)
        return self.projector(x).to(self.lm.new_embed.weight.dtype)

    def _embed_prompt(self, scene: SceneInputs, b: int, prompt: ScenePrompt, feat: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[L, H]`` with object tokens spliced at the placeholders (``get_input_embeddings``
        under :meth:`IdentifierLM.embed`)."""
        o0 = int(scene.tokens.obj_offset[b - 1]) if b else 0
        dev = feat.device
        emb = self.lm.embed(prompt.input_ids.to(dev)[None])[0]  # (L, H)
        obj = self._object_embeds(scene, feat, prompt.placeholder_obj + o0)  # (P, H)
        return emb.index_put((prompt.placeholder_pos.to(dev),), obj)

    def _local_targets(self, scene: SceneInputs, b: int, ids: Sequence[int], what: str) -> torch.Tensor:
        t = scene.tokens
        if t.object_ids is None:
            raise ValueError("tokens.object_ids is needed to match target / distractor object ids")
        o0 = int(t.obj_offset[b - 1]) if b else 0
        scene_ids = t.object_ids[o0 : o0 + int(t.obj_counts[b])].tolist()
        out = []
        for i in ids:
            if int(i) not in scene_ids:
                raise ValueError(f"sample {b}: {what} object id {i} is not among the scene's object ids")
            out.append(scene_ids.index(int(i)))
        return torch.tensor(sorted(set(out)), dtype=torch.long)

    def build_inputs(self, batch: ReferringBatch) -> ModelInputs:
        """Tokenize, shuffle identifiers (training), splice object tokens and pad (right) the batch."""
        scene = batch.scene
        kept, feat = self._gate(scene, batch.texts)
        shuffle = self.training and self.config.shuffle_identifiers
        embeds, prompts = [], []
        for b in range(scene.batch_size):
            seed = None
            if shuffle:
                seed = int(batch.seeds[b]) if batch.seeds is not None else int(torch.randint(0, 2**31 - 1, ()))
            targets = self._local_targets(scene, b, batch.targets[b], "target").tolist()
            prompt = build_prompt(self.tokenizer, self.vocab, int(scene.tokens.obj_counts[b]), batch.texts[b],
                                  targets, seed=seed, keep=self._keep(scene, b, kept), config=self.config.prompt)
            prompts.append(prompt)
            embeds.append(self._embed_prompt(scene, b, prompt, feat))
        lmax = max(e.shape[0] for e in embeds)
        h = embeds[0].shape[1]
        dev = embeds[0].device
        x = embeds[0].new_zeros(len(embeds), lmax, h)
        mask = torch.zeros(len(embeds), lmax, dtype=torch.long, device=dev)
        labels = torch.full((len(embeds), lmax), IGNORE_INDEX, dtype=torch.long, device=dev)
        for b, (e, p) in enumerate(zip(embeds, prompts)):
            x = x.index_put((torch.tensor(b, device=dev), torch.arange(e.shape[0], device=dev)), e)
            mask[b, : e.shape[0]] = 1
            labels[b, : e.shape[0]] = p.labels.to(dev)
        seg = torch.tensor([p.seg_pos for p in prompts], device=dev)
        return ModelInputs(x, mask, labels, seg, prompts)

    def _decoder_query(self, seg_hidden: torch.Tensor, texts: Sequence[str]):
        """What the mask decoder is conditioned on: ``(query [B, H], words [B, T, H] or None, word_mask [B, T] or
        None)`` — the ``[SEG]`` state, plus (``text_query``) a projection of the mean input embedding of each
        referring text's own words; the words themselves when the decoder has relation layers."""
        q = seg_hidden.float()
        if self.text_proj is None and not self.decoder.needs_words:
            return q, None, None
        cap = self.config.prompt.max_text_tokens  # the same cut as the prompt's (build_query), warned there
        ids = [torch.tensor(text_token_ids(self.tokenizer, t, cap, warn=False).ids, dtype=torch.long) for t in texts]
        for t, i in zip(texts, ids):
            if not i.numel():
                raise ValueError(f"referring text {t!r} has no tokens")
        dev = self.lm.new_embed.weight.device
        lens = torch.tensor([i.numel() for i in ids], device=dev)
        padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True).to(dev)  # (B, T), pad id 0 is masked
        mask = torch.arange(padded.shape[1], device=dev) < lens[:, None]  # (B, T)
        words = self.lm.embed(padded)  # (B, T, H)
        if self.text_proj is not None:
            mean = (words * mask[..., None]).sum(1) / lens[:, None]
            q = q + self.text_proj(mean.float())
        return (q, words, mask) if self.decoder.needs_words else (q, None, None)

    def _mean_embeddings(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean input embedding ``[B, H]`` of each of ``B`` token-id sequences."""
        dev = self.lm.new_embed.weight.device
        return torch.stack([self.lm.embed(i.to(dev)[None])[0].mean(0) for i in ids])

    # -- training ------------------------------------------------------------------------------------
    def forward(self, batch: ReferringBatch) -> ReferringLoss:
        c = self.config
        scene = batch.scene
        inp = self.build_inputs(batch)
        # logits only where the LM loss needs them (the answer's tokens, predicted from the position before
        # each): with a 49k vocabulary the head over every prompt position would cost more than the layers
        at, target = _loss_positions(inp.labels)  # (B, K), (B, K)
        out = self.lm(inp.inputs_embeds, attention_mask=inp.attention_mask, logits_at=at)
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX)
        seg_hidden = out.hidden[torch.arange(len(inp.prompts)), inp.seg_pos]  # (B, H)
        query, words, word_mask = self._decoder_query(seg_hidden, batch.texts)
        if batch.shared is None:
            dec = self.decoder(query, scene.point_feat, scene.points.coord, scene.points.offset, scene.tokens,
                               scene.points.superpoint, words, word_mask)
        else:
            dec = self._decode_shared(batch.shared, batch.scene_index, query, words, word_mask)
        gt_point, obj_label, obj_weight = self._targets(batch)
        bce = F.binary_cross_entropy_with_logits(dec.point_logits, gt_point)
        dice = _dice_loss(dec.point_logits, gt_point, scene.points.offset)
        obj = (F.binary_cross_entropy_with_logits(dec.obj_logits, obj_label, reduction="none") * obj_weight).sum() \
            / obj_weight.sum().clamp_min(1e-6)
        rank = self._rank_loss(dec.obj_logits, obj_label, scene.tokens.obj_offset, dec.null_logits)
        sim = self._similarity_loss(batch)
        total = (c.lm_weight * lm_loss + c.bce_weight * bce + c.dice_weight * dice + c.obj_weight * obj
                 + c.rank_weight * rank + c.sim_weight * sim)
        return ReferringLoss(total, lm_loss, bce, dice, obj, rank, sim)

    def _similarity_loss(self, batch: ReferringBatch) -> torch.Tensor:
        """BCE of the decoder's object-similarity logits against "same class" over the ordered pairs of distinct
        objects of each sample's scene, mean over samples with >= 2 objects; 0 without ``rank_pairs`` or without
        ``object_class``."""
        t = batch.scene.tokens
        if self.decoder.sim_embed is None or batch.object_class is None:
            return t.feat.sum() * 0.0
        obj = self.decoder.obj_proj(t.feat)
        cls = batch.object_class.to(obj.device)
        terms = []
        for b, m in enumerate(t.obj_counts.tolist()):
            o0 = int(t.obj_offset[b - 1]) if b else 0
            if m < 2:
                continue
            off = ~torch.eye(m, dtype=torch.bool, device=obj.device)
            same = (cls[o0 : o0 + m, None] == cls[None, o0 : o0 + m]).float()
            terms.append(F.binary_cross_entropy_with_logits(self.decoder.similarity_logits(obj[o0 : o0 + m])[off],
                                                            same[off]))
        return torch.stack(terms).mean() if terms else obj.sum() * 0.0

    def _decode_shared(self, shared: SceneInputs, index: Sequence[int], query, words, word_mask) -> DecoderOutput:
        """The decoder on samples that share scenes: each distinct scene encoded once, its questions decoded
        in one call; outputs laid out per sample, as ``self.decoder`` gives them on ``shared.take(index)``."""
        outs: list = [None] * len(index)
        for u in sorted(set(int(i) for i in index)):
            rows = [b for b, i in enumerate(index) if int(i) == u]
            sc = shared.scene(u)
            enc = self.decoder.encode_scene(sc.point_feat, sc.points.coord, sc.tokens, sc.points.superpoint)
            r = torch.tensor(rows, device=query.device)
            res = self.decoder.decode(query[r], enc, None if words is None else words[r],
                                      None if word_mask is None else word_mask[r])
            for b, o in zip(rows, res):
                outs[b] = o
        null = torch.stack([o.null_logits for o in outs]) if outs and outs[0].null_logits is not None else None
        return DecoderOutput(torch.cat([o.point_logits for o in outs]), torch.cat([o.obj_logits for o in outs]),
                             [o.query_point_logits for o in outs], null)

    @staticmethod
    def _rank_loss(obj_logits: torch.Tensor, obj_label: torch.Tensor, obj_offset: torch.Tensor,
                   null_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Softmax cross-entropy over a sample's objects (the grounding loss of ReferIt3D-style models), mean
        over the samples it covers; 0 when there are none. Per-object BCE alone must put each score above or
        below a fixed threshold; "the chair closest to the desk" is a comparison among the chairs, which a
        softmax over the objects expresses directly.

        Without ``null_logits`` it covers samples with exactly one target. With them (``[B]``, the decoder's
        "no target" logit, ``MaskDecoderConfig.null_object``) the softmax runs over the objects and the null
        and covers every sample: zero targets -> the null; one or more -> ``-log`` of the probability mass on
        the targets (the marginal likelihood of "one of the targets is the pick")."""
        counts = counts_from_offset(obj_offset).tolist()
        terms = []
        for b, (logits, label) in enumerate(zip(obj_logits.split(counts), obj_label.split(counts))):
            n = int(label.sum()) if label.numel() else 0
            if null_logits is None:
                if n == 1:
                    terms.append(F.cross_entropy(logits[None], label.argmax()[None]))
                continue
            z = torch.cat([logits, null_logits[b].reshape(1)])
            pick = torch.cat([label > 0.5, torch.tensor([n == 0], device=label.device)])
            terms.append(torch.logsumexp(z, 0) - torch.logsumexp(z[pick], 0))
        return torch.stack(terms).mean() if terms else obj_logits.sum() * 0.0

    def select_objects(self, obj_logits: torch.Tensor, null_logit: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The local object rows the decoder picks, sorted: those scored ``>= threshold``; with a "no target"
        logit, nothing when it beats every object, else the best object plus those over the threshold (a
        question has a target exactly when the null loses the softmax, so a single target needs no fixed
        threshold: on a checkpoint trained without the null, held-out single-target rows scored mIoU 0.87 when
        the best object was always taken, 0.68 with the 0.5 threshold alone)."""
        chosen = torch.sigmoid(obj_logits) >= self.config.threshold
        if null_logit is not None:
            if not obj_logits.numel() or bool(null_logit >= obj_logits.max()):
                return obj_logits.new_zeros(0, dtype=torch.long)
            chosen[obj_logits.argmax()] = True
        return chosen.nonzero().flatten()

    def _targets(self, batch: ReferringBatch):
        """Point targets ``[N]``, object labels ``[M]`` and object weights ``[M]`` (hard negatives weigh more)."""
        t = batch.scene.tokens
        dev = t.feat.device
        label = torch.zeros(t.num_objects, device=dev)
        weight = torch.ones(t.num_objects, device=dev)
        for b in range(batch.scene.batch_size):
            o0 = int(t.obj_offset[b - 1]) if b else 0
            rows = self._local_targets(batch.scene, b, batch.targets[b], "target").to(dev) + o0
            hard = torch.zeros(t.num_objects, dtype=torch.bool, device=dev)
            if batch.object_class is not None and rows.numel():
                m = int(t.obj_counts[b])
                cls = batch.object_class.to(dev)
                same = torch.isin(cls[o0 : o0 + m], cls[rows])
                hard[o0 : o0 + m] = same
            if batch.distractors is not None and batch.distractors[b]:
                hard[self._local_targets(batch.scene, b, batch.distractors[b], "distractor").to(dev) + o0] = True
            weight[hard] = self.config.hard_negative_weight
            label[rows] = 1.0
            weight[rows] = 1.0
        gt_point = (label[t.point2obj.clamp_min(0)] * (t.point2obj >= 0)).float()
        return gt_point, label, weight

    # -- inference -----------------------------------------------------------------------------------
    def prefix_embeds(self, scene: SceneInputs):
        """Embeddings ``[Lp, H]`` of the scene prefix of one scene (no gate, identity identifiers) and the
        identifier of each object ``[M]`` (-1 where left out)."""
        if scene.batch_size != 1:
            raise ValueError(f"prefix_embeds takes one scene, got {scene.batch_size}")
        keep = self._keep(scene, 0, None)
        slots = identifier_permutation(keep.numel(), self.vocab.num_identifiers, None)
        ids, pos, which = build_prefix(self.tokenizer, self.vocab, slots, self.config.prompt)
        slot_of_object = torch.full((scene.tokens.num_objects,), -1, dtype=torch.long)
        slot_of_object[keep] = slots
        prompt = ScenePrompt(ids, torch.full_like(ids, IGNORE_INDEX), pos, keep[which], ids.numel(), ids.numel(),
                             -1, slot_of_object)
        return self._embed_prompt(scene, 0, prompt, scene.tokens.feat), slot_of_object

    @torch.inference_mode()
    def predict(self, scene: SceneInputs, texts: Sequence[str], use_cache: bool = True) -> list:
        """Answer every text on one scene, one :class:`Prediction` per text (see :meth:`_predict`).

        Runs under ``torch.inference_mode`` and, in eval mode, with LoRA merged into the base weights
        (:meth:`IdentifierLM.merged_lora`; the weights are restored exactly afterwards)."""
        with self.lm.merged_lora():
            return self._predict(scene, texts, use_cache)

    def _predict(self, scene: SceneInputs, texts: Sequence[str], use_cache: bool) -> list:
        """The work of :meth:`predict`.

        The texts are answered in batches of ``config.predict_batch_size``: one LLM call per decoding step for
        the whole batch. With ``use_cache`` (and no gate) the scene prefix and the question head are encoded
        once (:class:`scene3d.models.cache.SceneCache`) and each batch only runs its questions' own tokens;
        otherwise every text's whole prompt is encoded (one right-padded row per text). Both decode greedily
        in the same way (:meth:`_generate`), so the results agree.
        """
        from scene3d.models.cache import SceneCache

        if scene.batch_size != 1:
            raise ValueError(f"predict takes one scene, got {scene.batch_size}")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"referring text must be a non-empty string, got {t!r}")
        scene_cache = SceneCache(self, scene) if use_cache and self.gate is None and texts else None
        n = self.config.predict_batch_size
        preds: list = []
        scene_enc = None
        for i in range(0, len(texts), n):
            chunk = texts[i : i + n]
            if scene_cache is None:
                steps, slots = self._start_uncached(scene, chunk)
            else:
                start = self._start_packed if self._cached_layout() == "packed" else self._start_cached_rows
                steps, slots = start(scene_cache, chunk), [scene_cache.slot_of_object] * len(chunk)
            answers, seg_hidden = self._generate(steps)
            if scene_enc is None:  # the decoder's keys do not depend on the question: once per scene
                scene_enc = self.decoder.encode_scene(scene.point_feat, scene.points.coord, scene.tokens,
                                                      scene.points.superpoint)
            query, words, word_mask = self._decoder_query(seg_hidden, chunk)
            decoded = self.decoder.decode(query, scene_enc, words, word_mask)
            for b, (answer, dec) in enumerate(zip(answers, decoded)):
                preds.append(self._reconcile(scene, answer, slots[b], dec))
        return preds

    def _cached_layout(self) -> str:
        """``"packed"``: all questions of a batch share one copy of the cached prefix in one sequence, kept
        apart by a 4D attention mask (needs the ``sdpa`` or ``eager`` attention of transformers and no
        sliding-window layers, which a custom mask would not window); ``"rows"``: the prefix is copied into
        one row per question (any model)."""
        cfg = self.lm.causal_lm.config
        sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or ())
        return "packed" if getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager") and not sliding else "rows"

    def _start_packed(self, scene_cache, texts: Sequence[str]) -> "_PackedSteps":
        """The rest of ``B`` questions (after the cached scene prefix and question head), packed one after the
        other behind one copy of the cache; each attends to the cache and to its own earlier tokens only."""
        dev = scene_cache.last_logits.device
        tails = [scene_cache.query_tail(t) for t in texts]
        lens = torch.tensor([q.numel() for q in tails], device=dev)  # (B,)
        b, lc = len(tails), scene_cache.cached_len
        owner = torch.repeat_interleave(torch.arange(b, device=dev), lens)  # (T,) question of each token
        ends = torch.cumsum(lens, 0)  # (B,)
        pos = lc + torch.arange(owner.numel(), device=dev) - (ends - lens)[owner]  # (T,) rotary positions
        steps = _PackedSteps(self.lm, scene_cache.fork(), torch.full((lc,), -1, dtype=torch.long, device=dev),
                             lc + lens)
        out = steps.run(torch.cat(tails).to(dev), owner, pos, logits_at=ends - 1)
        steps.logits = out.logits[0]  # (B, V)
        return steps

    def _start_cached_rows(self, scene_cache, texts: Sequence[str]) -> "_RowSteps":
        """As :meth:`_start_packed` with one row per question (the cache copied into every row)."""
        dev = scene_cache.last_logits.device
        tails = [scene_cache.query_tail(t) for t in texts]
        lens = torch.tensor([q.numel() for q in tails], device=dev)  # (B,)
        b, lt, lc = len(tails), int(lens.max()), scene_cache.cached_len
        ids = torch.full((b, lt), self.vocab.seg_token_id, dtype=torch.long)  # padding: any valid id, masked
        for i, q in enumerate(tails):
            ids[i, : q.numel()] = q
        total = lc + lt + self.config.max_new_tokens + 1  # room for the answer and a forced [SEG]
        attn = torch.zeros(b, total, dtype=torch.long, device=dev)  # (B, S): 1 at real tokens
        attn[:, :lc] = 1
        attn[:, lc : lc + lt] = (torch.arange(lt, device=dev) < lens[:, None]).long()
        pos = (lc + torch.arange(lt, device=dev)).expand(b, lt)
        out = self.lm(self.lm.embed(ids.to(dev)), attention_mask=attn, cache=scene_cache.expand(b, total),
                      use_cache=True, position_ids=pos, logits_at=lens - 1)
        return _RowSteps(self.lm, out.logits[:, 0], out.cache, attn, lc + lens, lc + lt, self.vocab.seg_token_id)

    def _start_uncached(self, scene: SceneInputs, texts: Sequence[str]):
        """Whole prompts (scene prefix + question) of ``B`` texts encoded as one right-padded batch; also
        returns each text's identifier assignment ``[M]`` (a gate may keep different objects per text)."""
        embeds, slots = [], []
        for t in texts:
            kept, feat = self._gate(scene, [t])  # the gate sees one scene, so one question at a time
            prompt = build_prompt(self.tokenizer, self.vocab, scene.tokens.num_objects, t, None, seed=None,
                                  keep=self._keep(scene, 0, kept), config=self.config.prompt)
            embeds.append(self._embed_prompt(scene, 0, prompt, feat))  # (L_b, H)
            slots.append(prompt.slot_of_object)
        dev = embeds[0].device
        lens = torch.tensor([e.shape[0] for e in embeds], device=dev)  # (B,)
        x = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)  # (B, L, H), zeros behind each row
        b, lx = x.shape[:2]
        total = lx + self.config.max_new_tokens + 1
        attn = torch.zeros(b, total, dtype=torch.long, device=dev)
        attn[:, :lx] = (torch.arange(lx, device=dev) < lens[:, None]).long()
        pos = torch.arange(lx, device=dev).expand(b, lx)
        out = self.lm(x, attention_mask=attn, cache=self.lm.new_cache(total), use_cache=True, position_ids=pos,
                      logits_at=lens - 1)
        return _RowSteps(self.lm, out.logits[:, 0], out.cache, attn, lens, lx, self.vocab.seg_token_id), slots

    def _generate(self, steps):
        """Greedy decoding of ``B`` questions at once until each has produced ``[SEG]``.

        Per question, as one-at-a-time decoding would: placeholders are never generated; ``</s>`` ends the
        answer (not kept); after ``max_new_tokens`` tokens without ``[SEG]`` one is appended, so the decoder
        always gets a state. Only unfinished questions are fed (``steps.step``). Returns (answer ids per
        question, hidden state ``[B, H]`` at each question's ``[SEG]``).
        """
        seg, eos = self.vocab.seg_token_id, self.tokenizer.eos_token_id
        logits = steps.logits  # (A, V) of the active questions
        b = logits.shape[0]
        active = torch.arange(b, device=logits.device)
        answers: list = [[] for _ in range(b)]
        seg_hidden = None
        for step in range(self.config.max_new_tokens + 1):
            logits[:, self.vocab.placeholder_id] = float("-inf")  # placeholders are never generated
            nxt = logits.argmax(-1)  # (A,)
            if eos is not None:
                nxt = torch.where(nxt == eos, seg, nxt)
            if step == self.config.max_new_tokens:
                nxt = torch.full_like(nxt, seg)
            for i, t in zip(active.tolist(), nxt.tolist()):
                answers[i].append(t)
            logits, hidden = steps.step(active, nxt)  # (A, V), (A, H)
            if seg_hidden is None:
                seg_hidden = hidden.new_zeros(b, hidden.shape[-1])
            now = nxt == seg
            seg_hidden[active[now]] = hidden[now]
            active, logits = active[~now], logits[~now]
            if not active.numel():
                break
        return answers, seg_hidden

    def _reconcile(self, scene: SceneInputs, answer: list, slot_of_object: torch.Tensor, dec) -> Prediction:
        t = scene.tokens
        parsed = parse_answer(answer, self.vocab, slot_of_object)
        scores = torch.sigmoid(dec.obj_logits)
        decoder_mask = torch.sigmoid(dec.point_logits) >= self.config.threshold
        named = torch.tensor(sorted(parsed.objects), dtype=torch.long, device=t.feat.device)
        identifier_mask = torch.isin(t.point2obj, named)
        scored = self.select_objects(dec.obj_logits, dec.null_logits)
        if self.config.reconcile == "decoder" and dec.null_logits is not None:
            # a decoder with a "no target" logit decides: none is an answer, not a reason to fall back
            objects, source = scored, ("decoder" if scored.numel() else "none")
        else:
            order = [(named, "identifiers"), (scored, "decoder")]
            if self.config.reconcile == "decoder":
                order.reverse()
            objects, source = next(((o, src) for o, src in order if o.numel()), (scored, "none"))
        point_mask = torch.isin(t.point2obj, objects)
        ids = t.object_ids[objects] if t.object_ids is not None else torch.full_like(objects, -1)
        return Prediction(point_mask, objects, ids, decoder_mask, identifier_mask, scores, answer,
                          parsed.identifiers, source, (slot_of_object < 0).nonzero().flatten())


# ---------------------------------------------------------------------------------------------- decoding steps
class _RowSteps:
    """Decoding state with one row per question in a preallocated cache (:meth:`IdentifierLM.new_cache`).

    ``logits [B, V]`` after each row's last real token; ``attn [B, S]`` 1 at real tokens, 0 at padding and
    at columns not yet written; ``pos [B]`` rotary position of each row's next token; ``col`` the cache column
    the next tokens go to (same for all rows). A finished row is fed a dummy token and its outputs dropped
    (rows never see each other, so it cannot disturb the others).
    """

    def __init__(self, lm, logits, cache, attn, pos, col: int, dummy: int) -> None:
        self.lm, self.logits, self.cache, self.attn = lm, logits, cache, attn
        self.pos, self.col, self.dummy = pos, col, dummy

    def step(self, active: torch.Tensor, tokens: torch.Tensor):
        """Feed ``tokens [A]`` to rows ``active [A]``; returns their next logits ``[A, V]``, hidden ``[A, H]``."""
        b = self.attn.shape[0]
        feed = torch.full((b,), self.dummy, dtype=torch.long, device=tokens.device)
        feed[active] = tokens
        self.attn[:, self.col] = 1  # a finished row attends only to itself; its outputs are dropped
        out = self.lm(self.lm.embed(feed[:, None]), attention_mask=self.attn, cache=self.cache, use_cache=True,
                      position_ids=self.pos[:, None], logits_at=torch.zeros_like(self.pos))
        self.cache, self.pos, self.col = out.cache, self.pos + 1, self.col + 1
        return out.logits[active, 0], out.hidden[active, 0]


class _PackedSteps:
    """Decoding state with all questions of a batch in one sequence behind one copy of the shared prefix.

    The cache holds the shared prefix (``owner == -1``, seen by every question) followed by the questions'
    tokens in the order they were fed; ``owner [K]`` names the question of each cached token, ``next_pos [B]``
    the rotary position of each question's next token. A token attends to the shared prefix and to the
    earlier tokens of its own question (4D additive mask), so each question computes what it would alone.
    """

    def __init__(self, lm, cache, owner: torch.Tensor, next_pos: torch.Tensor) -> None:
        self.lm, self.cache, self.owner, self.next_pos = lm, cache, owner, next_pos
        self.logits: Optional[torch.Tensor] = None

    def run(self, ids: torch.Tensor, owner: torch.Tensor, pos: torch.Tensor,
            logits_at: Optional[torch.Tensor] = None):
        """Append tokens ``ids [T]`` of questions ``owner [T]`` at rotary positions ``pos [T]``; ``logits_at
        [K]`` picks the positions (of the ``T``) whose logits are computed (default all)."""
        k0 = self.owner.numel()
        k_owner = torch.cat([self.owner, owner])  # (K,)
        q_col = k0 + torch.arange(owner.numel(), device=owner.device)  # (T,) cache column of each new token
        k_col = torch.arange(k_owner.numel(), device=owner.device)
        own = (k_owner[None] == owner[:, None]) & (k_col[None] <= q_col[:, None])  # (T, K) own earlier tokens
        allowed = (k_owner[None] < 0) | own
        x = self.lm.embed(ids[None])  # (1, T, H)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask.masked_fill_(~allowed, torch.finfo(x.dtype).min)  # additive: exp(min - max) is exactly 0
        out = self.lm(x, attention_mask=mask[None, None], cache=self.cache, use_cache=True, position_ids=pos[None],
                      logits_at=None if logits_at is None else logits_at[None])
        self.cache, self.owner = out.cache, k_owner
        return out

    def step(self, active: torch.Tensor, tokens: torch.Tensor):
        """Feed ``tokens [A]`` to questions ``active [A]``; returns their next logits ``[A, V]``, hidden ``[A, H]``."""
        out = self.run(tokens, active, self.next_pos[active])
        self.next_pos = self.next_pos.index_add(0, active, torch.ones_like(active))
        return out.logits[0], out.hidden[0]


def _loss_positions(labels: torch.Tensor):
    """Positions ``[B, K]`` whose next token carries a label, and those labels ``[B, K]`` (``IGNORE_INDEX``
    where a row has fewer than ``K``; such slots point at position 0). Cross-entropy over the logits at these
    positions equals the usual shifted loss over all positions."""
    nxt = labels[:, 1:]  # (B, L-1)
    has = nxt != IGNORE_INDEX
    k = max(int(has.sum(1).max()), 1) if labels.numel() else 1
    b = labels.shape[0]
    at = labels.new_zeros(b, k)
    target = labels.new_full((b, k), IGNORE_INDEX)
    for i in range(b):
        pos = has[i].nonzero().flatten()
        at[i, : pos.numel()] = pos
        target[i, : pos.numel()] = nxt[i, pos]
    return at, target


def _dice_loss(logits: torch.Tensor, target: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Mean over scenes of ``1 - (2|p g| + 1) / (|p| + |g| + 1)`` (smoothing 1: an empty target asks for an
    empty prediction)."""
    p = torch.sigmoid(logits)
    counts = counts_from_offset(offset).to(logits.device)
    batch = torch.repeat_interleave(torch.arange(len(counts), device=logits.device), counts)
    inter = torch.zeros(len(counts), device=logits.device).index_add(0, batch, p * target)
    ps = torch.zeros(len(counts), device=logits.device).index_add(0, batch, p)
    gs = torch.zeros(len(counts), device=logits.device).index_add(0, batch, target)
    return (1 - (2 * inter + 1) / (ps + gs + 1)).mean()


def synthetic_scene(num_objects: Sequence[int] = (6,), points_per_object: int = 20, obj_dim: int = 32,
                    point_dim: int = 32, seed: int = 0, unassigned: int = 5) -> SceneInputs:
    """Random scenes for tests, benchmarks and the demo: object ``j`` of a scene is a blob of points around a
    random center, with ``unassigned`` extra points of no object; superpoints are pairs of points of one object.
    Object ids are ``10 * (j + 1)`` so they differ from row indices."""
    gen = torch.Generator().manual_seed(seed)
    feats, centers, sizes, coords, p2o, sps, ids, pfeat = [], [], [], [], [], [], [], []
    o_counts, p_counts, row = [], [], 0
    for m in num_objects:
        c = torch.rand(m, 3, generator=gen) * 6.0
        s = torch.rand(m, 3, generator=gen) * 0.8 + 0.2
        xyz = (c.repeat_interleave(points_per_object, 0)
               + (torch.rand(m * points_per_object, 3, generator=gen) - 0.5) * s.repeat_interleave(points_per_object, 0))
        owner = torch.arange(m).repeat_interleave(points_per_object)
        xyz = torch.cat([xyz, torch.rand(unassigned, 3, generator=gen) * 6.0])
        owner = torch.cat([owner + row, torch.full((unassigned,), -1)])
        sp = torch.cat([torch.arange(m * points_per_object) // 2, m * points_per_object + torch.arange(unassigned)])
        feats.append(torch.randn(m, obj_dim, generator=gen))
        centers.append(c); sizes.append(s); coords.append(xyz); p2o.append(owner); sps.append(sp)
        ids.append(10 * (torch.arange(m) + 1))
        pfeat.append(torch.randn(xyz.shape[0], point_dim, generator=gen))
        o_counts.append(m); p_counts.append(xyz.shape[0]); row += m
    tokens = ObjectTokens(torch.cat(feats), torch.cat(centers), torch.cat(sizes),
                          torch.cumsum(torch.tensor(o_counts), 0), torch.cat(p2o), torch.cat(ids))
    points = PointBatch(torch.cat(coords), torch.cumsum(torch.tensor(p_counts), 0), superpoint=torch.cat(sps))
    return SceneInputs(tokens, torch.cat(pfeat), points)
