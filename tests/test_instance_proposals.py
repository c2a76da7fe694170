"""Learned instance proposals (scene3d.tokenizer.instance_proposals): they learn instances, are ranked and
suppressed, round-trip through safetensors, refuse bad input and bad files with one line naming them, and plug
into evaluation, the API and ``scene3d prep proposals``."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from data_prep.synthetic import prepare_synthetic
from scene3d import Segmenter
from scene3d.cli import main as cli
from scene3d.data.scene import load_processed_scene
from scene3d.engine.evaluate import evaluate_model
from scene3d.models.pipeline import Scene3DModel
from scene3d.proposal_metrics import SceneProposals, proposal_ap
from scene3d.tokenizer.instance_proposals import (CONFIG_FILE, MODEL_FILE, InstanceConfig, InstanceProposer,
                                                  TrainScan, proposal_objects, scan_from_scene,
                                                  train_instance_model)
from helpers import small_config

#: a coarse grid for the sparse synthetic scenes (a few thousand points each)
CFG = InstanceConfig(voxel=0.08, channels=(16, 32, 48), radii=(0.1, 0.15, 0.25), min_points=20)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("inst"), num_scenes=3, seed=7, val_fraction=0.0, progress=False)


@pytest.fixture(scope="module")
def scenes(syn):
    return [load_processed_scene(syn.processed / sid) for sid in sorted(os.listdir(syn.processed))]


@pytest.fixture(scope="module")
def scans(scenes):
    return [scan_from_scene(s) for s in scenes]


@pytest.fixture(scope="module")
def trained(scans):
    torch.manual_seed(0)
    return train_instance_model(scans[:2], steps=150, cfg=CFG, lr=5e-3, score_passes=2, progress=False)


def _recall(model, scan, scene) -> float:
    p = model.propose(scan.coord, scan.color)
    classes = {o.id: o.nyu40_id for o in scene.objects}
    return proposal_ap([SceneProposals(p.masks, p.scores, scan.instance, classes)], thresholds=(0.5,)).recall[0.5]


def test_scan_from_scene_gives_each_point_its_object_class(scenes, scans):
    s, t = scenes[0], scans[0]
    nyu = {o.id: o.nyu40_id for o in s.objects}
    for i in np.unique(s.instance[s.instance >= 0]):
        assert (t.semantic[s.instance == i] == nyu[int(i)]).all()
    assert (t.semantic[s.instance < 0] == 0).all()


def test_training_learns_the_instances(trained, scans, scenes):
    """150 steps on two synthetic scenes: at least half their objects get a proposal of IoU > 0.5, against at
    most a quarter from a model trained for one step."""
    learned = np.mean([_recall(trained, t, s) for t, s in zip(scans[:2], scenes[:2])])
    torch.manual_seed(0)
    untrained = train_instance_model(scans[:2], steps=1, cfg=CFG, score_passes=1, progress=False)
    before = np.mean([_recall(untrained, t, s) for t, s in zip(scans[:2], scenes[:2])])
    assert learned >= 0.5 and before <= 0.25, (learned, before)
    assert trained.meta["trained_on"] == [scans[0].name, scans[1].name] and trained.meta["steps"] == 150


def test_proposals_are_ranked_and_suppressed(trained, scans):
    p = trained.propose(scans[2].coord, scans[2].color)
    assert p.masks.shape == (p.num_proposals, len(scans[2].coord)) and p.num_proposals > 0
    assert p.num_candidates >= p.num_proposals
    assert np.all(np.diff(p.scores) <= 0) and ((p.scores >= 0) & (p.scores <= 1)).all()
    m = p.masks.astype(np.float64)
    inter = m @ m.T
    size = np.diag(inter)
    iou = inter / (size[:, None] + size[None, :] - inter)
    np.fill_diagonal(iou, 0)
    assert iou.max() <= CFG.nms_iou + 1e-9
    assert (p.masks.sum(1) >= CFG.min_points).all()
    assert p.num_dropped == 0
    capped = InstanceProposer(dataclasses.replace(CFG, max_proposals=1), trained.meta)
    capped.load_state_dict(trained.state_dict())
    with pytest.warns(UserWarning, match=rf"scene 'c': {p.num_proposals} proposals after suppression; the "
                                         rf"{p.num_proposals - 1} lowest-scored past max_proposals=1 are dropped"):
        one = capped.propose(scans[2].coord, scans[2].color, what="scene 'c'")
    assert one.num_proposals == 1 and one.num_dropped == p.num_proposals - 1
    assert np.array_equal(one.masks[0], p.masks[0])
    obj = proposal_objects(scans[2].coord, scans[2].color, trained)
    assert obj.source == "instance" and obj.num_candidates == p.num_proposals >= obj.num_proposals > 0
    assert set(np.unique(obj.labels)) <= set(range(-1, obj.num_proposals))
    # the same scan rotated about z and moved gives the same proposals (inputs: colour and height only)
    a = 0.7
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]], np.float32)
    q = trained.propose(scans[2].coord @ rot.T + np.float32([5, -3, 0]), scans[2].color)
    assert q.num_proposals > 0


def test_save_load_round_trip_and_bad_files(trained, scans, tmp_path):
    d = trained.save(tmp_path / "m")
    back = InstanceProposer.load(d)
    a, b = trained.propose(scans[2].coord, scans[2].color), back.propose(scans[2].coord, scans[2].color)
    assert np.array_equal(a.masks, b.masks) and np.allclose(a.scores, b.scores)
    assert back.meta["trained_on"] == trained.meta["trained_on"] and back.cfg == trained.cfg
    assert not list(d.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="no instance-proposal model file here.*nothing.config.json"):
        InstanceProposer.load(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_FILE).write_text((d / CONFIG_FILE).read_text())
    (bad / MODEL_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"bad/model.safetensors: not a readable safetensors file"):
        InstanceProposer.load(bad)
    (bad / CONFIG_FILE).write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="not an instance-proposal model"):
        InstanceProposer.load(bad)
    (bad / CONFIG_FILE).write_text("{")
    with pytest.raises(ValueError, match="config.json: not a JSON file"):
        InstanceProposer.load(bad)


def test_bad_input_is_one_line_naming_the_scan(trained, scans, scenes):
    c = scans[0].coord.copy()
    c[3, 1] = np.nan
    with pytest.raises(ValueError, match="scene 'x': coordinates hold NaN"):
        trained.propose(c, None, what="scene 'x'")
    with pytest.raises(ValueError, match="scan: the scan has no points"):
        trained.propose(np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match=r"color must be \[5, 3\]"):
        trained.propose(scans[0].coord[:5], scans[0].color[:4])
    s = scenes[0]
    one = s.instance.copy()
    one[one >= 0] = int(one[one >= 0][0])
    with pytest.raises(ValueError, match=f"scene '{s.scene_id}' has fewer than two annotated objects"):
        scan_from_scene(dataclasses.replace(s, instance=one))
    with pytest.raises(ValueError, match="no training scans"):
        train_instance_model([], steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_instance_model(scans[:1], steps=0)
    assert isinstance(scans[0], TrainScan)


def test_evaluation_and_the_api_take_the_learned_proposals(trained, syn, tmp_path):
    torch.manual_seed(0)
    model = Scene3DModel(small_config()).eval()
    rows = [json.loads(x) for x in syn.train.read_text().splitlines() if x.strip()][:4]
    res = evaluate_model(model, syn.processed, rows, objects="proposals", proposal_model=trained, progress=False)
    for sid, info in res.objects.items():
        assert info["source"] == "instance" and info["num_candidates"] >= info["num_objects"] > 0
    with pytest.raises(ValueError, match="proposal_model is used with objects='proposals' only"):
        evaluate_model(model, syn.processed, rows, objects="gt", proposal_model=trained, progress=False)
    d = trained.save(tmp_path / "m")
    seg = Segmenter(model, proposal_model=str(d))
    scene = seg.load_scene(syn.processed / rows[0]["scene_id"])
    r = seg.segment(scene, rows[0]["text"], objects="proposals")
    assert r.object_source == "instance" and r.num_proposals > 0
    seg.proposal_model = None  # back to the geometric proposals (the cached encoding is dropped)
    assert seg.segment(scene, rows[0]["text"], objects="proposals").object_source == "geometric"
    with pytest.raises(TypeError, match="proposal_model must be an InstanceProposer"):
        seg.proposal_model = 3


def test_cli_prep_proposals(syn, tmp_path, capsys):
    ids = sorted(os.listdir(syn.processed))
    out = tmp_path / "model"
    assert cli(["prep", "proposals", "--processed", str(syn.processed), "--scenes", ids[0], ids[1], "--steps", "2",
                "--out", str(out), "--no-progress"]) == 0
    assert "wrote instance-proposal model" in capsys.readouterr().out
    assert InstanceProposer.load(out).meta["trained_on"] == ids[:2]
    assert cli(["prep", "proposals", "--processed", str(syn.processed), "--scenes", "scene9999_00", "--out",
                str(tmp_path / "x"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scene9999_00" in err[0]
    assert not (tmp_path / "x").exists()


def test_semantic_prior_joins_the_object_tokens(trained, scenes, tmp_path):
    """``tokenizer.semantic_model``: each object's features get the frozen model's class probabilities averaged
    over its points; the model is not trained with the tokenizer and not in its state dict."""
    from scene3d.data.referring import scene_to_tensors
    from scene3d.structures import PointBatch
    from scene3d.tokenizer.backbone import BackboneConfig
    from scene3d.tokenizer.model import ObjectTokenizer, ObjectTokenizerConfig
    from scene3d.tokenizer.relation import RelationConfig

    d = trained.save(tmp_path / "sem")
    cfg = dict(voxel_size=0.08, out_dim=32, backbone=BackboneConfig(channels=(8, 16)), relation=RelationConfig(dim=32),
               geometry_dim=16)
    torch.manual_seed(0)
    tok = ObjectTokenizer(ObjectTokenizerConfig(semantic_model=str(d), **cfg)).eval()
    plain = ObjectTokenizer(ObjectTokenizerConfig(**cfg))
    assert tok.project[0].in_features == plain.project[0].in_features + 41
    assert not any(k.startswith("_semantic") for k in tok.state_dict())
    s = scenes[2]
    pts = PointBatch.from_list([scene_to_tensors(s)], scene_ids=[s.scene_id])
    out = tok(pts, pts.instance)
    prior = tok.semantic_prior(pts, out.tokens.point2obj, out.tokens.num_objects)
    probs = trained.point_probs(s.coord, s.color)
    for row, oid in enumerate(out.tokens.object_ids.tolist()):
        np.testing.assert_allclose(prior[row].numpy(), probs[s.instance == oid].mean(0), atol=1e-5)
    assert torch.allclose(prior.sum(1), torch.ones(len(prior)), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="no instance-proposal model file"):
        ObjectTokenizer(ObjectTokenizerConfig(semantic_model=str(tmp_path / "none"), **cfg))


def test_label_model_names_the_objects_for_a_model_that_reads_names(trained, syn, scenes, tmp_path, monkeypatch):
    """``referring.object_labels``: training writes the annotated names (the label model is not needed), inference
    writes the label model's (each object's most probable class over its points); without one, one clear error.
    The label model is loaded from ``model.label_model`` and never enters the checkpoint."""
    from scene3d.data.labels import clean_label, nyu40_name
    from scene3d.data.referring import ReferringDataset, collate_referring, scene_to_tensors
    from scene3d.structures import PointBatch

    d = trained.save(tmp_path / "names")
    torch.manual_seed(0)
    model = Scene3DModel(small_config(object_labels=True)).eval()
    s = scenes[2]
    pts = PointBatch.from_list([scene_to_tensors(s)], scene_ids=[s.scene_id])
    with pytest.raises(ValueError, match="needs a label model to name the objects"):
        model.encode(pts, pts.instance)
    # training: the annotated names, whatever the label model would say
    seen = []
    real_forward = model.segmenter.forward
    monkeypatch.setattr(model.segmenter, "forward", lambda b: seen.append(b.scenes()[0].object_names) or real_forward(b))
    data = ReferringDataset(syn.processed, syn.train, max_points=1500)
    model.train()
    batch = collate_referring([data[0]])
    assert torch.isfinite(model(batch)["loss"])
    annotated = {int(o.id): clean_label(o.label) for o in load_processed_scene(syn.processed / batch.points.scene_ids[0]).objects}
    assert seen[0] and seen[0] == [annotated[int(i)] for i in model.encode(batch.points, names=False)[0].tokens.object_ids]
    model.eval()
    # inference: the label model's names
    model.set_label_model(str(d))
    inputs, _ = model.encode(pts, pts.instance)
    probs = trained.point_probs(s.coord, s.color)
    for row, oid in enumerate(inputs.tokens.object_ids.tolist()):
        assert inputs.object_names[row] == nyu40_name(int(probs[s.instance == oid].mean(0)[1:].argmax()) + 1)
    # from the config's path, through evaluation; not in the state dict
    named = Scene3DModel(dataclasses.replace(small_config(object_labels=True), label_model=str(d))).eval()
    assert named.label_model is not None and not any("label" in k for k in named.state_dict())
    rows = [json.loads(x) for x in syn.train.read_text().splitlines() if x.strip()][:2]
    res = evaluate_model(named, syn.processed, rows, progress=False)
    assert len(res.per_sample) == 2
    seg = Segmenter(named)
    scene = seg.load_scene(syn.processed / rows[0]["scene_id"])
    enc = seg.encode(scene, objects="proposals")
    assert len(enc.inputs.object_names) == enc.inputs.tokens.num_objects
    assert set(enc.inputs.object_names) <= {nyu40_name(i) for i in range(1, 41)}
    r = seg.segment(scene, [rows[0]["text"], "the chair"], objects="proposals")[1]
    assert r.object_names == tuple(enc.inputs.object_names[i] for i in r.objects)
