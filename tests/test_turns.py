"""Test-time quarter turns (scene3d.models.turns): exact turning, the vote, and predict(turns=...) end to end."""

from __future__ import annotations

import pytest
import torch

from data_prep.synthetic import prepare_synthetic
from helpers import small_config
from scene3d.data.referring import ReferringDataset, collate_referring
from scene3d.models.generation import Prediction
from scene3d.models.pipeline import Scene3DModel
from scene3d.models.turns import check_turns, turned_batch, turned_texts, vote


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    bench = prepare_synthetic(tmp_path_factory.mktemp("turns"), num_scenes=1, seed=5, val_fraction=0.0,
                              progress=False)
    return ReferringDataset(bench.processed, bench.train, max_points=1500)


def _pred(objects, scores, n=6) -> Prediction:
    objects = torch.tensor(objects, dtype=torch.long)
    mask = torch.zeros(n, dtype=torch.bool)
    return Prediction(mask, objects, objects + 100, mask, mask, torch.tensor(scores), [], [],
                      "identifiers" if len(objects) else "none")


def test_vote_takes_the_majority_and_breaks_ties_towards_the_scan_as_given():
    s = [0.1, 0.2, 0.3]
    per_turn = [
        [_pred([0], s), _pred([1], s), _pred([], s)],
        [_pred([2], s), _pred([2], s), _pred([0, 1], s)],
        [_pred([2], s), _pred([1], s), _pred([1, 0], s)],
        [_pred([0], [0.5, 0.6, 0.7]), _pred([2], s), _pred([], s)],
    ]
    out = vote(per_turn)
    # question 0: {0} twice, {2} twice -> the tie goes to orientation 0's answer
    assert out[0].objects.tolist() == [0] and out[0].agreement == 0.5
    assert torch.allclose(out[0].obj_scores, torch.tensor([0.2, 0.3, 0.4]))  # averaged over the orientations
    # question 1: {2} twice, {1} twice -> orientation 0 gave {1}
    assert out[1].objects.tolist() == [1]
    # question 2: {0, 1} (in any order) twice, none twice -> a tie; orientation 0 said none
    assert out[2].objects.tolist() == [] and out[2].source == "none" and out[2].agreement == 0.5
    out = vote(per_turn[1:])
    assert out[0].objects.tolist() == [2] and out[0].agreement == pytest.approx(2 / 3)
    assert out[0].object_ids.tolist() == [102]
    out = vote(per_turn[1:], object_ids=torch.tensor([7, 8, 9]))  # the scene's own ids of the chosen rows
    assert out[0].object_ids.tolist() == [9] and out[2].object_ids.tolist() == [7, 8]
    assert vote(per_turn[:1])[1].agreement == 1.0
    with pytest.raises(ValueError, match="same 3 questions"):
        vote([per_turn[0], per_turn[1][:2]])
    with pytest.raises(ValueError, match="at least one"):
        vote([])


def test_turns_are_exact_and_the_questions_turn_with_the_scan(data):
    pts = collate_referring([data[0]]).points
    pts = pts.replace(normal=torch.nn.functional.normalize(torch.randn(pts.num_points, 3), dim=1))
    one = turned_batch(pts, 1)
    # a quarter turn counter-clockwise: the scan's +x side goes to +y
    assert torch.equal(one.coord[:, 2], pts.coord[:, 2]) and not torch.equal(one.coord, pts.coord)
    i, j = int(pts.coord[:, 0].argmax()), int(pts.coord[:, 1].argmax())
    assert i == int(one.coord[:, 1].argmax()) and j == int(one.coord[:, 0].argmin())
    assert torch.allclose(one.normal[:, :2], torch.stack([-pts.normal[:, 1], pts.normal[:, 0]], 1))
    four = pts
    for _ in range(4):
        four = turned_batch(four, 1)
    assert torch.allclose(four.coord, pts.coord, atol=1e-5) and torch.allclose(four.normal, pts.normal)
    assert torch.equal(one.instance, pts.instance) and torch.equal(one.color, pts.color)
    assert turned_texts(["the chair on the north side", "the lamp"], 1) == ["the chair on the west side", "the lamp"]
    with pytest.raises(ValueError, match="one scene"):
        turned_batch(collate_referring([data[0], data[1]]).points, 1)


@pytest.mark.parametrize("bad", [0, 5, 1.5, True, "4"])
def test_bad_turns_are_refused(bad):
    with pytest.raises(ValueError, match="turns must be an integer in 1..4"):
        check_turns(bad)


def test_predict_with_turns_keeps_an_answer_some_orientations_gave(data):
    torch.manual_seed(0)
    model = Scene3DModel(small_config())
    model.eval()
    pts = collate_referring([data[0]]).points
    texts = ["the chair on the north side of the room", "all the tables", "the lamp closest to the east wall"]
    plain = model.predict(pts, texts)
    same = model.predict(pts, texts, turns=1)
    for a, b in zip(plain, same):
        assert torch.equal(a.point_mask, b.point_mask) and a.agreement == b.agreement == 1.0
    # each orientation answered on its own: the scan turned k times, the texts turned with it
    own = [plain] + [model.predict(turned_batch(pts, k), turned_texts(texts, k)) for k in range(1, 4)]
    voted = model.predict(pts, texts, turns=4)
    for q, p in enumerate(voted):
        answers = [tuple(sorted(o[q].objects.tolist())) for o in own]
        mine = tuple(sorted(p.objects.tolist()))
        assert mine in answers and p.agreement == answers.count(mine) / 4
        assert answers.count(mine) == max(answers.count(a) for a in answers)
        # the ids are the scene's own instance ids of the chosen rows; the masks cover the original points
        assert torch.equal(p.object_ids, torch.unique(pts.instance[p.point_mask]).sort().values)
        assert torch.allclose(p.obj_scores, torch.stack([o[q].obj_scores for o in own]).mean(0), atol=1e-5)
    assert model.training is False
    model.train()
    model.predict(pts, texts[:1], turns=2)
    assert model.training  # predict restores the mode
    with pytest.raises(ValueError, match="turns must be"):
        model.predict(pts, texts, turns=0)


def test_turns_keep_the_proposal_heads_objects_of_the_scan_as_given(data):
    torch.manual_seed(1)
    model = Scene3DModel(small_config()).eval()
    pts = collate_referring([data[0]]).points.replace(instance=None, segment=None)
    scene, _ = model.encode(pts)
    out = model.predict(pts, ["the chair", "the table"], turns=3)
    for p in out:
        assert p.obj_scores.shape == (scene.tokens.num_objects,)
        assert torch.equal(p.point_mask, torch.isin(scene.tokens.point2obj, p.objects))
        assert p.object_ids.tolist() == [-1] * len(p.objects)  # proposals have no source ids
