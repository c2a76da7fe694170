"""Inference over a referring split with a trained model: prediction rows + the metrics of :mod:`scene3d.metrics`.

=================================  ===========================================================================
:func:`evaluate_model`             model + processed scenes + referring rows -> :class:`EvalResult` (one mask)
:func:`evaluate_model_masks`       the same for several masks of one inference pass (bench: identifier-only /
                                   decoder-only / reconciled)
:func:`prediction_row`             one :class:`~scene3d.models.referring.Prediction` -> one row of
                                   ``docs/predictions_format.md``
:class:`ValidationFn`              the trainer's ``eval_fn``: mIoU / Acc@0.25 / Acc@0.5 on a few fixed rows
:func:`spread_rows`                a deterministic subset of rows spread over the whole file
=================================  ===========================================================================

Masks (``mask=``): ``reconciled`` is :attr:`Prediction.point_mask` (the objects the answer names, or the
decoder's object scores when it names none), written as one mask per chosen object; ``identifier`` is
:attr:`Prediction.identifier_mask` and ``decoder`` the dense :attr:`Prediction.decoder_mask`, each written
as one mask. Scenes are evaluated whole (every point of ``coord.npy``, no subsampling) so mask indices are
indices into the processed scene.

Objects (``objects=``): ``gt`` takes the scene's annotated instances (``instance.npy``), as in training: the
numbers measure grounding and segmentation given ground-truth instances. ``proposals`` takes the geometric
proposals of :func:`scene3d.tokenizer.geometric_proposals.proposal_objects` instead (computed from
``coord`` / ``color`` alone; object tokens are pooled from the proposal masks): a predicted mask is then the
points of the proposals the model chose, and it is still scored against the ground-truth target points (as
Chat-Scene evaluates on Mask3D proposals), so a proposal that cuts or swells the target costs IoU. With
``proposal_model`` the proposals are the learned instance proposals of
:mod:`scene3d.tokenizer.instance_proposals` (trained with ``scene3d prep proposals``) instead.
``EvalResult.objects`` says per scene where the objects came from and how many there were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from scene3d.data.augment import check_turns
from scene3d.data.referring import scene_to_tensors
from scene3d.data.scene import load_processed_scene
from scene3d.metrics import evaluate_rows
from scene3d.structures.points import PointBatch

MASK_SOURCES = ("reconciled", "identifier", "decoder")
#: where evaluation takes the objects from (module docstring)
OBJECT_SOURCES = ("gt", "proposals")
#: The figures the trainer logs from :class:`ValidationFn` (keys of ``summarize(...)["overall"]``).
VAL_KEYS = ("miou", "acc@0.25", "acc@0.5")


class EvalResult(NamedTuple):
    """What :func:`evaluate_model` returns.

    ============  ==========================================================================================
    predictions   one row per referring row (docs/predictions_format.md; ``pred_masks`` point indices)
    metrics       :func:`scene3d.metrics.summarize` output: ``{group: {"count", "miou", "acc@0.25", ...}}``
    per_sample    ``[{"dataset", "scene_id", "ann_id", "iou", "box_iou", "box_f1@k", "mask_f1@k"}]`` in row order
    rows          the referring rows that were evaluated
    objects       ``{scene_id: {"source": "instances" | "geometric", "num_objects": K, ...}}``; proposals also
                  give ``num_candidates`` (overlapping proposals before they were made disjoint)
    ============  ==========================================================================================
    """

    predictions: list
    metrics: dict
    per_sample: list
    rows: list
    objects: dict = {}


def _key(row: Mapping) -> tuple:
    return (str(row["dataset"]), str(row["scene_id"]), str(row["ann_id"]))


def prediction_row(row: Mapping, pred, instance: np.ndarray, mask: str = "reconciled") -> dict:
    """One prediction row (docs/predictions_format.md) for referring ``row`` from a ``Prediction`` over the
    whole scene; ``instance [N]`` is the scene's ``instance.npy`` (splits the reconciled mask per object)."""
    if mask not in MASK_SOURCES:
        raise ValueError(f"mask must be one of {MASK_SOURCES}, got {mask!r}")
    out = {"dataset": row["dataset"], "scene_id": row["scene_id"], "ann_id": row["ann_id"]}
    if mask == "reconciled":
        point_mask = pred.point_mask.cpu().numpy()
        if point_mask.shape != instance.shape:
            raise ValueError(f"prediction for {_key(row)} covers {point_mask.shape[0]} points, the scene has "
                             f"{instance.shape[0]}")
        ids = pred.object_ids.cpu().tolist()
        scores = pred.obj_scores.cpu()
        objs = pred.objects.cpu().tolist()
        if ids and all(i >= 0 for i in ids):  # one mask per named object (instances are exact)
            masks = [np.flatnonzero(point_mask & (instance == i)) for i in ids]
            out["pred_masks"] = [m.tolist() for m in masks if m.size]
            out["scores"] = [round(float(scores[o]), 4) for o, m in zip(objs, masks) if m.size]
        else:
            out["pred_masks"] = [np.flatnonzero(point_mask).tolist()] if point_mask.any() else []
        return out
    m = (pred.identifier_mask if mask == "identifier" else pred.decoder_mask).cpu().numpy()
    if m.shape != instance.shape:
        raise ValueError(f"prediction for {_key(row)} covers {m.shape[0]} points, the scene has {instance.shape[0]}")
    out["pred_masks"] = [np.flatnonzero(m).tolist()] if m.any() else []
    return out


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_objects(objects: str, where: str = "objects") -> str:
    """``objects`` if it is one of :data:`OBJECT_SOURCES`, else a one-line ``ValueError`` naming ``where``."""
    if objects not in OBJECT_SOURCES:
        raise ValueError(f"{where}: expected one of {', '.join(OBJECT_SOURCES)}, got {objects!r}")
    return objects


