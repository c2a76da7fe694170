"""scene3d.metrics: hand-computed cases (IoU, >= vs >, Hungarian F1, zero targets, duplicates, boxes) and the
`scene3d eval` predictions-file mode on a tiny processed scene."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

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


GT_OP = M.Conventions(mask_acc=">=", box_acc=">", f1=">", multi_mask_box="union")   # every option flipped


def test_default_conventions_are_the_peers():
    c = M.Conventions()
    assert (c.mask_acc, c.box_acc, c.f1, c.multi_mask_box) == (">", ">=", ">=", "first")
    text = c.describe()
    assert "IoU > k (3D-STMN, MDIN)" in text and "IoU >= k (ScanRefer, M3DRef-CLIP) on the first" in text
    assert "F1@k: IoU >= k (M3DRef-CLIP)" in text
    assert "not the default" in GT_OP.describe() and "3D-STMN" not in GT_OP.describe()
    assert M.Conventions("gt", "ge", "ge") == c          # shell-friendly spellings


def test_point_mask_acc_counts_iou_above_k_at_exact_ties():
    gt = [mask(3)]
    s25 = M.score_sample([mask(0, 1, 2, 3)], gt, None)               # IoU = 1/4 exactly
    s50 = M.score_sample([mask(1, 3)], gt, None)                     # IoU = 1/2 exactly
    assert s25.iou == 0.25 and s50.iou == 0.5
    peer = M.summarize([s25, s50], [[], []])["overall"]              # 3D-STMN tools/test.py, MDIN: IoU > k
    assert peer["acc@0.25"] == 0.5 and peer["acc@0.5"] == 0.0        # only 0.5 > 0.25 passes
    assert peer["miou"] == pytest.approx(0.375)
    ge = M.Conventions(mask_acc=">=")
    loose = M.summarize([M.score_sample([mask(0, 1, 2, 3)], gt, None, ge), M.score_sample([mask(1, 3)], gt, None, ge)],
                        [[], []])["overall"]
    assert loose["acc@0.25"] == 1.0 and loose["acc@0.5"] == 0.5 and loose["miou"] == peer["miou"]
    # the mask F1 keeps its own (M3DRef-CLIP) convention: one pred, one target, IoU 0.25 -> a TP at 0.25
    assert s25.mask_f1 == {0.25: 1.0, 0.5: 0.0} and s50.mask_f1 == {0.25: 1.0, 0.5: 1.0}


def _slab_scene():
    """Target: the 2x2x2 points of x in {0, 4} (box [0,4]x[0,1]^2, volume 4) plus inner points; predictions
    spanning x in [0,1] / [0,2] have box IoU exactly 0.25 / 0.5."""
    coord = np.array([[x, y, z] for x in range(5) for y in (0, 1) for z in (0, 1)], dtype=np.float64)  # 20 points
    xs = coord[:, 0]
    return coord, [np.ones(len(coord), dtype=bool)], (xs <= 1), (xs <= 2)


def test_box_acc_and_box_f1_count_iou_at_or_above_k_at_exact_ties():
    coord, gt, p25, p50 = _slab_scene()
    s25, s50 = M.score_sample([p25], gt, coord), M.score_sample([p50], gt, coord)
    assert s25.box_iou == 0.25 and s50.box_iou == 0.5
    peer = M.summarize([s25, s50], [[], []])["overall"]           # ScanRefer / M3DRef-CLIP: IoU >= k
    assert peer["box_count"] == 2 and peer["box_acc@0.25"] == 1.0 and peer["box_acc@0.5"] == 0.5
    assert s25.box_f1 == {0.25: 1.0, 0.5: 0.0} and s50.box_f1 == {0.25: 1.0, 0.5: 1.0}   # multi3drefer_evaluator
    # the same rows' point IoU is 8/20 and 12/20: the point-mask convention is not involved here
    assert (s25.iou, s50.iou) == (0.4, 0.6)
    st = [M.score_sample([p], gt, coord, GT_OP) for p in (p25, p50)]
    strict = M.summarize(st, [[], []])["overall"]
    assert strict["box_acc@0.25"] == 0.5 and strict["box_acc@0.5"] == 0.0
    assert st[0].box_f1 == {0.25: 0.0, 0.5: 0.0} and st[1].box_f1 == {0.25: 1.0, 0.5: 0.0}
    assert st[0].mask_f1 == {0.25: 1.0, 0.5: 0.0}                 # IoU 0.4 passes 0.25 either way


def test_multi_mask_box_is_the_first_masks_as_m3dref():
    coord, gt, p25, p50 = _slab_scene()
    far = np.zeros(len(coord), dtype=bool)
    far[[0, 19]] = True                                           # spans the whole target box
    empty = np.zeros(len(coord), dtype=bool)
    first = M.score_sample([empty, p50, far], gt, coord)          # an empty mask is no object: p50 is first
    assert first.box_iou == 0.5
    union = M.score_sample([empty, p50, far], gt, coord, M.Conventions(multi_mask_box="union"))
    assert union.box_iou == 1.0
    assert first.iou == union.iou == 13 / 20                      # point IoU always scores the union
    assert M.score_sample([far, p25], gt, coord).box_iou == 1.0   # order matters: the first mask's box
    assert M.score_sample([], gt, coord).box_iou == 0.0


def test_empty_prediction_and_zero_target_samples():
    empty_vs_target = M.score_sample([], [mask(1, 2)], None)
    assert empty_vs_target.iou == 0.0 and empty_vs_target.mask_f1 == {0.25: 0.0, 0.5: 0.0}
    # an empty mask in the list is "no object", not a prediction
    assert M.score_sample([mask()], [mask(1, 2)], None).mask_f1[0.25] == 0.0
    # zero targets = an empty target list (what the code counts; M3DRef-CLIP reads eval_type zt_*)
    zt_ok = M.score_sample([], [], None)
    assert zt_ok.iou == 1.0 and zt_ok.mask_f1 == {0.25: 1.0, 0.5: 1.0}     # Multi3DRefer: TP on zero target
    zt_bad = M.score_sample([mask(4)], [], None)
    assert zt_bad.iou == 0.0 and zt_bad.mask_f1 == {0.25: 0.0, 0.5: 0.0}
    coord = np.arange(3 * N, dtype=np.float64).reshape(N, 3)
    assert M.score_sample([], [], coord).box_f1 == {0.25: 1.0, 0.5: 1.0}
    assert M.score_sample([mask(4)], [], coord).box_f1 == {0.25: 0.0, 0.5: 0.0}


def test_duplicate_predictions_count_as_false_positives():
    gt = [mask(1, 2, 3)]
    s = M.score_sample([mask(1, 2, 3), mask(1, 2, 3)], gt, None)
    assert s.iou == 1.0                              # the union is still exact
    assert s.mask_f1[0.5] == pytest.approx(2 * 1 / (2 + 1))  # 1 TP, 1 FP, 0 FN


def test_multi_target_partial():
    gts = [mask(0, 1), mask(2, 3), mask(4, 5)]
    s = M.score_sample([mask(0, 1), mask(2)], gts, None)   # IoUs 1.0 and 0.5, third target missed
    assert s.mask_f1[0.5] == pytest.approx(2 * 2 / (2 + 3))
    assert s.iou == pytest.approx(3 / 6)


def test_hungarian_beats_greedy():
    iou = np.array([[0.6, 0.5], [0.5, 0.0]])
    # greedy (0,0) then (1,1) gives 1 TP at 0.5; the optimal assignment (0,1),(1,0) gives 2
    assert M.f1_from_iou(iou, 0.5) == 1.0
    assert M.f1_from_iou(np.zeros((0, 2)), 0.5) == 0.0
    assert M.f1_from_iou(np.zeros((0, 0)), 0.5) == 1.0


def _m3dref_f1(iou, t):
    """M3DRef-CLIP's evaluate_one_query step by step: a float32 square matrix of zeros holding the IoUs,
    linear_sum_assignment(matrix * -1), then TP over i in range(#pred) of matrix[row[i], col[i]] >= t."""
    from scipy.optimize import linear_sum_assignment

    p, g = iou.shape
    square = np.zeros((max(p, g), max(p, g)), dtype=np.float32)
    square[:p, :g] = iou
    row, col = linear_sum_assignment(square * -1)
    tp = sum(1 for i in range(p) if square[row[i], col[i]] >= t)
    return 2 * tp / (p + g)


def test_hungarian_ties_pair_as_m3dref():
    iou = np.array([[0, .25], [0, .75], [.25, 1]])
    # both pairings total 1.0; the rectangular maximisation takes (1,1),(2,0) -> 2 TP, F1 0.8; M3DRef-CLIP's
    # padded square takes (0,0),(2,1) -> 1 TP, F1 0.4
    assert M.f1_from_iou(iou, 0.25) == pytest.approx(0.4) == _m3dref_f1(iou, 0.25)
    rows, cols = M.match(iou)
    assert rows.tolist() == [0, 2] and cols.tolist() == [0, 1]
    assert M.f1_from_iou(iou.T, 0.25) == pytest.approx(_m3dref_f1(iou.T, 0.25))
    # tie-heavy random matrices (values exact in float32): same F1 as the peer on every one
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(21)
    differs_from_rectangular = 0
    for _ in range(10000):
        p, g = rng.integers(1, 5, size=2)
        m = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(p, g), p=[0.5, 0.125, 0.125, 0.125, 0.125])
        for t in M.THRESHOLDS:
            assert M.f1_from_iou(m, t) == pytest.approx(_m3dref_f1(m, t))
        r, c = linear_sum_assignment(m, maximize=True)
        differs_from_rectangular += 2 * np.count_nonzero(m[r, c] >= 0.25) / (p + g) != M.f1_from_iou(m, 0.25)
    assert differs_from_rectangular > 0        # 16 of these 10,000 draws: the old pairing would fail here


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
        assert M.f1_from_iou(iou, 0.5) == pytest.approx(_brute_force_f1(iou, 0.5))   # no ties: one optimum


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


