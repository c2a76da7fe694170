"""Class-agnostic instance-proposal metrics with the ScanNet instance benchmark's conventions.

:func:`proposal_ap` scores proposals (a boolean mask per proposal plus a confidence) against the ground-truth
instances of one or more scenes the way ScanNet's ``evaluate_semantic_instance.py`` scores one class, all
object classes pooled into one:

* **GT instances** count when their class is not excluded (default: wall, floor, ceiling, nyu40 ids 1, 2, 22)
  and they have at least ``min_points`` points (ScanNet: 100 vertices). Points of excluded classes, of smaller
  instances and unannotated points (instance -1) are *void*.
* **Proposals** with fewer than ``min_points`` points are dropped. A proposal's size counts all of its points,
  void ones included (IoU = |P & G| / (|P| + |G| - |P & G|)).
* **Matching** at threshold ``t``: a proposal matches a GT when IoU > t (strict, as ScanNet). Each GT is
  matched at most once: when several proposals match it, the most confident is the true positive and the
  others are false positives at their own confidence (a proposal that is a true positive is not used again).
* An unmatched proposal is a **false positive** unless more than ``t`` of its points are void or belong to
  GT instances too small to count; then it is ignored (ScanNet's rule for predictions on unlabelled space).
* **AP**: precision / recall at each distinct confidence (proposals ranked by confidence, GT instances with
  no match are false negatives), closed with (recall 0, precision 1); the area is
  ``sum_k p_k (r_{k-1} - r_{k+1}) / 2`` with ``r_{-1} = r_0`` and ``r_{K+1} = 0`` (ScanNet's step widths).

``recall@t`` is the fraction of counted GT instances whose best IoU with any kept proposal is > t (no
one-to-one matching; confidence plays no part).

The same proposal may be scored over several scenes: pass one :class:`SceneProposals` per scene.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

#: nyu40 ids of the structural classes the class-agnostic benchmark leaves out: wall, floor, ceiling
STRUCTURAL_NYU40 = (1, 2, 22)
#: ScanNet's instance benchmark ignores GT instances (and drops predictions) smaller than this many vertices
SCANNET_MIN_POINTS = 100


class SceneProposals(NamedTuple):
    """One scene's proposals and ground truth.

    ==============  ===============  =========================================================================
    ``masks``       [P, N] bool      points of each proposal (or ``labels`` [N] int, -1 none, one per point)
    ``scores``      [P] float        confidence of each proposal (ranks them for AP)
    ``instance``    [N] int          GT instance id per point, -1 unannotated
    ``gt_class``    dict | None      instance id -> nyu40 id (instances of ``exclude`` classes are void)
    ==============  ===============  =========================================================================
    """

    masks: np.ndarray
    scores: np.ndarray
    instance: np.ndarray
    gt_class: Optional[dict] = None


class ProposalScores(NamedTuple):
    thresholds: tuple
    ap: dict  # threshold -> AP (nan when no GT instance counts)
    recall: dict  # threshold -> recall
    num_gt: int  # counted GT instances
    num_proposals: int  # kept proposals (>= min_points)
    best_iou: np.ndarray  # [num_gt] best IoU of each counted GT instance

    def summary(self) -> dict:
        out = {f"ap@{t:g}": self.ap[t] for t in self.thresholds}
        out.update({f"recall@{t:g}": self.recall[t] for t in self.thresholds})
        out.update(num_gt=self.num_gt, num_proposals=self.num_proposals)
        return out


def labels_to_masks(labels: np.ndarray) -> np.ndarray:
    """``[P, N]`` bool masks of per-point proposal ids ``labels [N]`` (-1 none), proposals in id order 0..P-1."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {labels.shape}")
    p = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    return labels[None, :] == np.arange(p)[:, None]


class _Scene(NamedTuple):
    inter: np.ndarray  # [G, P] intersections with counted GT
    gt_size: np.ndarray  # [G]
    pr_size: np.ndarray  # [P]
    ignored: np.ndarray  # [P] points of each proposal that are void or on too-small GT instances
    scores: np.ndarray  # [P]