def evaluate_model_masks(model, processed_dir, rows: Sequence[Mapping], masks: Iterable[str] = ("reconciled",),
                         strict: bool = False, progress: bool = True, objects: str = "gt",
                         proposal_model=None, turns: int = 1) -> dict:
    """Run ``model.predict`` on every row (scene by scene, each scene loaded once) and score each of ``masks``.
    ``objects``: ``gt`` (instances) or ``proposals`` (geometric proposals, or with ``proposal_model`` (an
    :class:`~scene3d.tokenizer.instance_proposals.InstanceProposer` or its directory) the learned instance
    proposals; module docstring). ``turns`` > 1: each question is also answered on the scene turned 1..turns-1
    quarter turns and keeps the answer most orientations gave (:mod:`scene3d.models.turns`; the model's
    ``predict`` must take ``turns``).

    ``model``: a :class:`~scene3d.models.pipeline.Scene3DModel` (anything with ``predict(points, texts)``).
    Returns ``{mask: EvalResult}``. Rows must carry ``dataset``, ``scene_id``, ``ann_id``, ``text``, ``targets``.
    """
    check_objects(objects)
    if proposal_model is not None and objects != "proposals":
        raise ValueError(f"proposal_model is used with objects='proposals' only, got objects={objects!r}")
    if objects == "proposals":
        # open3d / scipy / spconv proposals load with this mode only
        from scene3d.tokenizer.instance_proposals import as_proposer, scan_objects

        proposal_model = as_proposer(proposal_model)
    masks = list(masks)
    bad = [m for m in masks if m not in MASK_SOURCES]
    if bad or not masks:
        raise ValueError(f"masks must be a non-empty subset of {MASK_SOURCES}, got {masks}")
    rows = list(rows)
    if not rows:
        raise ValueError("no referring rows to evaluate")
    processed_dir = Path(processed_dir)
    if not processed_dir.is_dir():
        raise FileNotFoundError(f"processed scenes directory not found: {processed_dir}")
    for i, r in enumerate(rows):
        missing = [k for k in ("dataset", "scene_id", "ann_id", "text", "targets") if k not in r]
        if missing:
            raise ValueError(f"referring row {i} lacks {missing}")
    # a model without test-time turns (anything with predict(points, texts)) is still called as before
    tta = {} if check_turns(turns, "eval.turns") == 1 else {"turns": turns}
    keys = [_key(r) for r in rows]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate referring row {dup}: (dataset, scene_id, ann_id) must be unique")
    by_scene: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_scene.setdefault(r["scene_id"], []).append(i)
    device = _device_of(model)
    preds: dict[str, list] = {m: [None] * len(rows) for m in masks}
    sources: dict[str, dict] = {}
    for sid in tqdm(list(by_scene), desc="eval", unit="scene", disable=not progress):
        scene = load_processed_scene(processed_dir / sid)
        points = PointBatch.from_list([scene_to_tensors(scene)], scene_ids=[sid]).to(device)
        idx = by_scene[sid]
        texts = [rows[i]["text"] for i in idx]
        if objects == "proposals":
            prop = scan_objects(scene.coord, scene.color, proposal_model, what=f"scene {sid!r}")
            if prop.num_proposals == 0:
                raise ValueError(f"scene {sid!r} ({len(scene.coord)} points): the {prop.source} proposals found no "
                                 "object; it cannot be evaluated with objects=proposals")
            sources[sid] = {"source": prop.source, "num_objects": prop.num_proposals,
                            "num_candidates": prop.num_candidates}
            split = prop.labels  # a reconciled mask splits per chosen proposal
            out = model.predict(points, texts, objects=torch.from_numpy(split).to(device), **tta)
        else:
            split = scene.instance
            sources[sid] = {"source": "instances", "num_objects": int(len(np.unique(split[split >= 0])))}
            out = model.predict(points, texts, **tta)
        for i, p in zip(idx, out):
            for m in masks:
                preds[m][i] = prediction_row(rows[i], p, split, m)
                if tta:  # the share of orientations that gave this answer (docs/predictions_format.md)
                    preds[m][i]["agreement"] = round(float(p.agreement), 4)
    results = {}
    for m in masks:
        table = {k: {**p, "_where": f"prediction {k}"} for k, p in zip(keys, preds[m])}
        # ``strict`` is deprecated and changes nothing: the default conventions already count point-mask
        # Acc@k as IoU > k (3D-STMN, MDIN) and box metrics as >= (ScanRefer, M3DRef-CLIP); scene3d.metrics
        ev = evaluate_rows(table, rows, processed_dir, progress=False)
        results[m] = EvalResult(preds[m], ev.metrics, ev.per_sample, rows, sources)
    return results