def test_conventions_and_thresholds_reject_bad_values():
    with pytest.raises(ValueError, match="mask_acc: expected"):
        M.Conventions(mask_acc="=>")
    with pytest.raises(ValueError, match="f1: expected"):
        M.Conventions(f1="<")
    with pytest.raises(ValueError, match="multi_mask_box"):
        M.Conventions(multi_mask_box="last")
    with pytest.raises(ValueError, match="thresholds"):
        M.score_sample([mask(1)], [mask(1)], None, thresholds=(0.0,))
    with pytest.raises(ValueError, match="different conventions"):
        M.summarize([M.score_sample([mask(1)], [mask(1)], None),
                     M.score_sample([mask(1)], [mask(1)], None, GT_OP)], [[], []])
    with pytest.raises(TypeError, match="Conventions"):
        M.evaluate_rows({}, [], ".", True)           # the old positional ``strict`` must not pass silently


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
    assert ev.metrics["zt_w_d"]["mask_f1@0.5"] == 1.0 and ev.metrics["zt_w_d"]["box_f1@0.5"] == 1.0
    assert o["acc@0.25"] == 1.0            # the 1/3 row passes 0.25 under either point-mask convention
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
    assert ev.missing == 1 and ev.metrics["zt_w_d"]["box_f1@0.5"] == 1.0   # missing = empty prediction
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


