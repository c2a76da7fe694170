"""Class-agnostic proposal AP / recall (scene3d.proposal_metrics) on hand-made scenes whose AP is worked out
by hand in the comments (ScanNet evaluator conventions)."""

from __future__ import annotations

import numpy as np
import pytest

from scene3d.proposal_metrics import SceneProposals, labels_to_masks, proposal_ap


def _scene():
    """400 points: GT A = 0..99, GT B = 100..199, a wall instance 200..299 (nyu40 1), 300..399 unannotated."""
    inst = np.full(400, -1)
    inst[:100], inst[100:200], inst[200:300] = 10, 11, 12
    return inst, {10: 5, 11: 3, 12: 1}


def _mask(*ranges):
    m = np.zeros(400, bool)
    for a, b in ranges:
        m[a:b] = True
    return m


P1 = _mask((0, 100))  # exactly A
P2 = _mask((100, 180))  # 80 points: below the 100-point minimum, dropped
P3 = _mask((100, 200), (200, 220))  # B + 20 wall points: IoU 100/120 = 0.83
P4 = _mask((200, 300))  # the wall: all void, ignored
P5 = _mask((0, 50), (300, 350))  # half A, half unannotated: IoU 50/150 = 0.33 with A


def test_hand_computed_ap():
    inst, cls = _scene()
    masks = np.stack([P1, P2, P3, P4, P5])
    res = proposal_ap([SceneProposals(masks, np.array([0.9, 0.99, 0.5, 0.8, 0.7]), inst, cls)])
    # @0.5 ranked: P1 TP (0.9), P5 FP (0.7: 50 % void is not > 50 %), P3 TP (0.5); P4 ignored, P2 dropped.
    # (p, r) at 0.9: (1, .5); 0.7: (.5, .5); 0.5: (2/3, 1); + (1, 0). Step widths (r_prev - r_next)/2 = .25 each:
    # AP = .25 * (2/3 + .5 + 1 + 1) = 0.7917
    assert res.ap[0.5] == pytest.approx(0.25 * (2 / 3 + 0.5 + 1 + 1))
    # @0.25 P5 (IoU .33) is a second match of A: a false positive at its confidence, the same list
    assert res.ap[0.25] == pytest.approx(0.25 * (2 / 3 + 0.5 + 1 + 1))
    assert res.recall[0.5] == 1.0 and res.num_gt == 2 and res.num_proposals == 4
    np.testing.assert_allclose(np.sort(res.best_iou), [100 / 120, 1.0])


def test_a_confident_false_positive_costs_more():
    inst, cls = _scene()
    masks = np.stack([P1, P3, P5])
    res = proposal_ap([SceneProposals(masks, np.array([0.9, 0.5, 0.95]), inst, cls)], thresholds=(0.5,))
    # ranked P5 F (.95), P1 T (.9), P3 T (.5): (p, r) = (0, 0), (.5, .5), (2/3, 1), + (1, 0)
    # widths: .25 for (2/3, 1), .5 for (.5, .5), .25 for (0, 0), 0 for the closing point
    assert res.ap[0.5] == pytest.approx(2 / 3 * 0.25 + 0.5 * 0.5)


def test_excluded_class_and_small_instances_are_void():
    inst, cls = _scene()
    masks = np.stack([P1, P3, P5])
    scores = np.array([0.9, 0.5, 0.7])
    # B as a floor (nyu40 2): P3 is then all void and ignored; one GT left: P1 TP .9, P5 FP .7
    # (p, r): (1, 1), (.5, 1), + (1, 0): widths 0, .5, .5 -> AP = .5 * 1 + .5 * 1 = 1.0
    res = proposal_ap([SceneProposals(masks, scores, inst, {**cls, 11: 2})], thresholds=(0.5,))
    assert res.num_gt == 1 and res.ap[0.5] == pytest.approx(1.0)
    # without B as GT P3 would be an FP unless ignored; with min_points 101 A and B are both too small
    res = proposal_ap([SceneProposals(masks, scores, inst, cls)], thresholds=(0.5,), min_points=101)
    assert res.num_gt == 0 and np.isnan(res.ap[0.5]) and np.isnan(res.recall[0.5])


def test_strict_threshold_and_no_proposals():
    inst, cls = _scene()
    half = _mask((0, 100), (300, 400))  # IoU exactly 0.5 with A: not a match (IoU > t)
    res = proposal_ap([SceneProposals(half[None], np.array([1.0]), inst, cls)], thresholds=(0.5,))
    assert res.recall[0.5] == 0.0 and res.ap[0.5] == 0.0
    res = proposal_ap([SceneProposals(np.zeros((0, 400), bool), np.zeros(0), inst, cls)])
    assert res.ap[0.5] == 0.0 and res.recall[0.5] == 0.0


def test_scenes_pool_and_labels_input():
    inst, cls = _scene()
    labels = np.full(400, -1)
    labels[:100] = 0  # A exactly
    labels[100:200] = 1  # B exactly
    one = SceneProposals(labels, np.array([0.8, 0.6]), inst, cls)
    assert labels_to_masks(labels).shape == (2, 400)
    empty = SceneProposals(np.zeros((0, 400), bool), np.zeros(0), inst, cls)
    res = proposal_ap([one, empty], thresholds=(0.5,))
    # 4 GT, 2 TPs: (p, r) = (1, .25) at .8, (1, .5) at .6, + (1, 0); recall list [.5, .25, 0], widths
    # (prev - next) / 2 = [.125, .25, .125] -> AP 0.5
    assert res.num_gt == 4 and res.ap[0.5] == pytest.approx(0.5) and res.recall[0.5] == 0.5


def test_bad_input_names_the_scene():
    inst, cls = _scene()
    with pytest.raises(ValueError, match="scene0000_02: masks must be"):
        proposal_ap([SceneProposals(np.zeros((1, 5), bool), np.zeros(1), inst, cls)], names=["scene0000_02"])
    with pytest.raises(ValueError, match="2 proposals but 1 scores"):
        proposal_ap([SceneProposals(np.stack([P1, P3]), np.zeros(1), inst, cls)])
