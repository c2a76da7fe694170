"""Scene3DModel: points -> object tokenizer -> (gate) -> LLM head -> masks, end to end.

This composes :class:`~scene3d.tokenizer.model.ObjectTokenizer` (spconv U-Net, pooling, octree geometry,
relations, proposals) with :class:`~scene3d.models.referring.ReferringSegmenter` (identifiers, LLM, mask
decoder) and is what training, evaluation and the query API run.

Training batches come from :mod:`scene3d.data.referring` (a :class:`PointBatch` with one scene copy per
sample, plus the jsonl rows). ``forward`` returns a dict of scalar losses with ``"loss"`` the total:
the referring losses (LM, mask BCE + Dice, object BCE with hard negatives) plus the tokenizer's proposal
loss weighted by ``tokenizer_loss_weight``. Hard negatives are the same-class objects of the scene (labels
from ``objects.json``) and Sr3D ``distractors`` where the row has them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from scene3d.data.labels import clean_label
from scene3d.engine.checkpoint import load_selected, select_trainable
from scene3d.gating.adapter import GateConfig, ObjectTokenGate
from scene3d.llm.loader import fingerprint_hex
from scene3d.models.losses import name_loss
from scene3d.models.referring import Prediction, QueryBatch, ReferringConfig, ReferringSegmenter
from scene3d.models.turns import canonical_batch, check_turns, frame_texts, turned_batch, turned_texts, vote
from scene3d.structures.scene_inputs import SceneInputs
from scene3d.structures.points import PointBatch
from scene3d.tokenizer.backbone import BackboneConfig
from scene3d.tokenizer.instance_proposals import InstanceProposer, as_proposer, object_class_names
from scene3d.tokenizer.model import IN_CHANNELS, ObjectTokenizer, ObjectTokenizerConfig
from scene3d.tokenizer.proposals import ProposalConfig
from scene3d.tokenizer.relation import RelationConfig


#: what :meth:`Scene3DModel.forward` trains (:attr:`PipelineConfig.objective`)
OBJECTIVES = ("referring", "object_names")


@dataclass
class PipelineConfig:
    tokenizer: ObjectTokenizerConfig = field(default_factory=ObjectTokenizerConfig)
    referring: ReferringConfig = field(default_factory=ReferringConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    tokenizer_loss_weight: float = 0.5
    #: an instance-proposal model directory (``scene3d prep proposals``) that names the objects at inference
    #: when the prompt writes class names (``referring.object_labels``): each object gets the most probable
    #: class of its points; None: names must come from elsewhere (:meth:`Scene3DModel.set_label_model`, the
    #: CLI's ``--label-model``). Frozen, loaded when first needed, never saved in checkpoints (only this path)
    label_model: Optional[str] = None
    #: what ``forward`` trains. "referring": the referring losses plus the tokenizer's proposal loss.
    #: "object_names" (``stage=tokens``): object-token pretraining. Only the 3D tokenizer and the projector get a loss:
    #: each object's LLM input embedding against the LLM's embedding of its annotated class name
    #: (``losses.name_loss``), plus the proposal loss. The LLM never runs, so a step costs what the tokenizer
    #: costs. Chat-Scene and PLM start from object encoders pretrained on ScanNet; with none available here, this
    #: stage teaches the tokens the classes before the referring stage (``trainer.init_from``) starts from them.
    #: Measured on the real-rescan experiment, where the referring stage undid it and scored lower (README)
    objective: str = "referring"
    #: factor on the trainer's learning rate for the 3D tokenizer's weights (``tokenizer3d``; the projector
    #: and everything else keep the trainer's lr). 1: as the rest; below 1 a tokenizer pretrained by
    #: ``stage=tokens`` moves slowly; 0 keeps its weights (its batch-norm statistics still follow the data)
    tokenizer_lr_scale: float = 1.0
    #: True: every scene (training, evaluation, the API) is turned into its canonical frame before tokenizing
    #: (:func:`scene3d.data.augment.canonical_turns`: the quarter turn that puts the median of its points in the
    #: +x / +y quadrant of its xy extent), and its questions' compass words with it. The model then answers a
    #: scan the same in all four quarter turns, and two scans of one room share a frame where their point mass
    #: sits on the same side of the room. With it, ``data.rotate`` in training has no effect: every turned
    #: copy is brought back to the same frame. Masks and boxes come back in the input's frame
    canonical_frame: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 <= self.tokenizer_lr_scale <= 1.0:
            raise ValueError(f"model.tokenizer_lr_scale must be in [0, 1], got {self.tokenizer_lr_scale!r}")
        if isinstance(self.tokenizer, dict):
            t = dict(self.tokenizer)
            for key, cls in (("backbone", BackboneConfig), ("relation", RelationConfig), ("proposal", ProposalConfig)):
                if isinstance(t.get(key), dict):
                    t[key] = cls(**t[key])
            self.tokenizer = ObjectTokenizerConfig(**t)
        if isinstance(self.referring, dict):
            self.referring = ReferringConfig(**self.referring)
        if isinstance(self.gate, dict):
            self.gate = GateConfig(**self.gate)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        return cls(**d)


def class_code(label: str) -> int:
    """A stable integer for a class label (hard negatives compare classes, not names)."""
    return zlib.crc32(label.encode("utf-8")) & 0x7FFFFFFF


def build_gate(cfg: PipelineConfig, llm_dim: int):
    if not cfg.gate.enabled:
        return None
    return ObjectTokenGate(obj_dim=cfg.tokenizer.out_dim, query_dim=llm_dim, config=cfg.gate)


class Scene3DModel(nn.Module):
    def __init__(self, config: PipelineConfig) -> None:
        super().__init__()
        self.tokenizer3d = ObjectTokenizer(config.tokenizer)
        referring = dataclasses.replace(config.referring, obj_dim=config.tokenizer.out_dim,
                                        point_dim=self.tokenizer3d.backbone.out_channels)
        self.config = dataclasses.replace(config, referring=referring)
        self.segmenter = ReferringSegmenter(referring)
        gate = build_gate(self.config, self.segmenter.lm.hidden_size)
        if gate is not None:
            self.segmenter.gate = gate
        # the label model is frozen and has its own files: kept out of the module tree (not a submodule, not in
        # state_dict), like the tokenizer's semantic model
        object.__setattr__(self, "_label_model", None)

    # ---------------------------------------------------------------------------------------------------
    @property
    def label_model(self):
        """The instance-proposal model that names objects at inference (:attr:`PipelineConfig.label_model`,
        loaded on first use), or None."""
        if self._label_model is None and self.config.label_model:
            object.__setattr__(self, "_label_model", InstanceProposer.load(Path(self.config.label_model).expanduser()))
        return self._label_model

    def set_label_model(self, value) -> None:
        """Use ``value`` to name objects: an ``InstanceProposer`` or its directory, any object with
        ``point_probs(coord [N, 3], color [N, 3] 0..255, what) -> [N, 41]`` nyu40 class probabilities (a user's
        own semantic segmenter), or None (the config's ``label_model``)."""
        if value is not None and not hasattr(value, "point_probs"):
            value = as_proposer(value)
        object.__setattr__(self, "_label_model", value)

    def object_names(self, points: PointBatch, tokens) -> list:
        """Each object's class name as the label model predicts it (``[M]``, None for an object without points)."""
        model = self.label_model
        if model is None:
            raise ValueError("this model writes each object's class name into its prompt (referring.object_labels) "
                             "and needs a label model to name the objects: set model.label_model or pass "
                             "--label-model DIR (an instance-proposal model of `scene3d prep proposals`)")
        return object_class_names(model, points, tokens.point2obj, tokens.num_objects)

    def encode(self, points: PointBatch, objects: Optional[torch.Tensor] = None, names: bool = True):
        """Tokenize ``points``: returns (SceneInputs for the segmenter, the tokenizer output). With ``names``
        and a model that writes object names (``referring.object_labels``), the label model names the objects
        (:meth:`object_names`). With ``canonical_frame`` each scene is tokenized in its canonical frame: the
        result holds the turned points and ``frame_turns``, by which questions must be turned
        (:func:`scene3d.models.turns.frame_texts`); the points keep their order, so ``objects`` and masks need no
        mapping."""
        given = points
        turns = None
        if self.config.canonical_frame:
            points, turns = canonical_batch(points)
        out = self.tokenizer3d(points, objects)
        inputs = SceneInputs(out.tokens, out.point_feat, points, frame_turns=turns)
        if names and self.config.referring.object_labels:  # the label model reads the points as given
            inputs = dataclasses.replace(inputs, object_names=self.object_names(given, out.tokens))
        return inputs, out

    def forward(self, batch) -> dict:
        """``batch``: :class:`scene3d.data.referring.ReferringBatch`. Returns scalar losses, ``"loss"`` the total."""
        points = batch.points
        scene, tok_out = self.encode(points, names=False)
        encoded = scene.points  # in the frame the tokenizer saw (canonical_frame), for the proposal loss
        if self.config.objective == "object_names":
            return self._object_name_losses(batch, scene, tok_out)
        rows = batch.samples
        object_class = object_names = None
        labels = getattr(batch, "object_labels", None)
        index = getattr(batch, "scene_index", None)
        shared = None
        if self.config.referring.object_labels:  # the prompt's names: the annotated ones where the batch has them
            scene = dataclasses.replace(scene, object_names=self.annotated_names(scene.tokens, labels)
                                        if labels is not None and scene.tokens.object_ids is not None
                                        else self.object_names(points, scene.tokens))
        if index is not None:  # several questions per scene: the scene was tokenized once, spread it out
            shared, scene = scene, scene.take(index)
            labels = None if labels is None else [labels[i] for i in index]
        if labels is not None and scene.tokens.object_ids is not None:
            oids = scene.tokens.object_ids.tolist()
            object_names = self.object_labels_of(scene.tokens, labels)
            object_class = torch.tensor([class_code(f"?{int(oid)}" if name is None else name)
                                         for name, oid in zip(object_names, oids)], dtype=torch.long)
        distractors = [list(r.get("distractors") or []) for r in rows]
        anchors = [list(r.get("anchors") or []) for r in rows]
        texts = frame_texts(scene, [r["text"] for r in rows])  # one scene per row here (canonical_frame)
        mb = QueryBatch(scene=scene, texts=texts, targets=[list(r["targets"]) for r in rows],
                        distractors=distractors, anchors=anchors, object_class=object_class,
                        shared=shared, scene_index=index, object_names=object_names)
        ref = self.segmenter(mb)
        tok = self.tokenizer3d.losses(encoded, tok_out).total
        total = ref.total + self.config.tokenizer_loss_weight * tok
        return {"loss": total, "lm": ref.lm.detach(), "mask_bce": ref.mask_bce.detach(),
                "mask_dice": ref.mask_dice.detach(), "obj": ref.obj.detach(), "obj_rank": ref.obj_rank.detach(),
                "obj_sim": ref.obj_sim.detach(), "anchor": ref.anchor.detach(), "obj_name": ref.obj_name.detach(),
                "proposal": tok.detach()}

    def _object_name_losses(self, batch, scene: SceneInputs, tok_out) -> dict:
        """``objective="object_names"``: name alignment of every object with an annotated class (the names as
        the referring stage's alignment reads them) plus the proposal loss; the LLM is not run."""
        labels = getattr(batch, "object_labels", None)
        t = scene.tokens
        if labels is None or t.object_ids is None:
            raise ValueError("model.objective=object_names (stage=tokens) needs the training scenes' object labels "
                             "(objects.json) and ground-truth instances")
        names = self.object_labels_of(t, labels)
        seg = self.segmenter
        name = name_loss(seg.object_embeds(t, t.feat), names, seg.name_embeddings,
                         t.feat.new_tensor(seg.config.name_scale))
        tok = self.tokenizer3d.losses(scene.points, tok_out).total
        return {"loss": name + self.config.tokenizer_loss_weight * tok, "obj_name": name.detach(),
                "proposal": tok.detach()}

    @staticmethod
    def object_labels_of(tokens, labels: Sequence[dict]) -> list:
        """``[M]``: each object's annotated label as ``objects.json`` has it (``labels[b]``: object id -> label of
        scene ``b``), None where unknown: the names the object-name alignment and the hard negatives use."""
        return [labels[b].get(int(oid)) for b, oid in zip(tokens.obj_batch.tolist(), tokens.object_ids.tolist())]

    @staticmethod
    def annotated_names(tokens, labels: Sequence[dict]) -> list:
        """``[M]``: each object's annotated class as a sentence writes it (:func:`scene3d.data.labels.clean_label`),
        None where unknown."""
        return [None if n is None else clean_label(n) for n in Scene3DModel.object_labels_of(tokens, labels)]

    @torch.no_grad()
    def predict(self, points: PointBatch, texts: Sequence[str], objects: Optional[torch.Tensor] = None,
                use_cache: bool = True, turns: int = 1) -> list[Prediction]:
        """Answer ``texts`` on one scene. Objects come from ``objects [N]`` if given, else from
        ``points.instance`` when present, else from the tokenizer's proposals. ``turns`` > 1: the scene is also
        answered turned 1..turns-1 quarter turns (its questions' compass words with it) and each question
        keeps the answer most orientations gave (:mod:`scene3d.models.turns`)."""
        if points.batch_size != 1:
            raise ValueError(f"predict takes one scene, got {points.batch_size}")
        check_turns(turns)  # before the encoding, which a bad value would waste
        with self.eval_mode():
            if objects is None and points.instance is not None and bool((points.instance >= 0).any()):
                objects = points.instance
            scene, _ = self.encode(points, objects)
            return self.predict_encoded(scene, texts, use_cache, turns)

    @torch.no_grad()
    def predict_encoded(self, scene: SceneInputs, texts: Sequence[str], use_cache: bool = True,
                        turns: int = 1) -> list[Prediction]:
        """:meth:`predict` on a scene already encoded (one scene). With ``turns`` > 1 the turned copies are
        encoded with the objects of ``scene`` (its ``point2obj``), so every orientation has the same object
        rows, and the prompt's object names, where it writes them, are those of ``scene``."""
        check_turns(turns)
        texts = frame_texts(scene, texts)  # into the frame the scene's points are held in (canonical_frame)
        with self.eval_mode():
            answers = [self.segmenter.predict(scene, texts, use_cache=use_cache)]
            for k in range(1, turns):
                turned, _ = self.encode(turned_batch(scene.points, k), scene.tokens.point2obj, names=False)
                turned = dataclasses.replace(turned, object_names=scene.object_names)
                # turned k, then (canonical_frame) by the turned copy's own frame turns
                answers.append(self.segmenter.predict(turned, frame_texts(turned, turned_texts(texts, k)),
                                                      use_cache=use_cache))
        if turns == 1:
            return answers[0]
        ids = scene.tokens.object_ids
        return vote(answers, ids if ids is not None else torch.full((scene.tokens.num_objects,), -1))

    @contextlib.contextmanager
    def eval_mode(self):
        """Eval mode inside the block; the mode the model had is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def lr_scales(self) -> dict:
        """``{parameter-name prefix: factor}`` on the trainer's learning rate (scene3d.engine.trainer)."""
        scale = self.config.tokenizer_lr_scale
        return {} if scale == 1.0 else {"tokenizer3d.": scale}

    # ---- checkpoint hooks (scene3d.engine saves only what trains) ---------------------------------------
    def trainable_state_dict(self) -> dict:
        """What a checkpoint stores: every trainable tensor (and the buffers of trainable modules). A
        tiny in-memory LLM (``llm.path`` unset) is stored whole, so a checkpoint never depends on
        re-creating random weights; a real LLM's frozen base is reloaded from its local directory."""
        whole_llm = self.config.referring.llm.path is None
        return select_trainable(self, buffer=_is_buffer_of_trainable,
                                also=lambda k: k == FINGERPRINT_KEY or (whole_llm and k.startswith("segmenter.lm.")))

    def load_trainable_state_dict(self, state: dict) -> None:
        own = self.state_dict()
        if FINGERPRINT_KEY in own:  # adapters only fit the base they were trained on
            theirs = state.get(FINGERPRINT_KEY)
            mine = fingerprint_hex(own[FINGERPRINT_KEY])
            if theirs is None:
                raise ValueError("checkpoint has no base-model fingerprint: it was not trained on "
                                 f"{self.config.referring.llm.path!r}")
            theirs = fingerprint_hex(theirs)
            if theirs != mine:
                raise ValueError(f"checkpoint was trained on a different base model than "
                                 f"{self.config.referring.llm.path!r} (base weights sha256 {theirs[:12]}... in the "
                                 f"checkpoint, {mine[:12]}... here; num_layers and the model files must match)")
        load_selected(self, state, set(self.trainable_state_dict()))


#: Where the base LLM's weight fingerprint sits in a checkpoint (:func:`scene3d.llm.loader.weights_fingerprint`).
FINGERPRINT_KEY = "segmenter.lm.base_fingerprint"


def _is_buffer_of_trainable(key: str, trainable: set) -> bool:
    """Persistent buffers of modules whose parameters train: batch-norm statistics, and the gate's anneal step
    (``segmenter.gate.step``), so a resumed gated run continues its keep-ratio schedule instead of restarting
    it. (A frozen LLM's buffers belong to modules without trainable parameters, so they stay out.)"""
    prefix = key.rsplit(".", 1)[0]
    return any(n.startswith(prefix + ".") for n in trainable)
