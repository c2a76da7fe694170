"""Learned-merge proposals (scene3d.tokenizer.merge_proposals) on the hand-built rooms of
test_geometric_proposals: trained on two rooms, measured on a third with other noise and colours."""

from __future__ import annotations

import numpy as np
import pytest

from scene3d.proposal_metrics import SceneProposals, proposal_ap
from scene3d.tokenizer import merge_proposals as mp
from tests.test_geometric_proposals import room


def _scene(seed: int) -> mp.TrainScene:
    coord, color, inst = room(seed)
    return mp.TrainScene(f"room{seed}", coord, color, inst, {0: 3, 1: 40, 2: 7})


@pytest.fixture(scope="module")
def model() -> mp.MergeModel:
    return mp.train_merge_model([_scene(0), _scene(1)], rounds=1, log=lambda *a: None)


def test_merge_finds_the_boxes_of_an_unseen_room(model):
    s = _scene(5)
    g = mp.merge_proposals(s.coord, s.color, model)
    assert g.masks.shape == (g.num_proposals, len(s.coord)) and g.scores.shape == (g.num_proposals,)
    assert np.all(np.diff(g.scores) <= 0) and np.all((g.scores >= 0) & (g.scores <= 1))
    assert g.structure[s.instance < 0].mean() > 0.8 and g.structure[s.instance >= 0].mean() < 0.1
    res = proposal_ap([SceneProposals(g.masks, g.scores, s.instance)], thresholds=(0.5,))
    assert res.num_gt == 3
    assert res.recall[0.5] == 1.0
    assert res.ap[0.5] > 0.5


def test_pairs_are_symmetric_and_the_tree_nms_leaves_no_near_duplicates(model):
    sc = mp._front(*_scene(5)[1:3], mp.MergeConfig())
    a, b = sc.edges[:, 0], sc.edges[:, 1]
    x_ab = mp.pair_features(mp._seg_view(sc.seg_stats, a), mp._seg_view(sc.seg_stats, b), sc.edge_stats)
    x_ba = mp.pair_features(mp._seg_view(sc.seg_stats, b), mp._seg_view(sc.seg_stats, a), sc.edge_stats)
    assert x_ab.shape == (len(a), len(mp.PAIR_FEATURES))
    np.testing.assert_allclose(x_ab, x_ba)
    s = _scene(5)
    for nms in (0.5, 0.8):
        g = mp.merge_proposals(s.coord, s.color, model, mp.MergeConfig(nms_iou=nms))
        m = g.masks.astype(np.float64)
        inter = m @ m.T
        size = np.diag(inter)
        iou = inter / (size[:, None] + size[None, :] - inter)
        np.fill_diagonal(iou, 0)
        assert iou.max() < nms


def test_saved_model_gives_the_same_proposals(model, tmp_path):
    s = _scene(5)
    model.save(tmp_path / "merge.safetensors")
    back = mp.MergeModel.load(tmp_path / "merge.safetensors")
    assert back.meta["scenes"] == ["room0", "room1"]
    g1 = mp.merge_proposals(s.coord, s.color, model)
    g2 = mp.merge_proposals(s.coord, s.color, back)
    np.testing.assert_array_equal(g1.masks, g2.masks)
    np.testing.assert_allclose(g1.scores, g2.scores)


def test_bad_input():
    s = _scene(0)
    with pytest.raises(ValueError, match="no scenes"):
        mp.train_merge_model([])
    with pytest.raises(ValueError, match="weights"):
        mp.train_merge_model([s], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="coord must be"):
        mp._front(np.zeros((0, 3)), None, mp.MergeConfig())
    with pytest.raises(ValueError, match="min_merge_p"):
        mp.MergeConfig(min_merge_p=1.0)