def _eval(tiny_eval, *flags):
    from scene3d.cli import main

    return main(["eval", str(tiny_eval / "pred.jsonl"), "--gt", str(tiny_eval / "gt.jsonl"), "--processed",
                 str(tiny_eval / "processed"), "--no-progress", *flags])


def test_eval_cli_prints_each_convention_and_both_f1s(tiny_eval, capsys):
    out = tiny_eval / "m.json"
    assert _eval(tiny_eval, "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "point-mask Acc@k: IoU > k (3D-STMN, MDIN)" in text and "box Acc@k: IoU >= k (ScanRefer" in text
    header = next(line for line in text.splitlines() if line.startswith("group"))
    assert header.split()[1:] == list(M.TABLE_KEYS)
    assert header.index("box_f1@0.25") < header.index("mask_f1@0.25")      # the benchmark F1, then the mask F1
    assert "box_f1@k: the Multi3DRefer benchmark F1 (box IoU)" in text
    res = json.loads(out.read_text())
    assert res["conventions"] == M.Conventions().as_dict() and res["metrics"]["overall"]["count"] == 3
    assert set(res["per_sample"][0]) >= {"iou", "box_iou", "box_f1@0.25", "mask_f1@0.5"}


def test_eval_cli_convention_flags(tiny_eval, capsys):
    out = tiny_eval / "m.json"
    assert _eval(tiny_eval, "--mask-acc", "ge", "--box-acc", ">", "--f1", "gt", "--multi-mask-box", "union",
                 "--out", str(out)) == 0
    assert "not the default" in capsys.readouterr().out
    assert json.loads(out.read_text())["conventions"] == GT_OP.as_dict()


@pytest.mark.parametrize("flags, message", [
    (["--mask-acc", "=>"], "--mask-acc: expected '>' (gt) or '>=' (ge), got '=>'"),
    (["--box-acc", "lt"], "--box-acc: expected"),
    (["--f1", ""], "--f1: expected"),
    (["--multi-mask-box", "last"], "--multi-mask-box: expected 'first' or 'union', got 'last'"),
    (["--strict", "--mask-acc", ">="], "--strict contradicts --mask-acc >="),
])
def test_eval_cli_bad_convention_is_one_line_naming_the_flag(tiny_eval, flags, message):
    with pytest.raises(SystemExit) as exc:
        _eval(tiny_eval, *flags)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_eval_cli_strict_is_a_deprecated_no_op(tiny_eval, capsys):
    a, b = tiny_eval / "a.json", tiny_eval / "b.json"
    assert _eval(tiny_eval, "--out", str(a)) == 0
    capsys.readouterr()
    assert _eval(tiny_eval, "--strict", "--out", str(b)) == 0
    assert "--strict is deprecated and changes nothing" in capsys.readouterr().out
    assert json.loads(a.read_text()) == json.loads(b.read_text())


def test_eval_checkpoint_mode_rejects_convention_flags(tmp_path):
    import argparse

    from scene3d.cli.evaluate import evaluate_checkpoint

    args = argparse.Namespace(predictions=tmp_path, gt=None, processed=None, out=None, allow_missing=False,
                              mask_acc=None, box_acc=">", f1=None, multi_mask_box="union", strict=False,
                              no_progress=True, overrides=[], objects=None)
    with pytest.raises(SystemExit, match="--box-acc, --multi-mask-box belong to the predictions-file mode"):
        evaluate_checkpoint(args)


# ------------------------------------------------------------------------------------------------------
# golden numbers: a fixed prediction file (tests/golden/metrics_fixture.json), so a silent change shows
# ------------------------------------------------------------------------------------------------------
GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture()
def golden_scene(tmp_path):
    fx = json.loads((GOLDEN / "metrics_fixture.json").read_text())
    scene = tmp_path / fx["scene_id"]
    scene.mkdir()
    np.save(scene / "coord.npy", np.array(fx["coord"], dtype=np.float64))
    np.save(scene / "instance.npy", np.array(fx["instance"], dtype=np.int64))
    return fx, tmp_path


def _same(got, want, where):
    if want is None:
        assert got is None or math.isnan(got), where
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=0, abs=1e-12), where
    else:
        assert got == want, where


@pytest.mark.parametrize("run", ["default", "flipped"])
def test_golden_metrics(golden_scene, run):
    fx, processed = golden_scene
    want = json.loads((GOLDEN / "metrics_expected.json").read_text())["runs"][run]
    conv = M.Conventions(**want["conventions"])
    assert (conv == M.Conventions()) == (run == "default")
    preds = {M._key(p): {**p, "_where": f"fixture {p['ann_id']}"} for p in fx["predictions"]}
    ev = M.evaluate_rows(preds, fx["refer"], processed, conv, progress=False)
    assert list(ev.metrics) == list(want["metrics"])
    for g, res in want["metrics"].items():
        assert list(ev.metrics[g]) == list(res)
        for k, v in res.items():
            _same(ev.metrics[g][k], v, f"{run} {g} {k}")
    for got, exp in zip(ev.per_sample, want["per_sample"], strict=True):
        for k, v in exp.items():
            _same(got[k], v, f"{run} {exp['ann_id']} {k}")


def test_golden_hand_rows_are_what_their_names_say(golden_scene):
    """The fixture's hand-made rows, scored from first principles: the golden file rests on these."""
    fx, processed = golden_scene
    preds = {M._key(p): {**p, "_where": "fixture"} for p in fx["predictions"]}
    ev = M.evaluate_rows(preds, fx["refer"], processed, progress=False)
    by = {s["ann_id"]: s for s in ev.per_sample}
    assert (by["h25"]["iou"], by["h25"]["box_iou"]) == (0.25, 0.25)
    assert (by["h50"]["iou"], by["h50"]["box_iou"]) == (0.5, 0.5)
    assert by["hfirst"]["box_iou"] == 0.5                      # first mask's box; the union's is 0.25
    flipped = M.evaluate_rows(preds, fx["refer"], processed, GT_OP, progress=False)
    assert next(s for s in flipped.per_sample if s["ann_id"] == "hfirst")["box_iou"] == 0.25
    assert by["htie"]["box_f1@0.25"] == pytest.approx(0.4)    # M3DRef-CLIP's pairing; the rectangular one: 0.8
