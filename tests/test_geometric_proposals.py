"""Geometric proposals (scene3d.tokenizer.geometric_proposals) on a hand-built room: floor, two walls and three
boxes (two touching the floor, one on top of another), sampled as surfaces like a scan."""

from __future__ import annotations

import numpy as np
import pytest

from scene3d.proposal_metrics import SceneProposals, proposal_ap
from scene3d.tokenizer.geometric_proposals import GeometricConfig, geometric_proposals


def _grid(lo, hi, step, axis):
    """Points of an axis-aligned rectangle (constant ``axis`` = lo[axis])."""
    ranges = [np.arange(lo[k], hi[k] + 1e-9, step) if k != axis else np.array([lo[k]]) for k in range(3)]
    g = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    return g


def _box(center, size, step=0.02):
    c, s = np.asarray(center, float), np.asarray(size, float) / 2
    lo, hi = c - s, c + s
    faces = []
    for axis in range(3):
        for side in (lo, hi):
            if axis == 2 and side is lo:
                continue  # the bottom face rests on the floor / the box below: not seen by a scanner
            a, b = lo.copy(), hi.copy()
            a[axis] = b[axis] = side[axis]
            faces.append(_grid(a, b, step, axis))
    return np.unique(np.concatenate(faces).round(4), axis=0)


def room(seed: int = 0):
    rng = np.random.default_rng(seed)
    parts = [
        (_grid([0, 0, 0], [4, 4, 0], 0.03, 2), (120, 120, 120), -1),  # floor (unannotated here: void)
        (_grid([0, 0, 0], [0, 4, 2.5], 0.03, 0), (200, 200, 190), -1),  # wall x = 0
        (_grid([0, 4, 0], [4, 4, 2.5], 0.03, 1), (200, 200, 190), -1),  # wall y = 4
        (_box([1.5, 1.5, 0.4], [0.8, 0.6, 0.8]), (150, 40, 40), 0),  # red cabinet
        (_box([1.5, 1.5, 0.95], [0.3, 0.3, 0.3]), (40, 40, 160), 1),  # blue box on it
        (_box([3.0, 2.5, 0.25], [0.9, 0.9, 0.5]), (40, 140, 40), 2),  # green table-ish box
    ]
    coord = np.concatenate([p for p, _, _ in parts])
    color = np.concatenate([np.tile(c, (len(p), 1)) for p, c, _ in parts]).astype(np.float64)
    inst = np.concatenate([np.full(len(p), i) for p, _, i in parts])
    coord = coord + rng.normal(0, 0.003, coord.shape)
    color = np.clip(color + rng.normal(0, 6, color.shape), 0, 255)
    return coord, color.astype(np.uint8), inst


def test_boxes_are_found_and_structure_removed():
    coord, color, inst = room()
    g = geometric_proposals(coord, color)
    assert g.masks.shape[1] == len(coord) and g.scores.shape == (g.num_proposals,)
    assert np.all(np.diff(g.scores) <= 0) and g.scores.max() <= 1.0
    structure = inst < 0
    assert g.num_planes >= 3
    assert g.structure[structure].mean() > 0.8  # floor and walls removed
    assert g.structure[~structure].mean() < 0.1  # the boxes kept
    res = proposal_ap([SceneProposals(g.masks, g.scores, inst)], thresholds=(0.5,), min_points=100)
    assert res.num_gt == 3
    assert res.recall[0.5] == 1.0  # each box (the stacked one too, by colour / convexity) has a proposal
    assert res.ap[0.5] > 0.5
    labels = g.labels()
    for i in range(3):  # the flat labelling keeps each box mostly in one proposal
        ids, counts = np.unique(labels[inst == i], return_counts=True)
        assert counts.max() / counts.sum() > 0.7 and ids[counts.argmax()] >= 0
    assert len(np.unique(labels[labels >= 0])) == labels.max() + 1


def test_without_colour_and_bad_input():
    coord, _, inst = room(1)
    g = geometric_proposals(coord)  # geometry alone: the stacked box joins the cabinet at some levels
    res = proposal_ap([SceneProposals(g.masks, g.scores, inst)], thresholds=(0.5,))
    assert res.recall[0.5] >= 2 / 3
    with pytest.raises(ValueError, match="coord must be"):
        geometric_proposals(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="color must be"):
        geometric_proposals(coord, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="levels"):
        GeometricConfig(levels=())


def test_deterministic():
    coord, color, _ = room(2)
    a, b = geometric_proposals(coord, color), geometric_proposals(coord, color)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.scores, b.scores)