def evaluate_model(model, processed_dir, rows: Sequence[Mapping], mask: str = "reconciled", strict: bool = False,
                   progress: bool = True, objects: str = "gt", proposal_model=None, turns: int = 1) -> EvalResult:
    """:func:`evaluate_model_masks` for one mask."""
    return evaluate_model_masks(model, processed_dir, rows, (mask,), strict=strict, progress=progress,
                                objects=objects, proposal_model=proposal_model, turns=turns)[mask]


def spread_rows(rows: Sequence[Mapping], max_samples: Optional[int]) -> list:
    """``max_samples`` rows evenly spaced over ``rows`` (all of them when None or larger), order kept."""
    rows = list(rows)
    if max_samples is None or max_samples >= len(rows):
        return rows
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    idx = np.unique(np.linspace(0, len(rows) - 1, max_samples).round().astype(int))
    return [rows[i] for i in idx]


class ValidationFn:
    """``eval_fn(model, step)`` for :class:`~scene3d.engine.trainer.Trainer`: ``{"miou", "acc@0.25", "acc@0.5"}``
    of ``mask`` on fixed ``rows`` (every rank evaluates the same rows; no cross-rank reduction needed)."""

    def __init__(self, processed_dir, rows: Sequence[Mapping], mask: str = "reconciled", strict: bool = False):
        self.processed_dir = Path(processed_dir)
        self.rows = list(rows)
        if not self.rows:
            raise ValueError("ValidationFn needs at least one referring row")
        self.mask, self.strict = mask, strict

    def __call__(self, model, step: int) -> dict:
        res = evaluate_model(model, self.processed_dir, self.rows, self.mask, self.strict, progress=False)
        overall = res.metrics["overall"]
        return {k: overall[k] for k in VAL_KEYS}
