"""configs/experiment/real_rescan.yaml: synthetic scenes + one real scan (scene0000_01) with its generated
expressions in training, the other rescan's (scene0000_02) generated expressions in evaluation. A smoke run
with the tiny LLM and a few steps: the config composes, the training data mix both sources, training runs,
and a checkpoint evaluates on scene0000_02 with ground-truth instances. (The two exports are rescans of one
room: this measures rescan generalisation, not new rooms.)"""

from __future__ import annotations

import csv
import json
import os

import pytest
from torch.utils.data import ConcatDataset

from data_prep.synthetic import prepare_synthetic
from scene3d.cli import main as cli
from scene3d.config import compose, to_objects
from scene3d.data.assembly import training_dataset
from scene3d.data.referring import read_jsonl

MMDET = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"
SYN = dict(num_scenes=3, seed=0, val_fraction=0.34)


@pytest.fixture(scope="module")
def env(real_data, tmp_path_factory):
    """SCENE3D_CACHE / SCENE3D_REAL_DATA for the config's interpolations, the synthetic scenes and the two
    generated jsonl files made the way the config's comment says."""
    cache = tmp_path_factory.mktemp("cache")
    old = {k: os.environ.get(k) for k in ("SCENE3D_CACHE", "SCENE3D_REAL_DATA")}
    os.environ["SCENE3D_CACHE"], os.environ["SCENE3D_REAL_DATA"] = str(cache), str(real_data)
    prepare_synthetic(cache / f"synthetic_tiny_s{SYN['seed']}_n{SYN['num_scenes']}_v{SYN['val_fraction']}",
                      progress=False, **SYN)
    for sid, cap in (("scene0000_01", ["--zero-share", "0.5"]), ("scene0000_02", [])):
        assert cli(["prep", "refer", "--dataset", "generated", "--processed", str(real_data / MMDET), "--scenes", sid,
                    "--per-op", "8", *cap, "--out", str(cache / "real_rescan" / f"{sid}.jsonl"),
                    "--no-progress"]) == 0
    yield cache, real_data
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def overrides(steps: int) -> list[str]:
    return ["experiment=real_rescan", "llm=tiny", f"data.synthetic.num_scenes={SYN['num_scenes']}",
            f"data.synthetic.val_fraction={SYN['val_fraction']}", "data.max_points=1500",
            f"trainer.max_steps={steps}", "trainer.batch_size=2", "trainer.ckpt_every=0", "trainer.log_every=1",
            "trainer.warmup_steps=1", "trainer.progress=false", "eval.max_samples=4", "eval.progress=false"]


