"""Referring-segmentation metrics: point mIoU, Acc@k, Multi3DRefer F1@k, box Acc@k.

Each metric counts its thresholds as the evaluator whose published tables it is compared with
(:class:`Conventions`; peer snapshots 3D-STMN b21fff2, MDIN 8763afb, ScanRefer 9d74830, M3DRef-CLIP babfcc4):

==================  ============  =========================================================================
metric              default       follows
==================  ============  =========================================================================
point-mask Acc@k    IoU > k       3D-STMN ``tools/test.py``, MDIN ``tools/test_3dgres.py`` (3D-RES tables)
box Acc@k           IoU >= k      ScanRefer's evaluator, M3DRef-CLIP ``evaluation/scanrefer_evaluator.py``
box F1@k            IoU >= k      M3DRef-CLIP ``evaluation/multi3drefer_evaluator.py`` (the benchmark's F1)
mask F1@k           IoU >= k      the same formula on point masks (scene3d's; no published evaluator)
multi-mask box      first mask    M3DRef-CLIP's ScanRefer evaluator scores ``aabb_bound[0]``
==================  ============  =========================================================================

Per sample (all masks are sets of point indices into the processed scene, ``coord.npy`` order):

==================  ==========================================================================================
quantity            definition
==================  ==========================================================================================
point IoU           |P ∩ G| / |P ∪ G| with P the union of the predicted masks, G the union of the targets'
                    points; 1.0 when both are empty (a correct "nothing"), 0.0 when exactly one is empty
F1@k (Multi3DRefer) IoU matrix [#pred, #targets] (box IoU for ``box_f1``, mask IoU for ``mask_f1``) padded
                    with zeros to a square, matched by ``linear_sum_assignment(-iou)`` (M3DRef-CLIP's
                    ``evaluate_one_query``, so ties pair as there); TP = matched pairs passing k;
                    F1 = 2 TP / (#pred + #targets). No targets: 1 when nothing is predicted, 0 otherwise;
                    targets but no prediction: 0. A row has no targets when its ``targets`` list is empty
                    (M3DRef-CLIP reads ``eval_type`` zt_*; prep refer writes both consistently)
box IoU             3D IoU of axis-aligned boxes spanned by the points (float64, no epsilon): the first
                    non-empty predicted mask's box (or the union's, ``multi_mask_box="union"``) vs the
                    target's; 0 when nothing is predicted; only single-target samples
==================  ==========================================================================================

Averages are over samples; ``summarize`` reports overall and per group (unique / multiple, Multi3DRefer
``eval_type``, Nr3D/Sr3D easy / hard and view-dependent / independent).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from data_prep.refer import read_refer_jsonl
from scene3d.data.scene import load_scene_arrays

THRESHOLDS = (0.25, 0.5)

#: Spellings of the two threshold comparisons (``gt`` / ``ge`` spare the shell's quoting of ``>``).
OPS = {">": ">", "gt": ">", ">=": ">=", "ge": ">="}
MULTI_MASK_BOXES = ("first", "union")


def parse_op(text: str, what: str = "op") -> str:
    """``">"`` / ``"gt"`` -> ``">"``; ``">="`` / ``"ge"`` -> ``">="``; anything else is a ValueError naming ``what``."""
    op = OPS.get(str(text).strip())
    if op is None:
        raise ValueError(f"{what}: expected '>' (gt) or '>=' (ge), got {text!r}")
    return op


def passes(iou, threshold: float, op: str):
    """``iou > threshold`` or ``iou >= threshold`` (scalars or arrays)."""
    return np.greater(iou, threshold) if op == ">" else np.greater_equal(iou, threshold)


@dataclass(frozen=True)
class Conventions:
    """How each metric counts its thresholds and which box a multi-mask prediction gets (see module doc).

    ==============  =====================================================================================
    mask_acc        point-mask Acc@k: ``">"`` (3D-STMN, MDIN) or ``">="``
    box_acc         box Acc@k: ``">="`` (ScanRefer, M3DRef-CLIP) or ``">"``
    f1              box F1@k and mask F1@k: ``">="`` (M3DRef-CLIP) or ``">"``
    multi_mask_box  box of a single-target row with several predicted masks: ``"first"`` (M3DRef-CLIP)
                    or ``"union"`` (the box of all predicted points)
    ==============  =====================================================================================
    """

    mask_acc: str = ">"
    box_acc: str = ">="
    f1: str = ">="
    multi_mask_box: str = "first"

    def __post_init__(self) -> None:
        for name in ("mask_acc", "box_acc", "f1"):
            object.__setattr__(self, name, parse_op(getattr(self, name), name))
        if self.multi_mask_box not in MULTI_MASK_BOXES:
            raise ValueError(f"multi_mask_box: expected one of {MULTI_MASK_BOXES}, got {self.multi_mask_box!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line naming each convention and, where it is the default, the evaluator it follows."""
        d = Conventions()

        def src(name: str, peers: str) -> str:
            return peers if getattr(self, name) == getattr(d, name) else "not the default"

        box = "the first predicted mask's box" if self.multi_mask_box == "first" else "the box of all masks"
        return (f"point-mask Acc@k: IoU {self.mask_acc} k ({src('mask_acc', '3D-STMN, MDIN')}); "
                f"box Acc@k: IoU {self.box_acc} k ({src('box_acc', 'ScanRefer, M3DRef-CLIP')}) "
                f"on {box} ({src('multi_mask_box', 'M3DRef-CLIP')}); "
                f"F1@k: IoU {self.f1} k ({src('f1', 'M3DRef-CLIP')}), pairs as M3DRef-CLIP")