def _prepare(s: SceneProposals, exclude: Sequence[int], min_points: int, where: str) -> _Scene:
    inst = np.asarray(s.instance).astype(np.int64)
    masks = np.asarray(s.masks)
    if masks.ndim == 1:
        masks = labels_to_masks(masks)
    if masks.ndim != 2 or masks.shape[1] != inst.shape[0]:
        raise ValueError(f"{where}: masks must be [P, {inst.shape[0]}] (one column per point), got {masks.shape}")
    masks = masks.astype(bool)
    scores = np.asarray(s.scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != masks.shape[0]:
        raise ValueError(f"{where}: {masks.shape[0]} proposals but {scores.shape[0]} scores")
    if not np.isfinite(scores).all():
        raise ValueError(f"{where}: scores hold NaN/inf")
    ids, gt_row = np.unique(inst, return_inverse=True)
    excluded = set(int(c) for c in exclude)
    sizes = np.bincount(gt_row, minlength=len(ids))
    counted = np.array([i >= 0 and sizes[k] >= min_points and
                        (s.gt_class is None or int(s.gt_class.get(int(i), 0)) not in excluded)
                        for k, i in enumerate(ids)], dtype=bool)
    # per point: the counted-GT row, or -1 for void / too small / excluded / unannotated
    row_of = np.full(len(ids), -1, np.int64)
    row_of[counted] = np.arange(int(counted.sum()))
    point_gt = row_of[gt_row]
    keep = masks.sum(1) >= min_points
    masks, scores = masks[keep], scores[keep]
    g, p = int(counted.sum()), masks.shape[0]
    onehot = np.zeros((inst.shape[0], g), dtype=np.float32)
    hit = point_gt >= 0
    onehot[np.nonzero(hit)[0], point_gt[hit]] = 1.0
    inter = (masks.astype(np.float32) @ onehot).T.astype(np.int64)  # (G, P)
    ignored = (masks & ~hit[None, :]).sum(1)
    return _Scene(inter, sizes[counted], masks.sum(1), ignored, scores)


def _ap(scenes: Sequence[_Scene], t: float) -> float:
    """AP at IoU threshold ``t`` pooled over ``scenes`` (module docstring)."""
    true, score = [], []
    hard_fn = 0
    num_gt = 0
    for sc in scenes:
        g, p = sc.inter.shape
        num_gt += g
        union = sc.gt_size[:, None] + sc.pr_size[None, :] - sc.inter
        iou = np.where(union > 0, sc.inter / np.maximum(union, 1), 0.0)
        used = np.zeros(p, bool)
        for gi in range(g):
            cands = [j for j in np.nonzero(iou[gi] > t)[0] if not used[j]]
            if not cands:
                hard_fn += 1
                continue
            best = max(cands, key=lambda j: sc.scores[j])
            used[best] = True  # the others stay free to match another GT (possible at t < 0.5)
            for j in cands:  # a second proposal on one GT: a false positive at its own confidence
                true.append(j == best)
                score.append(sc.scores[j])
        for j in np.nonzero(~used)[0]:
            if (iou[:, j] > t).any():
                continue  # overlaps a GT: counted in the loop above (as a duplicate), not again
            if sc.ignored[j] / sc.pr_size[j] > t:
                continue  # mostly on unlabelled / excluded space: ignored, as ScanNet
            true.append(False)
            score.append(sc.scores[j])
    if num_gt == 0:
        return float("nan")
    if not true:
        return 0.0
    true, score = np.asarray(true, bool), np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    true, score = true[order], score[order]
    # one precision / recall point per distinct confidence: everything ranked at or above it is predicted
    last = np.r_[np.nonzero(np.diff(score))[0], len(score) - 1]
    tp = np.cumsum(true)[last]
    precision = tp / (last + 1)
    recall = tp / num_gt
    # ascending recall order as ScanNet lists them (lowest confidence first), closed by (r=0, p=1)
    precision, recall = np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]
    prev = np.r_[recall[0], recall[:-1]]
    nxt = np.r_[recall[1:], 0.0]
    return float(np.dot(precision, (prev - nxt) / 2))


def proposal_ap(scenes: Sequence[SceneProposals], thresholds: Sequence[float] = (0.5, 0.25),
                exclude: Sequence[int] = STRUCTURAL_NYU40, min_points: int = SCANNET_MIN_POINTS,
                names: Optional[Sequence[str]] = None) -> ProposalScores:
    """Class-agnostic AP and recall at each IoU threshold over ``scenes`` (module docstring)."""
    if isinstance(scenes, SceneProposals):
        scenes = [scenes]
    if min_points < 1:
        raise ValueError(f"min_points must be >= 1, got {min_points}")
    names = list(names) if names is not None else [f"scene {i}" for i in range(len(scenes))]
    prepared = [_prepare(s, exclude, min_points, n) for s, n in zip(scenes, names)]
    best = []
    for sc in prepared:
        union = sc.gt_size[:, None] + sc.pr_size[None, :] - sc.inter
        iou = sc.inter / np.maximum(union, 1)
        best.append(iou.max(1) if iou.shape[1] else np.zeros(iou.shape[0]))
    best_iou = np.concatenate(best) if best else np.zeros(0)
    ts = tuple(float(t) for t in thresholds)
    ap = {t: _ap(prepared, t) for t in ts}
    n = len(best_iou)
    recall = {t: float((best_iou > t).mean()) if n else float("nan") for t in ts}
    return ProposalScores(ts, ap, recall, n, int(sum(len(s.scores) for s in prepared)), best_iou)


__all__ = ["ProposalScores", "SCANNET_MIN_POINTS", "STRUCTURAL_NYU40", "SceneProposals", "labels_to_masks",
           "proposal_ap"]