def test_config_mixes_synthetic_and_real_rows(env):
    cache, real = env
    obj = to_objects(compose("train", overrides(2)))
    assert obj.eval.samples == str(cache / "real_rescan" / "scene0000_02.jsonl")
    assert obj.eval.processed_dir.startswith(str(real))
    ds = training_dataset(obj.data, seed=0)
    assert isinstance(ds, ConcatDataset) and len(ds.datasets) == 2
    synth, scan = ds.datasets
    real_rows = read_jsonl(cache / "real_rescan" / "scene0000_01.jsonl")
    assert {r["scene_id"] for r in scan.rows} == {"scene0000_01"} and scan.rows == real_rows
    assert "scene0000_01" not in {r["scene_id"] for r in synth.rows}
    assert len(scan) == obj.data.extra_train[0].repeat * len({tuple(g) for g in scan.groups})
    item = ds[len(synth)]  # the first real item: a subsample of the real scan, rows of that scan
    assert item["scene_id"] == "scene0000_01" and item["points"]["coord"].shape[0] == 1500
    # every object keeps points in the subsample (a 41-point object is 0.05 % of the scan)
    scene = scan.scene("scene0000_01")
    kept = set(item["points"]["instance"].tolist())
    assert {o.id for o in scene.objects} <= kept
    assert all(r["dataset"] == "generated" for r in item["samples"])
    # two repetitions of one item draw different subsamples
    again = ds[len(synth) + len(scan) // obj.data.extra_train[0].repeat]
    assert [r["ann_id"] for r in again["samples"]] == [r["ann_id"] for r in item["samples"]]
    assert not again["points"]["coord"].equal(item["points"]["coord"])
    # the experiment turns every source's items by quarter turns (scene0000_02 lies a quarter turn away)
    assert synth.rotate and scan.rotate and obj.data.rotate


def test_a_scene_in_two_sources_is_an_error(env, tmp_path):
    cache, real = env
    rows = read_jsonl(cache / "real_rescan" / "scene0000_01.jsonl")
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose("train", overrides(1) + [f"data.train={dup}", f"data.processed_dir={real / MMDET}",
                                           f"data.val={dup}", "data.synthetic=null"])
    with pytest.raises(ValueError, match="scene0000_01 is in both"):
        training_dataset(to_objects(cfg).data, seed=0)


def test_smoke_train_and_evaluate_on_the_other_rescan(env, tmp_path):
    cache, real = env
    out = tmp_path / "run"
    assert cli(["train", *overrides(3), f"out_dir={out}"]) == 0
    ev = tmp_path / "ev"
    assert cli(["eval", str(out), f"eval.samples={cache / 'real_rescan' / 'scene0000_02.jsonl'}",
                f"eval.processed_dir={real / MMDET}", "eval.max_samples=6", f"out_dir={ev}", "--no-progress"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    preds = [json.loads(x) for x in (ev / "predictions.jsonl").read_text().splitlines()]
    assert metrics["step"] == 3 and metrics["num_samples"] == 6 == len(preds)
    assert {p["scene_id"] for p in preds} == {"scene0000_02"}
    assert 0.0 <= metrics["metrics"]["overall"]["miou"] <= 1.0


def test_keep_every_object_swaps_points_in_and_keeps_the_size():
    import numpy as np

    from scene3d.data.referring import keep_every_object

    rng = np.random.default_rng(0)
    instance = np.concatenate([np.full(900, -1), np.full(90, 0), np.full(5, 1), np.full(30, 2)]).astype(np.int32)
    keep = np.sort(rng.choice(len(instance), 100, replace=False))
    keep[np.isin(instance[keep], [1, 2])] = 0  # objects 1 and 2 lost by the draw
    keep = np.unique(keep)
    out = keep_every_object(instance, keep, rng, min_points=8)
    assert len(out) == len(keep) and len(np.unique(out)) == len(out)
    counts = {i: int((instance[out] == i).sum()) for i in (0, 1, 2)}
    assert counts[1] == 5 and counts[2] == 8 and counts[0] >= 8  # all of a small object, min_points of the others
    full = np.arange(len(instance))
    assert keep_every_object(instance, full, rng) is full  # nothing short: unchanged


def test_token_stage_on_the_real_scan_then_referring_from_it(env, tmp_path):
    """stage=tokens on the experiment's data (synthetic scenes + scene0000_01 with its annotated classes, points
    dropped): the name alignment is logged and positive, and the referring stage starts from its weights."""
    tok, ref = tmp_path / "tok", tmp_path / "ref"
    assert cli(["train", *overrides(2), "stage=tokens", "data.point_dropout=0.5", "data.extra_train.0.repeat=10",
                f"out_dir={tok}"]) == 0
    logged = [r for r in csv.DictReader(open(tok / "metrics.csv")) if r["split"] == "train"]
    assert len(logged) == 2 and all(float(r["obj_name"]) > 0 for r in logged)
    assert cli(["train", *overrides(1), f"trainer.init_from={tok}", "eval.in_training=false",
                f"out_dir={ref}"]) == 0
    assert (ref / "checkpoints").is_dir()


def test_descriptors_name_most_objects_of_the_other_rescan(real_data):
    """The tokenizer's descriptors (``model.tokenizer.descriptors``) with the colour statistics, read by the
    nearest object of one rescan, name most objects of the other (bench/real_rescan.py's reference line; 50 of
    59 as measured), in both directions, and far fewer when the descriptors are left out (only colour)."""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import real_rescan

    right, total = real_rescan.descriptor_nn(real_data / MMDET, "scene0000_01", ["scene0000_02"])
    assert total == 59 and right >= 0.75 * total, (right, total)
    back, total_back = real_rescan.descriptor_nn(real_data / MMDET, "scene0000_02", ["scene0000_01"])
    assert total_back == 60 and back >= 0.75 * 60, (back, total_back)
    labels_a, a = real_rescan.descriptor_features(real_data / MMDET, "scene0000_01")
    labels_b, b = real_rescan.descriptor_features(real_data / MMDET, "scene0000_02")
    colour_only = np.abs(b[:, None, 5:] - a[None, :, 5:]).sum(-1).argmin(1)
    assert sum(labels_a[j] == t for j, t in zip(colour_only, labels_b)) < right - 10


def test_answer_kinds_tell_how_a_row_is_wrong(real_data):
    """bench/real_rescan.py's readout of wrong answers on scene0000_02: a mask read as the instance holding most of
    its points; right (IoU >= 0.5), nothing, another object of a target's class, the anchor, another class; the
    zero-target rows left out."""
    import sys
    from pathlib import Path

    import numpy as np

    from data_prep import real_refer
    from scene3d.data.labels import clean_label
    from scene3d.data.scene import load_processed_scene

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import real_rescan

    processed = real_data / MMDET
    scene = load_processed_scene(processed / "scene0000_02")
    label = {int(o.id): clean_label(o.label) for o in scene.objects}
    rows = real_refer.generate_rows(processed, ["scene0000_02"], max_per_op=8, progress=False).rows
    # a single-target row with an anchor, whose class has another object in the scan
    row = next(r for r in rows if len(r["targets"]) == 1 and r.get("anchors")
               and sum(v == label[r["targets"][0]] for i, v in label.items() if i not in r["anchors"]) > 1)
    target, anchor = int(row["targets"][0]), int(row["anchors"][0])
    twin = next(i for i, v in label.items() if v == label[target] and i not in (target, anchor))
    other = next(i for i, v in label.items() if v != label[target] and i not in (target, anchor)
                 and (scene.instance == i).any())
    pts = {i: np.flatnonzero(scene.instance == i) for i in (target, anchor, twin, other)}
    zero = next(r for r in rows if not r["targets"])
    cases = [("right", [pts[target]], 1.0), ("none", [], 0.0), ("same class, wrong object", [pts[twin]], 0.0),
             ("the anchor", [pts[anchor]], 0.0), ("another class", [pts[other][: len(pts[other]) // 2 + 1]], 0.0)]
    for kind, masks, iou in cases:
        ann = f"{row['ann_id']}-{kind}"
        case = dict(row, ann_id=ann)
        preds = [{"scene_id": "scene0000_02", "ann_id": ann, "pred_masks": [m.tolist() for m in masks]},
                 {"scene_id": "scene0000_02", "ann_id": zero["ann_id"], "pred_masks": []}]
        per_sample = [{"scene_id": "scene0000_02", "ann_id": ann, "iou": iou},
                      {"scene_id": "scene0000_02", "ann_id": zero["ann_id"], "iou": 1.0}]
        out = real_rescan.answer_kinds([case, zero], preds, per_sample, processed)
        assert len(out) == 1 and out[0][0] == kind, (kind, out)
        assert out[0][2] == [label[target]]
    line = real_rescan.answer_kinds_line([("right", "", [], []), ("none", "", [], []), ("none", "", [], [])])
    assert "3 rows with targets: 1 right, 2 none, 0 the anchor, 0 same class" in line


def test_shuffled_classes_deal_the_classes_out_again():
    """bench/real_rescan.py --names shuffled: every object keeps one class for all its points, each class keeps
    its number of objects, unannotated points stay 0, and some objects change class."""
    import sys
    from pathlib import Path

    import numpy as np

    from scene3d.tokenizer.instance_proposals import TrainScan

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import real_rescan

    rng = np.random.default_rng(0)
    instance = np.repeat(np.arange(-1, 12), 5)
    classes = {i: c for i, c in zip(range(12), [3, 3, 5, 5, 5, 7, 8, 9, 10, 11, 12, 14])}
    semantic = np.array([classes.get(int(i), 0) for i in instance])
    scan = TrainScan("s", rng.normal(size=(len(instance), 3)), np.zeros((len(instance), 3)), instance, semantic)
    out = real_rescan.shuffled_classes(scan, np.random.default_rng(1))
    dealt = {}
    for i in range(12):
        vals = np.unique(out.semantic[instance == i])
        assert vals.size == 1
        dealt[i] = int(vals[0])
    assert sorted(dealt.values()) == sorted(classes.values())
    assert (out.semantic[instance < 0] == 0).all()
    assert sum(dealt[i] != classes[i] for i in range(12)) >= 4
    assert (scan.semantic == semantic).all()  # the input is left as it was
