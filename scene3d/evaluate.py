"""``scene3d eval CKPT [overrides]`` in the library: load a checkpoint, predict an eval split, write
``predictions.jsonl`` + ``metrics.json`` (:func:`run_checkpoint_eval`); :func:`text_report` says how the
model's tokenizer reads the split's texts. The model-agnostic inference and scoring is
:mod:`scene3d.engine.evaluate`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
from omegaconf import OmegaConf

from data_prep.synthetic import prepare_data
from scene3d.config import DataSchema, EvalConfig, expand_path, to_objects
from scene3d.data.assembly import split_rows
from scene3d.engine.evaluate import evaluate_model, spread_rows
from scene3d.llm.prompt import text_token_ids, unknown_words
from scene3d.models.loading import load_model
from scene3d.utils.io import jsonable, write_json_atomic, write_jsonl_atomic


def agreement_summary(predictions: Sequence[Mapping], per_sample: Sequence[Mapping]) -> dict:
    """With test-time turns (``eval.turns`` > 1): ``{"unanimous" | "split": {"rows", "miou"}}``, the rows whose
    orientations all gave the answer against the rest (scene3d.models.turns); {} when no row has an
    ``agreement``. On the real rescan unanimous answers scored about twice the mIoU of split ones (README)."""
    out = {}
    for name, keep in (("unanimous", lambda a: a >= 1.0), ("split", lambda a: a < 1.0)):
        ious = [float(s["iou"]) for p, s in zip(predictions, per_sample)
                if "agreement" in p and keep(float(p["agreement"]))]
        if ious:
            out[name] = {"rows": len(ious), "miou": sum(ious) / len(ious)}
    return out


def agreement_line(summary: Mapping, turns: int) -> str:
    """One printed line of :func:`agreement_summary` (``scene3d eval --turns``, bench/real_rescan.py)."""
    parts = [f"{name} {v['rows']} rows, mIoU {v['miou']:.4f}" for name, v in summary.items()]
    return (f"answers voted over {turns} quarter turns: {'; '.join(parts)} (unanimous: every orientation gave "
            "the answer)")


class CheckpointEval(NamedTuple):
    """What :func:`run_checkpoint_eval` wrote and measured."""

    out_dir: Path
    predictions: Path  # predictions.jsonl (docs/predictions_format.md)
    metrics_file: Path  # metrics.json
    metrics: dict  # summarize() output
    step: int
    checkpoint: Path
    objects: dict = {}  # {scene_id: {"source", "num_objects", ...}} (scene3d.engine.evaluate.EvalResult)
    agreement: dict = {}  # agreement_summary() with eval.turns > 1, else {}


def text_report(text_tokenizer, rows: Sequence[Mapping], max_tokens: int) -> dict:
    """How the model's tokenizer reads the rows' texts: rows with words it maps to its unknown token (and the
    most frequent such words), rows cut at ``max_tokens``. Warns (one line each) when either is non-zero, so a
    vocabulary that cannot read the data never passes silently."""
    words: Counter = Counter()
    unknown_rows = cut_rows = 0
    for r in rows:
        u = unknown_words(text_tokenizer, r["text"])
        if u:
            unknown_rows += 1
            words.update(u)
        cut_rows += text_token_ids(text_tokenizer, r["text"], max_tokens, warn=False).dropped > 0
    top = [w for w, _ in words.most_common(10)]
    if unknown_rows:
        warnings.warn(f"{unknown_rows} of {len(rows)} referring texts hold words the model's tokenizer reads as "
                      f"{text_tokenizer.unk_token} (most frequent: {', '.join(top)}); a pretrained LLM (llm=smollm2) "
                      "reads every word", stacklevel=2)
    if cut_rows:
        warnings.warn(f"{cut_rows} of {len(rows)} referring texts are longer than prompt.max_text_tokens="
                      f"{max_tokens} and were cut", stacklevel=2)
    return {"rows_with_unknown_words": unknown_rows, "unknown_words": top, "rows_cut": cut_rows}


def run_checkpoint_eval(cfg) -> CheckpointEval:
    """Load ``cfg.checkpoint`` (a checkpoint dir, its ``checkpoints/`` parent or a run dir), predict every row of
    the eval split and write ``predictions.jsonl`` + ``metrics.json`` into ``cfg.out_dir`` (default
    ``<run dir>/eval/<split>_step<step>``). ``cfg``: a composed ``eval`` config (:class:`scene3d.config.EvalConfig`).

    The data come from ``cfg.data`` when a data option was chosen, else from the checkpoint's own ``data``
    config (the synthetic benchmark is regenerated when its cache is gone).
    """
    obj: EvalConfig = cfg if isinstance(cfg, EvalConfig) else to_objects(cfg)
    device = obj.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(expand_path(obj.checkpoint), device=device)
    if obj.eval.label_model:
        loaded.model.set_label_model(expand_path(obj.eval.label_model))
    data = obj.data
    if data is None:
        saved = loaded.config.get("data")
        if not isinstance(saved, dict):
            raise ValueError(f"{loaded.path}/config.yaml has no 'data' section; choose one with data=<option>")
        data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataSchema), saved))
    ev = obj.eval
    if ev.samples is None and ev.processed_dir is None:
        prepare_data(data)
    split = split_rows(data, ev.split, ev.samples, ev.processed_dir)
    rows = spread_rows(split.rows, ev.max_samples)
    if not rows:
        raise ValueError(f"no referring rows to evaluate in the {ev.split} split of {data.name}")
    language = text_report(loaded.model.segmenter.text_tokenizer, rows, loaded.model.segmenter.config.prompt.max_text_tokens)
    res = evaluate_model(loaded.model, split.processed_dir, rows, ev.mask, ev.strict, progress=ev.progress,
                         objects=ev.objects,
                         proposal_model=expand_path(ev.proposal_model) if ev.proposal_model else None,
                         turns=ev.turns)
    ckpt = Path(loaded.path)
    src = ev.samples or (data.val if ev.split == "val" else data.train)
    # the paraphrase split (data.val=<synthetic root>/refer/val_paraphrase.jsonl) is named after its file, so
    # its default out_dir and metrics.json "split" never collide with the template split's
    name = Path(str(src)).stem if ev.samples or Path(str(src)).stem.endswith("_paraphrase") else ev.split
    out_dir = expand_path(obj.out_dir) if obj.out_dir else ckpt.parent.parent / "eval" / f"{name}_step{loaded.step}"
    pred_path, metrics_path = out_dir / "predictions.jsonl", out_dir / "metrics.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    agreement = agreement_summary(res.predictions, res.per_sample)
    write_jsonl_atomic(pred_path, res.predictions)
    write_json_atomic(metrics_path, jsonable({
        "checkpoint": str(ckpt), "step": loaded.step, "data": data.name, "split": name,
        "processed_dir": str(split.processed_dir), "mask": ev.mask, "strict": ev.strict,
        "objects": ev.objects, "proposal_model": ev.proposal_model, "turns": ev.turns, "objects_per_scene": res.objects,
        "label_model": (ev.label_model or loaded.model.config.label_model
                        if loaded.model.config.referring.object_labels else None),
        "num_samples": len(rows), "text": language, "metrics": res.metrics, "agreement": agreement,
        "per_sample": res.per_sample}))
    return CheckpointEval(out_dir, pred_path, metrics_path, res.metrics, loaded.step, ckpt, res.objects, agreement)
