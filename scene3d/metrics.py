"""Referring-segmentation metrics: point mIoU, Acc@k, Multi3DRefer F1@k, box Acc@k.

Threshold convention: a sample counts at threshold ``k`` when ``IoU >= k``, as ScanRefer's and
Multi3DRefer's evaluators count; ``strict=True`` uses ``IoU > k`` (the 3D-STMN / TGNN code).

Per sample (all masks are sets of point indices into the processed scene, ``coord.npy`` order):

==================  ==========================================================================================
quantity            definition
==================  ==========================================================================================
point IoU           |P ∩ G| / |P ∪ G| with P the union of the predicted masks, G the union of the targets'
                    points; 1.0 when both are empty (a correct "nothing"), 0.0 when exactly one is empty
Acc@k               IoU >= k (or > k when strict)
F1@k (Multi3DRefer) IoU matrix between the predicted masks and the target masks, Hungarian matching that
                    maximises the total IoU (scipy ``linear_sum_assignment``); TP = matched pairs with
                    IoU >= k; F1 = 2 TP / (#pred + #targets). Zero targets: F1 = 1 when nothing is predicted,
                    0 otherwise; targets but no prediction: 0 (Multi3DRefer's ``evaluate_one_query``)
box IoU             3D IoU of axis-aligned boxes: the predicted union mask's box vs the target's box, both
                    from the points' coordinates; 0 when the prediction is empty; only single-target samples
==================  ==========================================================================================

Averages are over samples; ``summarize`` reports overall and per group (unique / multiple, Multi3DRefer
``eval_type``, Nr3D/Sr3D easy / hard and view-dependent / independent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

THRESHOLDS = (0.25, 0.5)


def _passes(iou, threshold: float, strict: bool):
    return iou > threshold if strict else iou >= threshold


def as_mask(indices, num_points: int, what: str = "mask") -> np.ndarray:
    """Point indices (list / int array, duplicates allowed) or a bool mask [N] -> bool mask [N]."""
    a = np.asarray(indices)
    if a.dtype == bool:
        if a.shape != (num_points,):
            raise ValueError(f"{what}: bool mask of shape {a.shape}, expected ({num_points},)")
        return a
    a = a.reshape(-1)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}: point indices must be integers, got {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= num_points):
        raise ValueError(f"{what}: point indices must lie in [0, {num_points}), got [{a.min()}, {a.max()}]")
    m = np.zeros(num_points, dtype=bool)
    m[a.astype(np.int64)] = True
    return m


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two bool masks [N]; 1.0 when both are empty."""
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & gt) / union)


