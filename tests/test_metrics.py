"""scene3d.metrics: hand-computed cases (IoU, >= vs >, Hungarian F1, zero targets, duplicates, boxes) and the
`scene3d eval` predictions-file mode on a tiny processed scene."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from scene3d import metrics as M

N = 10


def mask(*idx):
    return M.as_mask(list(idx), N)


def test_mask_iou_hand_computed():
    assert M.mask_iou(mask(0, 1, 2, 3), mask(2, 3, 4, 5)) == pytest.approx(2 / 6)
    assert M.mask_iou(mask(), mask()) == 1.0          # a correct "nothing"
    assert M.mask_iou(mask(), mask(1)) == 0.0
    assert M.mask_iou(mask(1), mask()) == 0.0
    # duplicate indices inside one mask count once
    assert M.as_mask([1, 1, 2], N).sum() == 2


def test_as_mask_rejects_bad_indices():
    with pytest.raises(ValueError, match="lie in"):
        M.as_mask([0, N], N)
    with pytest.raises(ValueError, match="lie in"):
        M.as_mask([-1], N)
    with pytest.raises(ValueError, match="integers"):
        M.as_mask([0.5], N)
    with pytest.raises(ValueError, match="shape"):
        M.as_mask(np.zeros(3, dtype=bool), N)


def test_threshold_convention_at_exactly_025_and_05():
    gt = [mask(3)]
    s25 = M.score_sample([mask(0, 1, 2, 3)], gt, None)               # IoU = 1/4 exactly
    s50 = M.score_sample([mask(1, 3)], gt, None)                     # IoU = 1/2 exactly
    assert s25.iou == 0.25 and s50.iou == 0.5
    loose = M.summarize([s25, s50], [[], []])["overall"]
    assert loose["acc@0.25"] == 1.0 and loose["acc@0.5"] == 0.5
    st25 = M.score_sample([mask(0, 1, 2, 3)], gt, None, strict=True)
    st50 = M.score_sample([mask(1, 3)], gt, None, strict=True)
    strict = M.summarize([st25, st50], [[], []], strict=True)["overall"]
    assert strict["acc@0.25"] == 0.5 and strict["acc@0.5"] == 0.0    # only 0.5 > 0.25 passes
    assert loose["miou"] == pytest.approx(0.375)
    # F1 follows the same convention: one pred, one gt, IoU 0.25
    assert s25.f1[0.25] == 1.0 and st25.f1[0.25] == 0.0


def test_empty_prediction_and_zero_target_samples():
    empty_vs_target = M.score_sample([], [mask(1, 2)], None)
    assert empty_vs_target.iou == 0.0 and empty_vs_target.f1 == {0.25: 0.0, 0.5: 0.0}
    # an empty mask in the list is "no object", not a prediction
    assert M.score_sample([mask()], [mask(1, 2)], None).f1[0.25] == 0.0
    zt_ok = M.score_sample([], [], None)
    assert zt_ok.iou == 1.0 and zt_ok.f1 == {0.25: 1.0, 0.5: 1.0}     # Multi3DRefer: TP on zero target
    zt_bad = M.score_sample([mask(4)], [], None)
    assert zt_bad.iou == 0.0 and zt_bad.f1 == {0.25: 0.0, 0.5: 0.0}


def test_duplicate_predictions_count_as_false_positives():
    gt = [mask(1, 2, 3)]
    s = M.score_sample([mask(1, 2, 3), mask(1, 2, 3)], gt, None)
    assert s.iou == 1.0                              # the union is still exact
    assert s.f1[0.5] == pytest.approx(2 * 1 / (2 + 1))  # 1 TP, 1 FP, 0 FN


def test_multi_target_partial():
    gts = [mask(0, 1), mask(2, 3), mask(4, 5)]
    s = M.score_sample([mask(0, 1), mask(2)], gts, None)   # IoUs 1.0 and 0.5, third target missed
    assert s.f1[0.5] == pytest.approx(2 * 2 / (2 + 3))
    assert s.iou == pytest.approx(3 / 6)


def test_hungarian_beats_greedy():
    iou = np.array([[0.6, 0.5], [0.5, 0.0]])
    # greedy (0,0) then (1,1) gives 1 TP at 0.5; the optimal assignment (0,1),(1,0) gives 2
    assert M.f1_from_iou(iou, 0.5) == 1.0
    assert M.f1_from_iou(np.zeros((0, 2)), 0.5) == 0.0
    assert M.f1_from_iou(np.zeros((0, 0)), 0.5) == 1.0


def _brute_force_f1(iou, t):
    p, g = iou.shape
    best_sum, best_tp = -1.0, 0
    for perm in itertools.permutations(range(max(p, g)), min(p, g)):
        pairs = [(i, perm[i]) for i in range(p)] if p <= g else [(perm[j], j) for j in range(g)]
        total = sum(iou[i, j] for i, j in pairs)
        if total > best_sum + 1e-12:
            best_sum, best_tp = total, sum(iou[i, j] >= t for i, j in pairs)
    return 2 * best_tp / (p + g)


def test_f1_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        p, g = rng.integers(1, 5, size=2)
        iou = rng.choice([0.0, 0.2, 0.3, 0.45, 0.55, 0.8, 1.0], size=(p, g)) + rng.uniform(0, 1e-3, size=(p, g))
        assert M.f1_from_iou(iou, 0.5) == pytest.approx(_brute_force_f1(iou, 0.5))


def test_box_iou_hand_computed():
    a = M.Box(np.zeros(3), np.ones(3))
    b = M.Box(np.array([0.5, 0.0, 0.0]), np.array([1.5, 1.0, 1.0]))
    assert M.box_iou(a, b) == pytest.approx(0.5 / 1.5)
    assert M.box_iou(a, M.Box(np.full(3, 2.0), np.full(3, 3.0))) == 0.0
    assert M.box_iou(None, a) == 0.0
    # from points: the predicted points span [0,1]^3, the target [0.5,1.5]x[0,1]^2
    coord = np.array([[0, 0, 0], [1, 1, 1], [0.5, 0, 0], [1.5, 1, 1]], dtype=np.float64)
    pred = M.as_mask([0, 1], 4)
    gt = M.as_mask([2, 3], 4)
    s = M.score_sample([pred], [gt], coord)
    assert s.box_iou == pytest.approx(1 / 3)
    assert s.iou == 0.0                       # no shared points, but the boxes overlap
    assert M.summarize([s], [[]])["overall"]["box_acc@0.25"] == 1.0


def test_summarize_groups():
    s_hit = M.score_sample([mask(1)], [mask(1)], None)
    s_miss = M.score_sample([mask(2)], [mask(1)], None)
    rows = [{"unique": True}, {"unique": False}, {"unique": False, "eval_type": "mt"}]
    out = M.summarize([s_hit, s_miss, s_hit], [M.sample_groups(r) for r in rows])
    assert out["overall"]["count"] == 3 and out["overall"]["acc@0.5"] == pytest.approx(2 / 3)
    assert out["unique"]["acc@0.5"] == 1.0 and out["multiple"]["acc@0.5"] == 0.5 and out["mt"]["count"] == 1


# ------------------------------------------------------------------------------------------------------
# files and CLI
# ------------------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_eval(tmp_path):
    scene = tmp_path / "processed" / "scene0001_00"
    scene.mkdir(parents=True)
    coord = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 1], [3, 3, 3], [4, 4, 4], [5, 5, 5], [6, 6, 6]],
                     dtype=np.float32)
    instance = np.array([0, 0, 0, 0, 1, 1, 2, -1], dtype=np.int32)
    np.save(scene / "coord.npy", coord)
    np.save(scene / "instance.npy", instance)
    base = {"text": "x", "object_name": None, "multiple": None, "eval_type": None, "easy": None, "view_dep": None,
            "distractors": None, "anchors": None, "program": None}
    gt = [
        {**base, "dataset": "scanrefer", "ann_id": "0_0", "scene_id": "scene0001_00", "targets": [0], "unique": True},
        {**base, "dataset": "scanrefer", "ann_id": "1_0", "scene_id": "scene0001_00", "targets": [1], "unique": False},
        {**base, "dataset": "multi3drefer", "ann_id": "7", "scene_id": "scene0001_00", "targets": [],
         "unique": None, "eval_type": "zt_w_d"},
    ]
    from data_prep.refer import write_refer_jsonl

    write_refer_jsonl([{**r, "multiple": None if r["unique"] is None else not r["unique"]} for r in gt],
                      tmp_path / "gt.jsonl")
    preds = [
        {"dataset": "scanrefer", "scene_id": "scene0001_00", "ann_id": "0_0", "pred_object_ids": [0]},
        {"dataset": "scanrefer", "scene_id": "scene0001_00", "ann_id": "1_0", "pred_masks": [[4, 6]]},  # IoU 1/3
        {"dataset": "multi3drefer", "scene_id": "scene0001_00", "ann_id": "7", "pred_masks": []},
    ]
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return tmp_path


def test_evaluate_files(tiny_eval):
    ev = M.evaluate_files(tiny_eval / "pred.jsonl", tiny_eval / "gt.jsonl", tiny_eval / "processed", progress=False)
    o = ev.metrics["overall"]
    assert o["count"] == 3 and o["miou"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert o["acc@0.25"] == 1.0 and o["acc@0.5"] == pytest.approx(2 / 3)
    assert ev.metrics["zt_w_d"]["f1@0.5"] == 1.0
    # box: pred [3..5]^3 vs target [3..4]^3 -> 1/8; single-target samples only
    assert o["box_count"] == 2
    assert [s["box_iou"] for s in ev.per_sample[:2]] == pytest.approx([1.0, 1 / 8])


def test_evaluate_rejects_missing_extra_and_bad_predictions(tiny_eval):
    lines = (tiny_eval / "pred.jsonl").read_text().splitlines()
    (tiny_eval / "p1.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match="no prediction"):
        M.evaluate_files(tiny_eval / "p1.jsonl", tiny_eval / "gt.jsonl", tiny_eval / "processed", progress=False)
    ev = M.evaluate_files(tiny_eval / "p1.jsonl", tiny_eval / "gt.jsonl", tiny_eval / "processed",
                          allow_missing=True, progress=False)
    assert ev.missing == 1 and ev.metrics["zt_w_d"]["f1@0.5"] == 1.0   # missing = empty prediction
    extra = json.dumps({"dataset": "scanrefer", "scene_id": "scene0001_00", "ann_id": "9_9", "pred_masks": []})
    (tiny_eval / "p2.jsonl").write_text("\n".join(lines + [extra]) + "\n")
    with pytest.raises(ValueError, match="match no referring row"):
        M.evaluate_files(tiny_eval / "p2.jsonl", tiny_eval / "gt.jsonl", tiny_eval / "processed", progress=False)
    (tiny_eval / "p3.jsonl").write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(ValueError, match="duplicate"):
        M.read_predictions(tiny_eval / "p3.jsonl")
    bad = json.dumps({"dataset": "scanrefer", "scene_id": "scene0001_00", "ann_id": "0_0", "pred_masks": [[99]]})
    (tiny_eval / "p4.jsonl").write_text("\n".join([bad] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="lie in"):
        M.evaluate_files(tiny_eval / "p4.jsonl", tiny_eval / "gt.jsonl", tiny_eval / "processed", progress=False)
    with pytest.raises(FileNotFoundError, match="coord.npy"):
        M.evaluate_files(tiny_eval / "pred.jsonl", tiny_eval / "gt.jsonl", tiny_eval / "nowhere", progress=False)


def test_eval_cli_writes_metrics(tiny_eval, capsys):
    from scene3d.cli import main

    out = tiny_eval / "m.json"
    rc = main(["eval", str(tiny_eval / "pred.jsonl"), "--gt", str(tiny_eval / "gt.jsonl"), "--processed",
               str(tiny_eval / "processed"), "--strict", "--out", str(out), "--no-progress"])
    assert rc == 0 and "IoU > k" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["strict"] is True and res["metrics"]["overall"]["count"] == 3