def _check_thresholds(thresholds: Sequence[float]) -> tuple:
    t = tuple(float(x) for x in thresholds)
    if not t or any(not 0.0 < x <= 1.0 for x in t):
        raise ValueError(f"thresholds must lie in (0, 1], got {tuple(thresholds)}")
    return t


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
    pts = np.asarray(coord[mask], dtype=np.float64)   # float64 boxes whatever the scene's dtype (module doc)
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


def match(iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi3DRefer's pairing of predictions (rows of ``iou`` [P, G]) with targets (columns), as M3DRef-CLIP's
    ``evaluate_one_query`` does it: pad with zeros to a square, ``linear_sum_assignment`` on ``-iou``. The total
    IoU equals that of the rectangular maximisation, but ties pair the same way as there (so the TP count
    agrees). Returns the (pred, target) indices of the real pairs, rows ascending."""
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2:
        raise ValueError(f"iou: expected a [P, G] matrix, got shape {iou.shape}")
    p, g = iou.shape
    square = np.zeros((max(p, g),) * 2, dtype=np.float64)
    square[:p, :g] = iou
    rows, cols = linear_sum_assignment(-square)
    real = (rows < p) & (cols < g)          # padded pairs have IoU 0 and never pass a threshold > 0
    return rows[real], cols[real]


def f1_from_iou(iou: np.ndarray, threshold: float, op: str = ">=") -> float:
    """Multi3DRefer F1 of one sample from its IoU matrix [P, G] (see module doc)."""
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2:
        raise ValueError(f"iou: expected a [P, G] matrix, got shape {iou.shape}")
    n_pred, n_gt = iou.shape
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    rows, cols = match(iou)
    tp = int(np.count_nonzero(passes(iou[rows, cols], threshold, parse_op(op))))
    return 2.0 * tp / (n_pred + n_gt)


@dataclass(frozen=True)
class SampleScore:
    """Scores of one sample (``box_iou`` is None for samples without exactly one target or without coordinates;
    ``box_f1`` is empty without coordinates)."""

    iou: float
    box_iou: Optional[float]
    mask_f1: dict     # threshold -> F1 on mask IoU
    box_f1: dict      # threshold -> F1 on box IoU (the Multi3DRefer benchmark's)
    conventions: Conventions = Conventions()


def score_sample(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], coord: Optional[np.ndarray],
                 conventions: Conventions = Conventions(), thresholds: Sequence[float] = THRESHOLDS) -> SampleScore:
    """Score one sample. ``pred_masks`` / ``gt_masks``: bool masks [N] (one per predicted object / target, the
    predictions best first); ``coord`` [N, 3] (for boxes; None skips box metrics). Empty predicted masks are
    ignored (no object)."""
    thresholds = _check_thresholds(thresholds)
    preds = [m for m in pred_masks if m.any()]
    n = len(coord) if coord is not None else (len(gt_masks[0]) if gt_masks else (len(preds[0]) if preds else 0))
    union_p = np.any(preds, axis=0) if preds else np.zeros(n, dtype=bool)
    union_g = np.any(gt_masks, axis=0) if gt_masks else np.zeros(n, dtype=bool)
    iou = mask_iou(union_p, union_g)
    pm = np.stack(preds) if preds else np.zeros((0, n), dtype=bool)
    gm = np.stack(list(gt_masks)) if gt_masks else np.zeros((0, n), dtype=bool)
    m_iou = mask_iou_matrix(pm, gm)
    mask_f1 = {t: f1_from_iou(m_iou, t, conventions.f1) for t in thresholds}
    b_iou, box_f1 = None, {}
    if coord is not None:
        pboxes = [points_box(coord, m) for m in preds]
        gboxes = [points_box(coord, m) for m in gt_masks]
        b_mat = box_iou_matrix(pboxes, gboxes)
        box_f1 = {t: f1_from_iou(b_mat, t, conventions.f1) for t in thresholds}
        if len(gt_masks) == 1:
            if conventions.multi_mask_box == "first":
                pbox = pboxes[0] if pboxes else None   # M3DRef-CLIP: aabb_bound[0]
            else:
                pbox = points_box(coord, union_p)
            b_iou = box_iou(pbox, gboxes[0])
    return SampleScore(iou, b_iou, mask_f1, box_f1, conventions)


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


def summarize(scores: Sequence[SampleScore], groups: Sequence[Sequence[str]]) -> dict:
    """{group: {"count", "miou", "acc@k", "box_count", "box_acc@k" (single-target samples), "box_f1@k",
    "mask_f1@k"}}, each counted with the conventions the samples were scored with (they must agree)."""
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores but {len(groups)} group lists")
    conv = scores[0].conventions if scores else Conventions()
    thresholds = tuple(scores[0].mask_f1) if scores else THRESHOLDS
    if any(s.conventions != conv or tuple(s.mask_f1) != thresholds for s in scores):
        raise ValueError("scores were computed with different conventions or thresholds")
    members: dict[str, list[int]] = {"overall": list(range(len(scores)))}
    for i, gs in enumerate(groups):
        for g in gs:
            members.setdefault(g, []).append(i)
    nan = float("nan")
    out = {}
    for g, idx in members.items():
        sel = [scores[i] for i in idx]
        ious = np.array([s.iou for s in sel], dtype=np.float64)
        res = {"count": len(sel), "miou": float(ious.mean()) if sel else nan}
        for t in thresholds:
            res[f"acc@{t}"] = float(np.mean(passes(ious, t, conv.mask_acc))) if sel else nan
        boxed = np.array([s.box_iou for s in sel if s.box_iou is not None], dtype=np.float64)
        res["box_count"] = len(boxed)
        for t in thresholds:
            res[f"box_acc@{t}"] = float(np.mean(passes(boxed, t, conv.box_acc))) if len(boxed) else nan
        for t in thresholds:
            bf = [s.box_f1[t] for s in sel if s.box_f1]
            res[f"box_f1@{t}"] = float(np.mean(bf)) if bf else nan
        for t in thresholds:
            res[f"mask_f1@{t}"] = float(np.mean([s.mask_f1[t] for s in sel])) if sel else nan
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


class Evaluation(NamedTuple):
    metrics: dict           # summarize() output
    per_sample: list        # [{"dataset", "scene_id", "ann_id", "iou", "box_iou", "box_f1@k", "mask_f1@k"}]
    missing: int            # referring rows without a prediction (scored as empty predictions)


def evaluate_rows(predictions: Mapping[tuple, dict], gt_rows: Sequence[Mapping], processed_dir: str | Path,
                  conventions: Conventions = Conventions(), allow_missing: bool = False,
                  progress: bool = True) -> Evaluation:
    """Score predictions against referring rows using the processed scenes' ``instance.npy`` / ``coord.npy``.

    ``conventions``: how each metric counts its thresholds (default: the published evaluators', see module doc).
    A referring row without a prediction is an error unless ``allow_missing`` (then it is an empty prediction);
    a prediction matching no referring row is always an error.
    """
    if not isinstance(conventions, Conventions):
        raise TypeError(f"conventions must be a scene3d.metrics.Conventions, got {type(conventions).__name__}")
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
        arr = load_scene_arrays(Path(processed_dir) / sid, ("coord", "instance"))
        coord, instance = arr["coord"], arr["instance"]
        n = len(coord)
        present = set(np.unique(instance).tolist())
        for i in by_scene[sid]:
            r = gt_rows[i]
            unknown = [t for t in r["targets"] if t not in present]
            if unknown:
                raise ValueError(f"{sid} ann {r['ann_id']}: target objects {unknown} have no points in "
                                 f"{processed_dir}/{sid}/instance.npy")
            gt = [instance == t for t in r["targets"]]
            p = predictions.get(_key(r))
            if p is None:
                pred = []
            elif "pred_masks" in p:
                pred = [as_mask(m, n, f"{p['_where']} pred_masks[{j}]") for j, m in enumerate(p["pred_masks"])]
            else:
                bad = [o for o in p["pred_object_ids"] if not isinstance(o, int) or o not in present]
                if bad:
                    raise ValueError(f"{p['_where']}: pred_object_ids {bad} are not objects of {sid}")
                pred = [instance == o for o in p["pred_object_ids"]]
            scores[i] = score_sample(pred, gt, coord, conventions)
    groups = [sample_groups(r) for r in gt_rows]
    per_sample = [{"dataset": r["dataset"], "scene_id": r["scene_id"], "ann_id": r["ann_id"], "iou": s.iou,
                   "box_iou": s.box_iou, **{f"box_f1@{t}": v for t, v in s.box_f1.items()},
                   **{f"mask_f1@{t}": v for t, v in s.mask_f1.items()}}
                  for r, s in zip(gt_rows, scores)]
    return Evaluation(summarize(scores, groups), per_sample, len(missing))


def evaluate_files(predictions: str | Path, gt: str | Path, processed_dir: str | Path,
                   conventions: Conventions = Conventions(), allow_missing: bool = False,
                   progress: bool = True) -> Evaluation:
    """``scene3d eval PREDICTIONS.jsonl --gt REFER.jsonl --processed DIR`` in the library."""
    return evaluate_rows(read_predictions(predictions), read_refer_jsonl(gt), processed_dir, conventions,
                         allow_missing=allow_missing, progress=progress)


#: The columns of the printed table: point-mask figures, box Acc, the Multi3DRefer benchmark F1 (box IoU) and
#: beside it the same F1 on point masks.
TABLE_KEYS = ("count", "miou", "acc@0.25", "acc@0.5", "box_acc@0.25", "box_acc@0.5", "box_f1@0.25", "box_f1@0.5",
              "mask_f1@0.25", "mask_f1@0.5")
TABLE_LEGEND = ("acc@k: point-mask Acc; box_acc@k: box Acc (single-target rows); box_f1@k: the Multi3DRefer "
                "benchmark F1 (box IoU); mask_f1@k: the same F1 on point-mask IoU")


def format_metrics(metrics: Mapping[str, Mapping], keys: Iterable[str] = TABLE_KEYS) -> str:
    """A plain-text table of :func:`summarize` output (one line per group)."""
    keys = list(keys)
    lines = ["group".ljust(12) + "".join(k.rjust(13) for k in keys)]
    for g, res in metrics.items():
        cells = [f"{res[k]:13d}" if isinstance(res[k], int) else f"{res[k]:13.4f}" for k in keys]
        lines.append(g.ljust(12) + "".join(cells))
    return "\n".join(lines)