def mask_iou_matrix(preds: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU matrix [P, G] of bool masks preds [P, N] and gts [G, N] (empty vs empty counts 0 here: matching
    is only between real masks)."""
    p = preds.astype(np.float64)
    g = gts.astype(np.float64)
    inter = p @ g.T                                            # (P, G), exact integer counts in float64
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return iou


class Box(NamedTuple):
    lo: np.ndarray  # [3]
    hi: np.ndarray  # [3]


def points_box(coord: np.ndarray, mask: np.ndarray) -> Optional[Box]:
    """Axis-aligned box of ``coord[mask]``; None for an empty mask."""
    if not mask.any():
        return None
    pts = coord[mask]
    return Box(pts.min(0), pts.max(0))


def box_iou(a: Optional[Box], b: Optional[Box]) -> float:
    """3D IoU of two axis-aligned boxes; 0 when either is missing or both have zero volume."""
    if a is None or b is None:
        return 0.0
    inter = np.prod(np.clip(np.minimum(a.hi, b.hi) - np.maximum(a.lo, b.lo), 0.0, None))
    union = np.prod(a.hi - a.lo) + np.prod(b.hi - b.lo) - inter
    return float(inter / union) if union > 0 else 0.0


def box_iou_matrix(preds: Sequence[Optional[Box]], gts: Sequence[Optional[Box]]) -> np.ndarray:
    return np.array([[box_iou(p, g) for g in gts] for p in preds], dtype=np.float64).reshape(len(preds), len(gts))


def f1_from_iou(iou: np.ndarray, threshold: float, strict: bool = False) -> float:
    """Multi3DRefer F1 of one sample from its IoU matrix [P, G] (see module doc)."""
    n_pred, n_gt = iou.shape
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    rows, cols = linear_sum_assignment(iou, maximize=True)
    tp = int(np.count_nonzero(_passes(iou[rows, cols], threshold, strict)))
    return 2.0 * tp / (n_pred + n_gt)


@dataclass(frozen=True)
class SampleScore:
    """Scores of one sample (``box_iou`` is None for samples without exactly one target)."""

    iou: float
    box_iou: Optional[float]
    f1: dict          # threshold -> mask-IoU F1
    box_f1: dict      # threshold -> box-IoU F1


def score_sample(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], coord: Optional[np.ndarray],
                 strict: bool = False, thresholds: Sequence[float] = THRESHOLDS) -> SampleScore:
    """Score one sample. ``pred_masks`` / ``gt_masks``: bool masks [N] (one per predicted object / target);
    ``coord`` [N, 3] (for boxes; None skips box metrics). Empty predicted masks are ignored (no object)."""
    preds = [m for m in pred_masks if m.any()]
    n = len(coord) if coord is not None else (len(gt_masks[0]) if gt_masks else (len(preds[0]) if preds else 0))
    union_p = np.any(preds, axis=0) if preds else np.zeros(n, dtype=bool)
    union_g = np.any(gt_masks, axis=0) if gt_masks else np.zeros(n, dtype=bool)
    iou = mask_iou(union_p, union_g)
    pm = np.stack(preds) if preds else np.zeros((0, n), dtype=bool)
    gm = np.stack(list(gt_masks)) if gt_masks else np.zeros((0, n), dtype=bool)
    m_iou = mask_iou_matrix(pm, gm)
    f1 = {t: f1_from_iou(m_iou, t, strict) for t in thresholds}
    b_iou, box_f1 = None, {}
    if coord is not None:
        pboxes = [points_box(coord, m) for m in preds]
        gboxes = [points_box(coord, m) for m in gt_masks]
        b_mat = box_iou_matrix(pboxes, gboxes)
        box_f1 = {t: f1_from_iou(b_mat, t, strict) for t in thresholds}
        if len(gt_masks) == 1:
            b_iou = box_iou(points_box(coord, union_p), gboxes[0])
    return SampleScore(iou, b_iou, f1, box_f1)


def sample_groups(row: Mapping) -> list[str]:
    """The evaluation groups of a referring row (besides "overall")."""
    groups = []
    if row.get("unique") is not None:
        groups.append("unique" if row["unique"] else "multiple")
    if row.get("eval_type"):
        groups.append(row["eval_type"])
    if row.get("easy") is not None:
        groups.append("easy" if row["easy"] else "hard")
    if row.get("view_dep") is not None:
        groups.append("view_dep" if row["view_dep"] else "view_indep")
    return groups


def summarize(scores: Sequence[SampleScore], groups: Sequence[Sequence[str]], strict: bool = False,
              thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """{group: {"count", "miou", "acc@k", "f1@k", "box_acc@k" (single-target samples), "box_f1@k"}}."""
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores but {len(groups)} group lists")
    members: dict[str, list[int]] = {"overall": list(range(len(scores)))}
    for i, gs in enumerate(groups):
        for g in gs:
            members.setdefault(g, []).append(i)
    out = {}
    for g, idx in members.items():
        sel = [scores[i] for i in idx]
        ious = np.array([s.iou for s in sel], dtype=np.float64)
        res = {"count": len(sel), "miou": float(ious.mean()) if len(sel) else float("nan")}
        for t in thresholds:
            res[f"acc@{t}"] = float(np.mean(_passes(ious, t, strict))) if len(sel) else float("nan")
            res[f"f1@{t}"] = float(np.mean([s.f1[t] for s in sel])) if sel else float("nan")
        boxed = [s.box_iou for s in sel if s.box_iou is not None]
        res["box_count"] = len(boxed)
        for t in thresholds:
            res[f"box_acc@{t}"] = (float(np.mean(_passes(np.array(boxed), t, strict))) if boxed
                                   else float("nan"))
            bf = [s.box_f1[t] for s in sel if s.box_f1]
            res[f"box_f1@{t}"] = float(np.mean(bf)) if bf else float("nan")
        out[g] = res
    return out


# ------------------------------------------------------------------------------------------------------
# Files: predictions jsonl + referring jsonl + processed scenes (docs/predictions_format.md)
# ------------------------------------------------------------------------------------------------------
def _key(row: Mapping) -> tuple:
    return (str(row["dataset"]), str(row["scene_id"]), str(row["ann_id"]))


def read_predictions(path: str | Path) -> dict[tuple, dict]:
    """Predictions jsonl -> {(dataset, scene_id, ann_id): row}; duplicates and malformed rows are errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions not found: {path}")
    out = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path} line {i + 1}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            missing = [k for k in ("dataset", "scene_id", "ann_id") if k not in r]
            if missing:
                raise ValueError(f"{where}: missing keys {missing}")
            if ("pred_masks" in r) == ("pred_object_ids" in r):
                raise ValueError(f"{where}: give exactly one of pred_masks / pred_object_ids")
            field = "pred_masks" if "pred_masks" in r else "pred_object_ids"
            if not isinstance(r[field], list):
                raise ValueError(f"{where}: {field} must be a list")
            if _key(r) in out:
                raise ValueError(f"{where}: duplicate prediction for {_key(r)}")
            out[_key(r)] = {**r, "_where": where}
    return out


class SceneArrays(NamedTuple):
    coord: np.ndarray     # [N, 3] float
    instance: np.ndarray  # [N] int, -1 unannotated


