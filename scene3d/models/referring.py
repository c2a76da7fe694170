"""ReferringSegmenter: the one place where object tokens, gating, the LLM and the mask decoder meet.

Data flow of the questions of one scene (``M`` objects, ``N`` points, LLM width ``H``)::

    ObjectTokens feat [M, C] --(optional gate(tokens, query_emb) -> kept rows + gated feat)--> [M', C]
        --projector(feat, center, size)--> [M', H] spliced at the <obj_feat> placeholders of the scene prefix
    "system ... <OBJa> <obj_feat> <OBJb> <obj_feat> ... | question 1 ... assistant : <OBJk> [SEG] | question 2 ..."
        --LLM (frozen + LoRA; the tiny model trains whole), the prefix once per scene-->
          answer logits (LM loss on the answer only), states [T, H] at each question's text tokens and [H] at
          its [SEG]
        --MaskDecoder: grounding head (relation layers over the objects, conditioned on those states; object and
          "no target" scores) + mask head (queries from [SEG] over the grounded objects and the points)-->
          point logits [N], object logits [M], null logit

The question's words reach the decoder only through the LLM's transformer (``decoder_states="llm"``); the
ablation ``decoder_states="embeddings"`` feeds the LLM's input embeddings at the same positions instead, so
the difference measures what the LLM's layers contribute (``bench/learn_synthetic.py``).

Files, each one concern: :mod:`scene3d.models.sequence` (prompt, splicing, the packed sequences with a shared
scene prefix), :mod:`scene3d.models.losses`, :mod:`scene3d.models.generation` (greedy answers, the scene
cache's start, reconciliation), :mod:`scene3d.heads.grounding`, :mod:`scene3d.heads.mask_decoder`.

Gating is pluggable: any callable ``gate(tokens, query_embedding [B, H]) -> GateSelection`` (an ``nn.Module``
is registered, so its scorer trains and is checkpointed). The query embedding is the mean input embedding of
the question's tokens (the gate runs before the LLM). A query-conditioned gate changes the scene prefix per
question, so with a gate every question gets its own prefix, in training and at inference (no scene cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scene3d.constants import IGNORE_INDEX, SEG_TOKEN
from scene3d.gating.adapter import GateFn
from scene3d.heads.mask_decoder import DecoderOutput, MaskDecoder, MaskDecoderConfig, stack_outputs
from scene3d.llm.loader import IdentifierLM, LLMConfig, load_llm
from scene3d.llm.prompt import (IdentifierVocab, PromptConfig, ScenePrompt, build_prefix, build_query,
                                identifier_permutation, keep_largest_objects, resolve_prompt)
from scene3d.models import generation
from scene3d.models.cache import SceneCache
from scene3d.models.generation import Prediction  # noqa: F401  (re-exported: the result type of predict)
from scene3d.models.pointer import IdentifierPointer, point
from scene3d.models.losses import (ReferringLoss, anchor_loss, dice_loss, local_rows, loss_positions, name_loss,
                                   object_targets, rank_loss, similarity_loss)
from scene3d.models.sequence import PackedSequences, gather_states, pack
from scene3d.structures.scene_inputs import SceneInputs

#: The model's architecture number, saved in every checkpoint's config. 1: the decoder read the words through
#: its own text encoder over the LLM's input embeddings; 2: only through the LLM's states, the sentence state
#: taken at [SEG] (after the answer); 3: as 2, with the sentence state read before the answer by default
#: (``ReferringConfig.sentence_state``).
ARCHITECTURE = 3


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
    rank_weight: float = 1.0  # softmax cross-entropy over the objects and the null (losses.rank_loss)
    #: BCE of the decoder's object similarity (``MaskDecoderConfig.rank_pairs``) against "same class", on
    #: samples whose object classes are known (``losses.similarity_loss``)
    sim_weight: float = 0.5
    #: anchor supervision (``losses.anchor_loss``): on rows that name their anchors (``QueryBatch.anchors``:
    #: Sr3D's ``anchor_ids``, the synthetic programs' anchors), every other object's anchor head (head 0 of
    #: each relation layer) is asked to attend to them; 0 turns it off. Measured on SmolLM2 x 4 layers, 30
    #: CPU-minutes (bench/learn_synthetic.py): closest / farthest 0.52 / 0.43 -> 0.94 / 0.94, reconciled
    #: template | paraphrase 0.823 | 0.638 -> 0.906 | 0.699
    anchor_weight: float = 0.5
    #: object-name alignment (``losses.name_loss``): every object whose class name the scene knows is pulled
    #: towards the LLM's embedding of that name (cosine times ``name_scale``, cross-entropy over the names of
    #: the batch); 0 (default) turns it off. Measured on the real-rescan experiment (SmolLM2 x 8 layers, 30
    #: CPU-minutes, configs/experiment/real_rescan.yaml sets 0.5): scene0000_02 mIoU 0.261 -> 0.326 with
    #: ground-truth instances; not yet measured on the synthetic benchmark, hence off by default
    name_weight: float = 0.0
    name_scale: float = 10.0
    #: each object's class name is written into the prompt after its identifier (``<OBJ003> chair
    #: <obj_feat>``, :func:`scene3d.llm.prompt.build_prefix`), so the LLM matches the question's words against
    #: names it can read instead of learning every class from the 3D token alone. Training writes the scene's
    #: annotated names, each replaced by another name of the batch with probability ``label_noise`` (the names
    #: at inference are predicted and sometimes wrong, so the model must not trust them blindly); inference
    #: writes the names a label model predicts (``PipelineConfig.label_model``: an instance-proposal model's
    #: classes, averaged over each object's points) or names the caller gives. Measured on the real-rescan
    #: experiment: README
    object_labels: bool = False
    label_noise: float = 0.0
    threshold: float = 0.5
    #: which path leads the reconciled result: "identifiers" (the objects the answer names; the decoder's
    #: objects when it names none) or "decoder" (the decoder's objects, :func:`scene3d.models.generation.decoder_objects`;
    #: the named ones when it picks none — unless the decoder has a "no target" logit, whose "none" is final).
    #: "decoder" suits an LLM that names identifiers less reliably than the relation-aware decoder scores
    #: objects.
    reconcile: str = "identifiers"
    max_new_tokens: int = 16
    predict_batch_size: int = 16  # texts of one scene that predict answers as one batch
    #: what the decoder reads at the question's text tokens and at [SEG]: "llm" (the LLM's last-layer states)
    #: or "embeddings" (its input embeddings at the same positions: the ablation of the LLM's layers)
    decoder_states: str = "llm"
    #: where the decoder's sentence state (object / null scores, mask queries) is read: "question" (a [SEG]
    #: token ends the prompt, after the assistant's generation prompt; its state has read the scene and the
    #: whole question, not the answer, and the answer is generated from it) or "seg" (the [SEG] that ends the
    #: answer, as LISA). With "seg" the state reads the
    #: answer, teacher-forced in training and the LLM's own at inference, so the decoder learns to copy it:
    #: measured on SmolLM2 x 4 layers after 870 steps, held-out "the lamp" / "the brown bed" (one target) got
    #: the target as the best object by ~8 logits, yet a null logit of ~+9 because the LLM had answered
    #: "none" (single-target attribute questions: mIoU 0.08, 0.00 without a colour). Measured beside it (10
    #: minutes, bench/learn_synthetic.py, template | paraphrase reconciled): at [SEG] after the answer 0.770 |
    #: 0.551; at the prompt's plain last token (the chat template's newline) 0.776 | 0.367; at a [SEG] ending
    #: the prompt (this) 0.800 | 0.528
    sentence_state: str = "question"
    #: identifier logits get a pointer score of the answer state against the LLM's state at each object token
    #: (:mod:`scene3d.models.pointer`); false: the LM head alone names identifiers
    identifier_pointer: bool = True
    #: the identifier logits also get the grounding head's object logits (relations, object and null scores
    #: over the 3D tokens, conditioned on the LLM's states at the question's words and at the prompt's [SEG]),
    #: times a learned scale: the LLM still generates the answer, and where its own pointer cannot yet tell
    #: "the chair left of the desk" from the other chairs the relation-aware scores can. The answer and the
    #: decoder then share their evidence, so the identifier path is no longer independent of the decoder's
    #: objects (bench/learn_synthetic.py prints both). Needs ``identifier_pointer`` and
    #: ``sentence_state="question"`` (the decoder must run before the answer). Measured on SmolLM2 x 4 layers,
    #: 30 CPU-minutes with rewording (bench/learn_synthetic.py, template | paraphrase): identifier-only 0.801 |
    #: 0.624 with it against 0.577 | 0.360 without, reconciled 0.823 | 0.638 against 0.792 | 0.611
    identifier_grounding: bool = True
    #: whether the LM loss also trains the grounding head (and the LLM states it reads) through those logits;
    #: false: they enter the answer detached and the LM loss trains only their scale
    grounding_gradient: bool = False
    #: see ARCHITECTURE; a checkpoint of another architecture is refused with its number
    architecture: int = ARCHITECTURE

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
        if self.decoder_states not in ("llm", "embeddings"):
            raise ValueError(f"decoder_states must be 'llm' or 'embeddings', got {self.decoder_states!r}")
        if self.sentence_state not in ("question", "seg"):
            raise ValueError(f"sentence_state must be 'question' or 'seg', got {self.sentence_state!r}")
        if self.identifier_grounding and not (self.identifier_pointer and self.sentence_state == "question"):
            raise ValueError("identifier_grounding needs identifier_pointer=true and sentence_state='question' "
                             "(set identifier_grounding=false with either)")
        if self.decoder.object_states and self.decoder_states != "llm":
            raise ValueError("decoder.object_states reads the LLM's states: it cannot join the "
                             "decoder_states='embeddings' ablation")
        if self.architecture != ARCHITECTURE:
            raise ValueError(f"model architecture {self.architecture} is not this scene3d's ({ARCHITECTURE}: the "
                             "decoder reads the words only through the LLM's states, its sentence state before "
                             "the answer); retrain the checkpoint")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must lie in [0, 1), got {self.label_noise}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReferringConfig":
        return cls(**d)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class QueryBatch:
    """``B`` referring questions, question ``b`` on scene ``b`` of ``scene``.

    ``targets[b]`` / ``distractors[b]`` / ``anchors[b]`` are source object ids (matched against
    ``tokens.object_ids``; ``anchors[b]`` empty or None where the row names no anchor);
    ``object_class [M]`` (optional) gives same-class hard negatives; ``seeds[b]`` (optional) seeds the
    identifier shuffle in training (a shared prefix uses the seed of its scene's first question). When
    several questions share a scene, ``shared`` (the distinct scenes) and ``scene_index`` (the scene of each
    question; ``scene == shared.take(scene_index)``) let the LLM read each scene's prefix once and the decoder
    encode each scene once, as :meth:`ReferringSegmenter.predict` does.
    """

    scene: SceneInputs
    texts: list
    targets: list
    distractors: Optional[list] = None
    anchors: Optional[list] = None
    object_class: Optional[torch.Tensor] = None
    seeds: Optional[list] = None
    shared: Optional[SceneInputs] = None
    scene_index: Optional[list] = None
    #: class name of each object ``[M]`` (None where unknown), for the object-name alignment loss
    object_names: Optional[list] = None

    def __post_init__(self) -> None:
        b = self.scene.batch_size
        for name in ("texts", "targets", "distractors", "anchors", "seeds"):
            v = getattr(self, name)
            if v is not None and len(v) != b:
                raise ValueError(f"{name} has {len(v)} entries for {b} scenes")
        if self.object_class is not None and self.object_class.shape != (self.scene.tokens.num_objects,):
            raise ValueError(f"object_class must be [{self.scene.tokens.num_objects}]")
        if self.object_names is not None and len(self.object_names) != self.scene.tokens.num_objects:
            raise ValueError(f"object_names has {len(self.object_names)} entries for "
                             f"{self.scene.tokens.num_objects} objects")
        if (self.shared is None) != (self.scene_index is None):
            raise ValueError("shared and scene_index go together")
        if self.scene_index is not None and len(self.scene_index) != b:
            raise ValueError(f"scene_index has {len(self.scene_index)} entries for {b} samples")

    def scenes(self):
        """(the distinct scenes, the scene of each question)."""
        if self.shared is None:
            return self.scene, list(range(self.scene.batch_size))
        return self.shared, [int(i) for i in self.scene_index]


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
            prompt=dataclasses.replace(resolve_prompt(config.prompt, self.lm.tokenizer),
                                       query_token=SEG_TOKEN if config.sentence_state == "question" else ""))
        self.config = config
        self.projector = nn.Sequential(nn.Linear(config.obj_dim + 6, config.projector_hidden), nn.GELU(),
                                       nn.Linear(config.projector_hidden, h))
        self.decoder = MaskDecoder(config.decoder)
        self.pointer = IdentifierPointer(h) if config.identifier_pointer else None
        # scale of the grounding head's object logits in the identifier logits (identifier_grounding)
        self.grounding_scale = nn.Parameter(torch.tensor(1.0)) if config.identifier_grounding else None
        self.register_buffer("identifier_ids", torch.tensor(self.vocab.obj_token_ids, dtype=torch.long),
                             persistent=False)
        self.gate = gate  # an nn.Module gate is registered as a submodule by nn.Module.__setattr__

    @property
    def text_tokenizer(self):
        """The LLM's text tokenizer."""
        return self.lm.tokenizer

    # -- training ------------------------------------------------------------------------------------
    def forward(self, batch: QueryBatch) -> ReferringLoss:
        c = self.config
        seq = self.pack(batch)
        at, target = loss_positions(seq.labels)  # (R, K): logits only where the LM loss needs them
        out = self.lm(seq.inputs_embeds, attention_mask=seq.attention_mask, position_ids=seq.position_ids,
                      logits_at=at)
        words, seg = self.decoder_inputs(out.hidden, seq)
        scenes, index = batch.scenes()
        dec = self.decode_grouped(scenes, index, seg, words, seq.word_mask,
                                  self.scene_object_states(out.hidden, seq, index, scenes)
                                  if c.decoder.object_states else None)
        t = batch.scene.tokens
        bias = None
        if self.grounding_scale is not None:  # each answer position gets its question's object logits
            per_question = self.identifier_bias(dec.obj_logits.split(t.obj_counts.tolist()),
                                                [p.slot_of_object for p in seq.prompts])  # (B, NI)
            owner = torch.zeros_like(at)
            for b in range(per_question.shape[0]):
                row = int(seq.rows[b])
                mine = (at[row] >= seq.ask_cols[b]) & (at[row] < seq.seg_cols[b])
                owner[row] = torch.where(mine, b, owner[row])
            bias = per_question[owner]  # (R, K, NI); positions without a label are ignored by the loss
        r = torch.arange(at.shape[0], device=at.device)
        logits = self.answer_logits(out.logits, out.hidden[r[:, None], at], out.hidden[r[:, None], seq.obj_cols],
                                    seq.obj_slots, bias)
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX)
        gt_point, obj_label, obj_weight = object_targets(t, batch.targets, batch.distractors, batch.object_class,
                                                         c.hard_negative_weight)
        bce = F.binary_cross_entropy_with_logits(dec.point_logits, gt_point)
        dice = dice_loss(dec.point_logits, gt_point, batch.scene.points.offset)
        obj = (F.binary_cross_entropy_with_logits(dec.obj_logits, obj_label, reduction="none") * obj_weight).sum() \
            / obj_weight.sum().clamp_min(1e-6)
        rank = rank_loss(dec.obj_logits, obj_label, t.obj_offset, dec.null_logits)
        sim = similarity_loss(self.decoder.grounding, t, batch.object_class)
        total = (c.lm_weight * lm_loss + c.bce_weight * bce + c.dice_weight * dice + c.obj_weight * obj
                 + c.rank_weight * rank + c.sim_weight * sim)
        anchor = None
        if c.anchor_weight > 0 and batch.anchors is not None:
            anchor = anchor_loss(dec.anchor_attention, [local_rows(t, b, a, "anchor") if a else None
                                                        for b, a in enumerate(batch.anchors)])
        if anchor is None:
            anchor = total.new_zeros(())
        else:
            total = total + c.anchor_weight * anchor
        name = total.new_zeros(())
        if c.name_weight > 0 and batch.object_names is not None:
            name = name_loss(self.object_embeds(t, t.feat), batch.object_names, self.name_embeddings,
                             t.feat.new_tensor(c.name_scale))
            total = total + c.name_weight * name
        return ReferringLoss(total, lm_loss, bce, dice, obj, rank, sim, anchor, name)

    def name_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """``[K, H]``: the LLM's input embedding of each class name (mean over its tokens, as the name reads
        inside a sentence: with a leading space), without gradient."""
        cache = self.__dict__.setdefault("_name_ids", {})
        dev = self.lm.new_embed.weight.device
        rows = []
        with torch.no_grad():
            for n in names:
                if n not in cache:
                    ids = self.text_tokenizer(" " + n, add_special_tokens=False)["input_ids"]
                    if not ids:
                        raise ValueError(f"class name {n!r} has no tokens")
                    cache[n] = torch.tensor(ids, dtype=torch.long)
                rows.append(self.lm.embed(cache[n].to(dev)[None])[0].float().mean(0))
        return torch.stack(rows)

    def answer_logits(self, logits: torch.Tensor, hidden: torch.Tensor, obj_states: torch.Tensor,
                      obj_slots: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LM's logits with the identifier pointer applied (:func:`scene3d.models.pointer.point`; unchanged
        without ``identifier_pointer``): ``logits [R, (K,) V]`` at states ``hidden [R, (K,) H]``, the row's
        object-token states ``obj_states [R, P, H]`` and their identifiers ``obj_slots [R, P]``; ``bias [R, (K,)
        NI]`` the grounding head's logits per identifier (:meth:`identifier_bias`), or None."""
        if self.pointer is None:
            return logits
        return point(self.pointer, self.identifier_ids, logits, hidden, obj_states, obj_slots, bias)

    def identifier_bias(self, obj_logits: Sequence[torch.Tensor], slots: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, NI]``: question ``b``'s grounding logits ``obj_logits[b] [M]`` at the identifiers ``slots[b] [M]``
        of its objects (-1: left out of the prompt), times the learned scale; 0 elsewhere (identifiers without
        an object get -inf from the pointer anyway)."""
        out = obj_logits[0].new_zeros(len(obj_logits), self.vocab.num_identifiers, dtype=torch.float32)
        for b, (lg, sl) in enumerate(zip(obj_logits, slots)):
            sl = sl.to(lg.device)
            keep = sl >= 0
            out[b, sl[keep]] = lg[keep].float()
        return (out if self.config.grounding_gradient else out.detach()) * self.grounding_scale

    def shares_prefix(self) -> bool:
        """Whether a scene's questions share one encoding of the scene prefix (no gate, and an LLM that takes
        a 4D attention mask: :meth:`cached_layout`)."""
        return self.gate is None and self.cached_layout() == "packed"

    def pack(self, batch: QueryBatch) -> PackedSequences:
        """The LLM sequences of a batch (:func:`scene3d.models.sequence.pack`): one row per scene with its
        questions behind one prefix when :meth:`shares_prefix`, else one row per question. Identifiers are
        shuffled in training (per row), the identity otherwise."""
        shuffle = self.training and self.config.shuffle_identifiers
        scenes, index = batch.scenes()
        per_question = batch.scene
        if self.shares_prefix():
            members: dict = {}
            for b, u in enumerate(index):
                members.setdefault(u, []).append(b)
            groups_of = [(u, qs) for u, qs in members.items()]
            src, kept, feat = scenes, None, scenes.tokens.feat
        else:
            groups_of = [(b, [b]) for b in range(per_question.batch_size)]
            src = per_question
            kept, feat = self.gate_objects(per_question, batch.texts)
        order, groups = [], []
        for row, qs in groups_of:
            seed = None
            if shuffle:
                seed = int(batch.seeds[qs[0]]) if batch.seeds is not None else int(torch.randint(0, 2**31 - 1, ()))
            questions = [(batch.texts[b], local_rows(per_question.tokens, b, batch.targets[b], "target").tolist())
                         for b in qs]
            groups.append((row, int(src.tokens.obj_counts[row]), self.keep_objects(src, row, kept), seed, questions,
                           self.prompt_names(src, row, noise=self.training)))
            order.extend(qs)
        seq = pack(self.text_tokenizer, self.vocab, self.config.prompt, groups,
                   lambda row, prompt: self.embed_prompt(src, row, prompt, feat),
                   lambda ids: self.lm.embed(ids.to(feat.device)[None])[0], shared=self.shares_prefix())
        # questions were laid out group by group: put them back in batch order
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))
        dev = seq.rows.device
        return seq._replace(rows=seq.rows[back.to(dev)], word_cols=seq.word_cols[back.to(dev)],
                            word_mask=seq.word_mask[back.to(dev)], seg_cols=seq.seg_cols[back.to(dev)],
                            ask_cols=seq.ask_cols[back.to(dev)],
                            prompts=[seq.prompts[int(i)] for i in back])

    def prompt_names(self, scene: SceneInputs, b: int, noise: bool = False) -> Optional[list]:
        """Class names scene ``b``'s prompt writes after its objects' identifiers (``config.object_labels``;
        None when off). ``noise``: each name is replaced by another name of the batch with probability
        ``config.label_noise`` (training)."""
        if not self.config.object_labels:
            return None
        names = scene.local_names(b)
        if names is None:
            raise ValueError("this model writes each object's class name into its prompt (referring.object_labels) "
                             "but the scene has no object names: give a label model (PipelineConfig.label_model, "
                             "--label-model DIR: an instance-proposal model of `scene3d prep proposals`) or names")
        p = self.config.label_noise
        if noise and p > 0:
            pool = sorted({n for n in scene.object_names if n})
            if len(pool) > 1:
                flip = (torch.rand(len(names)) < p).tolist()
                pick = torch.randint(0, len(pool) - 1, (len(names),)).tolist()
                for j, n in enumerate(names):
                    if flip[j] and n:
                        others = [q for q in pool if q != n]
                        names[j] = others[pick[j] % len(others)]
        return names

    def decoder_inputs(self, hidden: torch.Tensor, seq: PackedSequences):
        """``(words [B, T, H], sentence [B, H])`` for the decoder: the LLM's states at each question's text
        tokens and at its sentence position (the prompt's last token, or [SEG]: ``config.sentence_state``), or
        (``decoder_states="embeddings"``) the input embeddings there."""
        source = hidden if self.config.decoder_states == "llm" else seq.inputs_embeds
        cols = seq.ask_cols if self.config.sentence_state == "question" else seq.seg_cols
        return gather_states(source, seq.rows, seq.word_cols, seq.word_mask, cols)

    def scene_object_states(self, hidden: torch.Tensor, seq: PackedSequences, index: Sequence[int],
                            scenes: SceneInputs) -> dict:
        """``{scene: [M, H]}``: the LLM's states at each object's token in the prompt of the scene's first question
        (zeros for objects left out of the prompt), for ``decoder.object_states``. With a shared prefix every
        question of a scene has these states; with a gate each question has its own prefix, and the first one's
        stand for the scene's."""
        out: dict = {}
        for b, u in enumerate(index):
            if u in out:
                continue
            p, r = seq.prompts[b], int(seq.rows[b])
            st = hidden.new_zeros(int(scenes.tokens.obj_counts[u]), hidden.shape[-1])
            out[u] = st.index_put((p.placeholder_obj.to(st.device),), hidden[r, p.placeholder_pos.to(hidden.device)])
        return out

    @staticmethod
    def object_states_of(keys, slot_of_object: torch.Tensor) -> torch.Tensor:
        """``[M, H]``: question 0's states at the object tokens (:class:`~scene3d.models.generation.PointerKeys`)
        per object of ``slot_of_object [M]`` (its identifier, -1 where left out: a zero state)."""
        states, dev = keys.states[0], keys.states.device
        slots, slot_of_object = keys.slots[0].to(dev), slot_of_object.to(dev)
        # column of each identifier among the object tokens (-1: no token); the last entry answers slot -1
        top = int(torch.cat([slots, slot_of_object, slots.new_tensor([-1])]).max())
        column = torch.full((top + 2,), -1, dtype=torch.long, device=dev)
        real = slots >= 0
        column[slots[real]] = real.nonzero()[:, 0]
        pos = column[slot_of_object]
        has = pos >= 0
        return states.new_zeros(slot_of_object.numel(), states.shape[-1]).index_put((has.nonzero()[:, 0],),
                                                                                  states[pos[has]])

    def decode_grouped(self, scenes: SceneInputs, index: Sequence[int], seg, words, word_mask,
                       obj_states: Optional[dict] = None) -> DecoderOutput:
        """The decoder on questions ``b`` of scenes ``index[b]``: each distinct scene encoded once, its questions
        decoded in one call; outputs laid out per question. ``obj_states``: :meth:`scene_object_states`."""
        outs: list = [None] * len(index)
        for u in sorted(set(index)):
            rows = [b for b, i in enumerate(index) if i == u]
            sc = scenes.scene(u)
            enc = self.decoder.encode_scene(sc.point_feat, sc.points.coord, sc.tokens, sc.points.superpoint,
                                            obj_states=None if obj_states is None else obj_states[u])
            r = torch.tensor(rows, device=seg.device)
            for b, o in zip(rows, self.decoder.decode(seg[r], enc, words[r], word_mask[r])):
                outs[b] = o
        return stack_outputs(outs)

    # -- prompt planning: which objects, which identifiers, which features ----------------------------
    def keep_objects(self, scene: SceneInputs, b: int, kept_rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Local rows of scene ``b``'s objects that get identifiers (those the gate kept; above the number of
        identifiers, an error or the largest: ``config.overflow``)."""
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
            keep = keep[keep_largest_objects(keep.numel(), k, npts[keep])]
        return keep.cpu()

    def gate_objects(self, scene: SceneInputs, texts: Sequence[str]):
        """Run the gate (if any): (kept global rows or None, feature table [M, C] with gated rows)."""
        feat = scene.tokens.feat
        if self.gate is None:
            return None, feat
        dev = self.lm.new_embed.weight.device
        ids = [build_query(self.text_tokenizer, t, self.config.prompt) for t in texts]
        qe = torch.stack([self.lm.embed(i.to(dev)[None])[0].mean(0) for i in ids])  # (B, H)
        sel = self.gate(scene.tokens, qe)
        kept = sel.kept_index.long()
        if sel.feat.shape != (kept.numel(), feat.shape[1]):
            raise ValueError(f"gate returned feat {tuple(sel.feat.shape)} for {kept.numel()} kept rows")
        return kept.cpu(), feat.index_put((kept,), sel.feat.to(feat.dtype))

    def embed_prompt(self, scene: SceneInputs, b: int, prompt: ScenePrompt, feat: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[L, H]`` of scene ``b``'s prompt with its object tokens (projected ``feat``, box
        center and size) spliced at the placeholders (``get_input_embeddings`` under :meth:`IdentifierLM.embed`)."""
        t = scene.tokens
        o0 = int(t.obj_offset[b - 1]) if b else 0
        dev = feat.device
        emb = self.lm.embed(prompt.input_ids.to(dev)[None])[0]  # (L, H)
        obj = self.object_embeds(t, feat, (prompt.placeholder_obj + o0).to(dev))
        return emb.index_put((prompt.placeholder_pos.to(dev),), obj.to(self.lm.new_embed.weight.dtype))

    def object_embeds(self, tokens, feat: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LLM input embeddings ``[P, H]`` of objects ``rows`` (all when None): the projector over each one's
        feature row of ``feat [M, C]`` and its box centre and size."""
        center, size = tokens.center, tokens.size
        if rows is not None:
            feat, center, size = feat[rows], center[rows], size[rows]
        return self.projector(torch.cat([feat, center.to(feat.dtype), size.to(feat.dtype)], dim=1))

    def prefix_embeds(self, scene: SceneInputs):
        """Embeddings ``[Lp, H]`` of the scene prefix of one scene (no gate, identity identifiers), the
        identifier of each object ``[M]`` (-1 where left out) and the prefix's :class:`ScenePrompt`."""
        if scene.batch_size != 1:
            raise ValueError(f"prefix_embeds takes one scene, got {scene.batch_size}")
        keep = self.keep_objects(scene, 0, None)
        slots = identifier_permutation(keep.numel(), self.vocab.num_identifiers, None)
        names = self.prompt_names(scene, 0)
        ids, pos, which = build_prefix(self.text_tokenizer, self.vocab, slots, self.config.prompt,
                                       None if names is None else [names[int(k)] for k in keep])
        slot_of_object = torch.full((scene.tokens.num_objects,), -1, dtype=torch.long)
        slot_of_object[keep] = slots
        prompt = ScenePrompt(ids, torch.full_like(ids, IGNORE_INDEX), pos, keep[which], ids.numel(), ids.numel(),
                             -1, slot_of_object)
        return self.embed_prompt(scene, 0, prompt, scene.tokens.feat), slot_of_object, prompt

    # -- inference -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, scene: SceneInputs, texts: Sequence[str], use_cache: bool = True) -> list:
        """Answer every text on one scene, one :class:`Prediction` per text.

        The texts are answered in batches of ``config.predict_batch_size``: one LLM call per decoding step for
        the whole batch. With ``use_cache`` (and no gate) the scene prefix and the question head are encoded
        once (:class:`scene3d.models.cache.SceneCache`) and each batch only runs its questions' own tokens;
        otherwise every text's whole prompt is encoded. Both decode greedily in the same way
        (:func:`scene3d.models.generation.greedy`), so the results agree. Runs under ``torch.inference_mode``
        and, in eval mode, with LoRA merged into the base weights (:meth:`IdentifierLM.merged_lora`; the
        weights are restored exactly afterwards)."""
        if scene.batch_size != 1:
            raise ValueError(f"predict takes one scene, got {scene.batch_size}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"referring text must be a non-empty string, got {t!r}")
        with self.lm.merged_lora():
            scene_cache = SceneCache(self, scene) if use_cache and self.gate is None and texts else None
            n = self.config.predict_batch_size
            preds: list = []
            enc = None
            for i in range(0, len(texts), n):
                chunk = texts[i : i + n]
                if scene_cache is None:
                    started = generation.start_uncached(self, scene, chunk)
                elif self.cached_layout() == "packed":
                    started = generation.start_packed(self, scene_cache, chunk)
                else:
                    started = generation.start_cached_rows(self, scene_cache, chunk)
                if enc is None:  # the decoder's keys do not depend on the question: once per scene
                    enc = self.decoder.encode_scene(scene.point_feat, scene.points.coord, scene.tokens,
                                                    scene.points.superpoint, obj_states=(
                                                        self.object_states_of(started.pointer, started.slots[0])
                                                        if self.config.decoder.object_states else None))
                if self.config.sentence_state == "question":  # the decoder runs first: it needs no answer
                    decoded = self.decoder.decode(self.sentence(chunk, None, started.pointer.hidden), enc,
                                                  started.words, started.word_mask)
                    bias = (None if self.grounding_scale is None else
                            self.identifier_bias([d.obj_logits for d in decoded], started.slots))
                    answers, _ = generation.greedy(self, started.steps, started.pointer, bias)
                else:
                    answers, seg = generation.greedy(self, started.steps, started.pointer)
                    decoded = self.decoder.decode(self.sentence(chunk, seg, started.pointer.hidden), enc,
                                                  started.words, started.word_mask)
                for b, (answer, dec) in enumerate(zip(answers, decoded)):
                    preds.append(generation.reconcile(self, scene, answer, started.slots[b], dec))
            return preds

    def sentence(self, texts: Sequence[str], seg_hidden: torch.Tensor, ask_hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's sentence state ``[B, H]`` at inference: the LLM's state at the [SEG] that ends the prompt
        (``ask_hidden``) or at the [SEG] that ends the answer (``seg_hidden``), per ``config.sentence_state``; in
        the ablation (``decoder_states="embeddings"``) the input embedding there, which is [SEG]'s either way."""
        c = self.config
        if c.decoder_states == "llm":
            return ask_hidden if c.sentence_state == "question" else seg_hidden
        ids = torch.full((len(texts), 1), self.vocab.seg_token_id, device=ask_hidden.device)
        return self.lm.embed(ids)[:, 0]

    def cached_layout(self) -> str:
        """``"packed"``: all questions of a batch share one copy of the prefix in one sequence, kept apart by
        a 4D attention mask (needs the ``sdpa`` or ``eager`` attention of transformers and no sliding-window
        layers, which a custom mask would not window); ``"rows"``: the prefix is copied into one row per
        question (any model)."""
        cfg = self.lm.causal_lm.config
        sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or ())
        return "packed" if getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager") and not sliding else "rows"
