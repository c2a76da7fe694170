"""Canonical frame (model.canonical_frame; scene3d.data.augment.canonical_turns): every scan is tokenized in the
quarter turn its own geometry picks, so the model answers a scan the same in all four quarter turns, and the two
real rescans of scene0000 land in one frame."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data_prep.synthetic import prepare_synthetic
from helpers import small_config
from scene3d.data.augment import canonical_turns, frame_margin, turn_points
from scene3d.data.referring import ReferringDataset, collate_referring
from scene3d.data.scene import load_processed_scene
from scene3d.models.pipeline import Scene3DModel
from scene3d.models.turns import canonical_batch, frame_texts, turned_batch, turned_texts

SCANS = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    bench = prepare_synthetic(tmp_path_factory.mktemp("canon"), num_scenes=2, seed=3, val_fraction=0.0,
                              progress=False)
    return ReferringDataset(bench.processed, bench.train, max_points=1500)


def test_canonical_turns_are_exact_under_quarter_turns(data):
    coord = collate_referring([data[0]]).points.coord
    k0 = canonical_turns(coord)
    home = turn_points({"coord": coord}, k0)["coord"]
    assert canonical_turns(home) == 0
    # the median of the points lies in the +x / +y quadrant of the xy extent in the canonical frame
    mid = (home[:, :2].amin(0) + home[:, :2].amax(0)) / 2
    assert bool((torch.median(home[:, :2] - mid, 0).values >= 0).all())
    for k in range(1, 4):
        turned = turn_points({"coord": coord}, k)["coord"]
        assert canonical_turns(turned) == (k0 - k) % 4
        again = turn_points({"coord": turned}, canonical_turns(turned))["coord"]
        assert torch.allclose(again, home, atol=1e-5)  # the same frame whichever way the scan came in
        assert frame_margin(turned) == pytest.approx(frame_margin(coord), abs=1e-3)  # float32 turns
    assert 0 <= frame_margin(coord) <= 45
    sym = np.array([[-1.0, 0, 0], [1.0, 0, 0], [0, -1.0, 0], [0, 1.0, 0]])
    assert canonical_turns(sym) == 0 and frame_margin(sym) == 0.0  # median at the middle: no preferred turn
    with pytest.raises(ValueError, match="at least one point"):
        canonical_turns(np.zeros((0, 3)))


def test_canonical_batch_turns_each_scene_on_its_own(data):
    pts = collate_referring([data[0], data[1]]).points
    pts = pts.replace(normal=torch.nn.functional.normalize(torch.randn(pts.num_points, 3), dim=1))
    out, turns = canonical_batch(pts)
    for b, (given, held) in enumerate(zip(pts.split(), out.split())):
        assert turns[b] == canonical_turns(given["coord"])
        want = turn_points({"coord": given["coord"], "normal": given["normal"]}, turns[b])
        assert torch.equal(held["coord"], want["coord"]) and torch.equal(held["normal"], want["normal"])
        assert canonical_turns(held["coord"]) == 0
    assert torch.equal(out.instance, pts.instance) and torch.equal(out.color, pts.color)


def test_a_canonical_model_answers_every_quarter_turn_alike(data):
    torch.manual_seed(0)
    model = Scene3DModel(dataclasses.replace(small_config(), canonical_frame=True)).eval()
    pts = collate_referring([data[0]]).points
    texts = ["the chair on the north side of the room", "the lamp closest to the east wall", "the table"]
    base = model.predict(pts, texts)
    scene, _ = model.encode(pts, pts.instance)
    assert scene.frame_turns == [canonical_turns(pts.coord)]
    assert canonical_turns(scene.points.coord) == 0
    for k in range(1, 4):
        # the scan turned k times and its questions with it: the same points and answers
        out = model.predict(turned_batch(pts, k), turned_texts(texts, k))
        for a, b in zip(base, out):
            assert torch.equal(a.objects, b.objects) and torch.equal(a.point_mask, b.point_mask)
            assert torch.allclose(a.obj_scores, b.obj_scores, atol=1e-4)
    # test-time turns on a canonical model: every orientation comes back to one frame, so they all agree
    assert all(p.agreement == 1.0 for p in model.predict(pts, texts, turns=4))


def test_the_question_is_turned_into_the_frame_of_the_points(data):
    """What the segmenter reads is the question turned as the points were: "north" in the scan's frame."""
    model = Scene3DModel(dataclasses.replace(small_config(), canonical_frame=True)).eval()
    pts = collate_referring([data[0]]).points
    for k in range(4):
        turned = turned_batch(pts, k)
        scene, _ = model.encode(turned, turned.instance)
        frame = scene.frame_turns[0]
        assert frame_texts(scene, ["the north wall"]) == turned_texts(["the north wall"], frame)
        assert torch.allclose(scene.points.coord, turn_points({"coord": turned.coord}, frame)["coord"])


def test_training_loss_is_the_same_for_a_turned_batch(data):
    torch.manual_seed(0)
    model = Scene3DModel(dataclasses.replace(small_config(), canonical_frame=True)).train()
    batch = collate_referring([data[0], data[1]])
    pts = batch.points
    k = 3
    turned = pts.replace(coord=torch.cat([turn_points({"coord": s["coord"]}, k)["coord"] for s in pts.split()]))
    rows = [{**r, "text": turned_texts([r["text"]], k)[0]} for r in batch.samples]
    torch.manual_seed(1)
    a = model(batch)
    torch.manual_seed(1)
    b = model(batch._replace(points=turned, samples=rows))
    assert torch.isfinite(a["loss"])
    for key in ("loss", "proposal", "obj"):
        assert float(a[key].detach()) == pytest.approx(float(b[key].detach()), rel=1e-3, abs=1e-4), key


def test_the_real_rescans_share_one_canonical_frame(real_data):
    """scene0000_01 and scene0000_02 are scans of one room a quarter turn apart; in the canonical frame the bed
    (the one object of its class in both) lies in one place with one footprint."""
    beds = []
    for sid in ("scene0000_01", "scene0000_02"):
        scene = load_processed_scene(real_data / SCANS / sid)
        assert frame_margin(scene.coord) > 10  # degrees from a quadrant boundary: not a coin flip
        k = canonical_turns(scene.coord)
        coord = turn_points({"coord": torch.from_numpy(scene.coord).float()}, k)["coord"].numpy()
        bed = [o for o in scene.objects if o.label == "bed"]
        assert len(bed) == 1
        c = coord[scene.instance == bed[0].id]
        beds.append((c[:, :2].min(0), c[:, :2].max(0)))
    (lo1, hi1), (lo2, hi2) = beds
    inter = np.clip(np.minimum(hi1, hi2) - np.maximum(lo1, lo2), 0, None).prod()
    union = (hi1 - lo1).prod() + (hi2 - lo2).prod() - inter
    assert inter / union > 0.5