def load_scene_arrays(processed_dir: str | Path, scene_id: str) -> SceneArrays:
    d = Path(processed_dir) / scene_id
    paths = {k: d / f"{k}.npy" for k in ("coord", "instance")}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"processed scene array not found: {p}")
    coord = np.load(paths["coord"], allow_pickle=False)
    instance = np.load(paths["instance"], allow_pickle=False)
    if coord.ndim != 2 or coord.shape[1] != 3 or instance.shape != (coord.shape[0],):
        raise ValueError(f"{d}: coord {coord.shape} and instance {instance.shape} do not match ([N,3], [N])")
    if not np.isfinite(coord).all():
        raise ValueError(f"{paths['coord']}: non-finite coordinates")
    return SceneArrays(coord, instance)


class Evaluation(NamedTuple):
    metrics: dict           # summarize() output
    per_sample: list        # [{"dataset", "scene_id", "ann_id", "iou", "box_iou", "f1@k"...}]
    missing: int            # referring rows without a prediction (scored as empty predictions)


def evaluate_rows(predictions: Mapping[tuple, dict], gt_rows: Sequence[Mapping], processed_dir: str | Path,
                  strict: bool = False, allow_missing: bool = False, progress: bool = True) -> Evaluation:
    """Score predictions against referring rows using the processed scenes' ``instance.npy`` / ``coord.npy``.

    A referring row without a prediction is an error unless ``allow_missing`` (then it is an empty prediction);
    a prediction matching no referring row is always an error.
    """
    gt_keys = {_key(r) for r in gt_rows}
    extra = [k for k in predictions if k not in gt_keys]
    if extra:
        raise ValueError(f"{len(extra)} predictions match no referring row, e.g. {extra[:3]}")
    missing = [_key(r) for r in gt_rows if _key(r) not in predictions]
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} referring rows have no prediction, e.g. {missing[:3]} "
                         "(allow_missing=True scores them as empty predictions)")
    by_scene: dict[str, list[int]] = {}
    for i, r in enumerate(gt_rows):
        by_scene.setdefault(r["scene_id"], []).append(i)
    scores: list = [None] * len(gt_rows)
    for sid in tqdm(sorted(by_scene), desc="eval scenes", disable=not progress, unit="scene"):
        arr = load_scene_arrays(processed_dir, sid)
        n = len(arr.coord)
        present = set(np.unique(arr.instance).tolist())
        for i in by_scene[sid]:
            r = gt_rows[i]
            unknown = [t for t in r["targets"] if t not in present]
            if unknown:
                raise ValueError(f"{sid} ann {r['ann_id']}: target objects {unknown} have no points in "
                                 f"{processed_dir}/{sid}/instance.npy")
            gt = [arr.instance == t for t in r["targets"]]
            p = predictions.get(_key(r))
            if p is None:
                pred = []
            elif "pred_masks" in p:
                pred = [as_mask(m, n, f"{p['_where']} pred_masks[{j}]") for j, m in enumerate(p["pred_masks"])]
            else:
                bad = [o for o in p["pred_object_ids"] if not isinstance(o, int) or o not in present]
                if bad:
                    raise ValueError(f"{p['_where']}: pred_object_ids {bad} are not objects of {sid}")
                pred = [arr.instance == o for o in p["pred_object_ids"]]
            scores[i] = score_sample(pred, gt, arr.coord, strict=strict)
    groups = [sample_groups(r) for r in gt_rows]
    per_sample = [{"dataset": r["dataset"], "scene_id": r["scene_id"], "ann_id": r["ann_id"], "iou": s.iou,
                   "box_iou": s.box_iou, **{f"f1@{t}": v for t, v in s.f1.items()}}
                  for r, s in zip(gt_rows, scores)]
    return Evaluation(summarize(scores, groups, strict=strict), per_sample, len(missing))


def evaluate_files(predictions: str | Path, gt: str | Path, processed_dir: str | Path, strict: bool = False,
                   allow_missing: bool = False, progress: bool = True) -> Evaluation:
    """``scene3d eval PREDICTIONS.jsonl --gt REFER.jsonl --processed DIR`` in the library."""
    from data_prep.refer import read_refer_jsonl

    return evaluate_rows(read_predictions(predictions), read_refer_jsonl(gt), processed_dir, strict=strict,
                         allow_missing=allow_missing, progress=progress)


def format_metrics(metrics: Mapping[str, Mapping], keys: Iterable[str] = ("count", "miou", "acc@0.25", "acc@0.5",
                                                                         "f1@0.25", "f1@0.5", "box_acc@0.25",
                                                                         "box_acc@0.5")) -> str:
    """A plain-text table of :func:`summarize` output (one line per group)."""
    keys = list(keys)
    lines = ["group".ljust(12) + "".join(k.rjust(13) for k in keys)]
    for g, res in metrics.items():
        cells = [f"{res[k]:13d}" if isinstance(res[k], int) else f"{res[k]:13.4f}" for k in keys]
        lines.append(g.ljust(12) + "".join(cells))
    return "\n".join(lines)
