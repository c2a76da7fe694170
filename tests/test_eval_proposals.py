"""Referring through proposals (issue 19 item 3): ``evaluate_model(objects="proposals")`` and
``scene3d eval CKPT --objects proposals`` pool the objects from geometric proposals and score the predicted
masks against the ground-truth target points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_prep.synthetic import prepare_synthetic
from scene3d.cli import main as cli
from scene3d.data.scene import load_processed_scene
from scene3d.engine.checkpoint import save_checkpoint
from scene3d.engine.evaluate import evaluate_model
from scene3d.models.pipeline import Scene3DModel
from scene3d.tokenizer.geometric_proposals import proposal_objects
from helpers import small_config


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("evprop"), num_scenes=2, seed=5, val_fraction=0.5,
                             progress=False)


@pytest.fixture(scope="module")
def rows(syn):
    return [json.loads(x) for x in syn.train.read_text().splitlines() if x.strip()][:6]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Scene3DModel(small_config()).eval()
    m.segmenter.config.threshold = 1e-6  # every object passes: masks are never empty, IoUs are not trivial
    return m


@pytest.fixture(scope="module")
def run(model, syn, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = small_config().to_dict()
    cfg["referring"]["threshold"] = 1e-6
    data = {"name": "synthetic", "processed_dir": str(syn.processed), "train": str(syn.train), "val": str(syn.val)}
    save_checkpoint(run / "checkpoints", 2, model.trainable_state_dict(), config={"model": cfg, "data": data})
    return run


def _gt_iou(pred_masks, scene, targets) -> float:
    p = np.zeros(len(scene.coord), bool)
    for m in pred_masks:
        p[np.asarray(m, np.int64)] = True
    g = np.isin(scene.instance, targets)
    union = (p | g).sum()
    return 1.0 if union == 0 else float((p & g).sum() / union)


def test_proposal_masks_are_scored_against_the_gt_points(model, syn, rows):
    res = evaluate_model(model, syn.processed, rows, objects="proposals", progress=False)
    gt = evaluate_model(model, syn.processed, rows, objects="gt", progress=False)
    differs = False
    for row, pred, ps, g in zip(rows, res.predictions, res.per_sample, gt.per_sample):
        scene = load_processed_scene(syn.processed / row["scene_id"])
        labels = proposal_objects(scene.coord, scene.color).labels
        assert pred["pred_masks"], "threshold 1e-6: every row names objects"
        for m in pred["pred_masks"]:  # each predicted mask is one whole proposal ...
            ids = np.unique(labels[m])
            assert len(ids) == 1 and ids[0] >= 0 and len(m) == (labels == ids[0]).sum()
        # ... and its score is the IoU with the ground-truth target points
        assert ps["iou"] == pytest.approx(_gt_iou(pred["pred_masks"], scene, row["targets"]))
        differs |= abs(ps["iou"] - g["iou"]) > 1e-6
    assert differs, "proposal objects scored exactly as ground-truth instances: the proposals were not used"
    for sid, info in res.objects.items():
        assert info["source"] == "geometric" and info["num_candidates"] >= info["num_objects"] > 0
    assert all(v["source"] == "instances" for v in gt.objects.values())
    with pytest.raises(ValueError, match="objects: expected one of gt, proposals, got 'mask3d'"):
        evaluate_model(model, syn.processed, rows, objects="mask3d")


def test_cli_objects_flag(run, syn, rows, tmp_path, capsys):
    samples = tmp_path / "rows.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["eval", str(run), f"eval.samples={samples}", f"eval.processed_dir={syn.processed}", "--no-progress",
            "device=cpu"]
    assert cli([*base, "--objects", "proposals", f"out_dir={tmp_path / 'p'}"]) == 0
    out = capsys.readouterr().out
    assert "objects: geometric proposals" in out and "ground-truth target points" in out
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert m["objects"] == "proposals" and set(m["objects_per_scene"]) == {r["scene_id"] for r in rows}
    preds = [json.loads(x) for x in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    for row, pred, ps in zip(rows, preds, m["per_sample"]):
        scene = load_processed_scene(syn.processed / row["scene_id"])
        assert ps["iou"] == pytest.approx(_gt_iou(pred["pred_masks"], scene, row["targets"]))
    assert cli([*base, f"out_dir={tmp_path / 'g'}"]) == 0  # default: ground-truth instances
    g = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert g["objects"] == "gt" and g["turns"] == 1 and g["agreement"] == {}
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"^scene3d eval: --objects: expected one of gt, proposals, got 'mask3d'$"):
        cli([*base, "--objects", "mask3d"])
    assert cli([*base, "eval.objects=mask3d"]) == 2  # the config says so too, in one line
    assert "eval.objects must be one of" in capsys.readouterr().err
    p = tmp_path / "p.jsonl"
    p.write_text("")
    with pytest.raises(SystemExit, match="--objects belongs to the checkpoint mode"):
        cli(["eval", str(p), "--gt", str(p), "--processed", str(tmp_path), "--objects", "proposals"])


def test_turns_vote_in_eval_and_the_cli(model, run, syn, rows, tmp_path, capsys):
    one = evaluate_model(model, syn.processed, rows, objects="proposals", progress=False)
    assert evaluate_model(model, syn.processed, rows, objects="proposals", progress=False, turns=1).predictions == \
        one.predictions
    four = evaluate_model(model, syn.processed, rows, objects="proposals", progress=False, turns=4)
    # every voted mask is still whole proposals, scored against the ground-truth points
    for row, pred, ps in zip(rows, four.predictions, four.per_sample):
        scene = load_processed_scene(syn.processed / row["scene_id"])
        labels = proposal_objects(scene.coord, scene.color).labels
        for m in pred["pred_masks"]:
            ids = np.unique(labels[m])
            assert len(ids) == 1 and len(m) == (labels == ids[0]).sum()
        assert ps["iou"] == pytest.approx(_gt_iou(pred["pred_masks"], scene, row["targets"]))
        assert pred["agreement"] in (0.25, 0.5, 0.75, 1.0)
    assert all("agreement" not in p for p in one.predictions)  # one orientation: nothing to agree on
    with pytest.raises(ValueError, match="eval.turns must be an integer in 1..4"):
        evaluate_model(model, syn.processed, rows, turns=5)
    samples = tmp_path / "rows.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["eval", str(run), f"eval.samples={samples}", f"eval.processed_dir={syn.processed}", "--no-progress",
            "device=cpu"]
    assert cli([*base, "--turns", "2", f"out_dir={tmp_path / 't'}"]) == 0
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert m["turns"] == 2
    preds = [json.loads(x) for x in (tmp_path / "t" / "predictions.jsonl").read_text().splitlines()]
    # the unanimous / split summary is the mean IoU of the rows of each kind
    for name, keep in (("unanimous", lambda a: a == 1.0), ("split", lambda a: a < 1.0)):
        ious = [s["iou"] for p, s in zip(preds, m["per_sample"]) if keep(p["agreement"])]
        assert (name in m["agreement"]) == bool(ious)
        if ious:
            assert m["agreement"][name] == {"rows": len(ious), "miou": pytest.approx(float(np.mean(ious)))}
    assert sum(v["rows"] for v in m["agreement"].values()) == len(rows)
    assert "answers voted over 2 quarter turns: " in capsys.readouterr().out
    capsys.readouterr()
    assert cli([*base, "--turns", "7"]) == 2
    assert "eval.turns must be an integer in 1..4" in capsys.readouterr().err
    p = tmp_path / "p.jsonl"
    p.write_text("")
    with pytest.raises(SystemExit, match="--turns belongs to the checkpoint mode"):
        cli(["eval", str(p), "--gt", str(p), "--processed", str(tmp_path), "--turns", "2"])
