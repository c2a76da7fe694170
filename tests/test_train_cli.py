"""`scene3d train` / `python -m scene3d.train` / `scene3d eval CKPT` end to end on a few synthetic scenes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scene3d.cli import main as cli
from data_prep.synthetic import prepare_synthetic

REPO = Path(__file__).resolve().parents[1]
SYN = dict(num_scenes=3, seed=0, val_fraction=0.34)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """SCENE3D_CACHE for this module, with the synthetic scenes the configs below ask for already made."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SCENE3D_CACHE")
    os.environ["SCENE3D_CACHE"] = str(root)
    prepare_synthetic(root / f"synthetic_tiny_s{SYN['seed']}_n{SYN['num_scenes']}_v{SYN['val_fraction']}",
                      progress=False, **SYN)
    yield root
    if old is None:
        os.environ.pop("SCENE3D_CACHE", None)
    else:
        os.environ["SCENE3D_CACHE"] = old


def common(steps: int = 4) -> list[str]:
    return ["experiment=synthetic_cpu", f"data.synthetic.num_scenes={SYN['num_scenes']}",
            f"data.synthetic.val_fraction={SYN['val_fraction']}", "data.max_points=1500",
            f"trainer.max_steps={steps}", "trainer.batch_size=2", "trainer.ckpt_every=2", "trainer.log_every=1",
            "trainer.warmup_steps=1", "trainer.progress=false", "eval.max_samples=3"]


def data_paths(cache: Path) -> tuple[Path, Path]:
    root = cache / f"synthetic_tiny_s{SYN['seed']}_n{SYN['num_scenes']}_v{SYN['val_fraction']}"
    return root / "processed", root / "refer"


@pytest.fixture(scope="module")
def run4(cache, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "r4"
    assert cli(["train", *common(4), f"out_dir={out}"]) == 0
    return out


def params_of(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


def test_train_writes_checkpoints_metrics_events_and_plot(run4):
    ck = run4 / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    for step in (2, 4):
        d = ck / f"step_{step:08d}"
        assert {"model.safetensors", "trainer_state.safetensors", "trainer_state.json", "config.yaml",
                "meta.json"} <= {p.name for p in d.iterdir()}
    rows = list(csv.DictReader(open(run4 / "metrics.csv")))
    train = [r for r in rows if r["split"] == "train"]
    assert [int(r["step"]) for r in train] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 for r in train)
    ev = [r for r in rows if r["split"] == "eval"]
    assert len(ev) == 1 and 0.0 <= float(ev[0]["miou"]) <= 1.0 and "acc@0.5" in ev[0]
    assert list((run4 / "tb").glob("events.out.tfevents.*"))
    assert (run4 / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the checkpoint alone rebuilds the model (load_model reads config.yaml's `model` key, no hydra, no pickle)
    from scene3d.models.loading import load_model

    loaded = load_model(run4)
    assert loaded.step == 4 and loaded.config["experiment"] == "synthetic_cpu"
    assert loaded.model.config.tokenizer.voxel_size == loaded.config["model"]["tokenizer"]["voxel_size"]
    saved = params_of(ck / "step_00000004")
    own = loaded.model.state_dict()
    assert saved and all(torch.equal(own[k], v) for k, v in saved.items())


def test_a_checkpoint_of_another_architecture_is_refused_with_its_number(run4, tmp_path):
    """Architecture 2 read the decoder's sentence state at [SEG]; its weights would load into architecture 3
    without error and silently read another state, so load_model refuses it (and a config without a number)."""
    import yaml

    from scene3d.engine.checkpoint import CheckpointError
    from scene3d.models.loading import load_model

    for arch in (2, None):
        ck = tmp_path / f"arch{arch}"
        shutil.copytree(run4 / "checkpoints" / "step_00000004", ck)
        cfg = yaml.safe_load((ck / "config.yaml").read_text())
        if arch is None:
            del cfg["model"]["referring"]["architecture"]
        else:
            cfg["model"]["referring"]["architecture"] = arch
        (ck / "config.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(CheckpointError, match=f"model architecture {arch or 1} .*builds architecture 3"):
            load_model(ck)


def test_resume_after_losing_the_last_checkpoint_reaches_the_same_weights(run4, tmp_path, cache):
    """Resume from step 2 (as after a kill between the two saves): steps 3-4 again give bit-identical weights."""
    run = tmp_path / "r"
    shutil.copytree(run4, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # `latest` now names a missing dir: step 2 is used
    assert cli(["train", *common(4), f"out_dir={run}", "resume=true"]) == 0
    a, b = params_of(run4 / "checkpoints" / "step_00000004"), params_of(run / "checkpoints" / "step_00000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # rows after the resumed checkpoint were replaced, not duplicated


def test_resume_needs_an_out_dir(cache, capsys):
    # the console prints one line naming the problem (scene3d.cli.main), no traceback
    assert cli(["train", *common(2), "resume=true"]) == 1
    err = capsys.readouterr().err
    assert "resume=true needs out_dir" in err and "Traceback" not in err


def test_alignment_rows_come_from_objects_json(cache):
    from scene3d.train import alignment_rows

    processed, _ = data_paths(cache)
    scenes = sorted(p.name for p in processed.iterdir())
    rows = alignment_rows(processed, scenes, negatives=1, skip_labels=["wall", "floor"])
    for sid in scenes:  # independent reading of objects.json
        objs = json.loads((processed / sid / "objects.json").read_text())["objects"]
        by_label: dict = {}
        for o in objs:
            if o["label"] not in ("wall", "floor") and o["num_points"] > 0:
                by_label.setdefault(o["label"], []).append(o["id"])
        mine = [r for r in rows if r["scene_id"] == sid]
        alls = {r["object_name"]: r["targets"] for r in mine if r["ann_id"].startswith("all:")}
        assert alls == {k: sorted(v) for k, v in by_label.items()}
        singles = {r["object_name"]: r["targets"] for r in mine if r["ann_id"].startswith("the:")}
        assert singles == {k: v for k, v in by_label.items() if len(v) == 1}
        assert all(r["text"] == f"the {r['object_name']}" for r in mine if r["ann_id"].startswith("the:"))
        neg = [r for r in mine if r["ann_id"].startswith("none:")]
        assert len(neg) <= 1 and all(r["targets"] == [] and r["object_name"] not in by_label for r in neg)
    keys = [(r["scene_id"], r["ann_id"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_stage2_starts_from_stage1(cache, tmp_path):
    s1, s2, fresh = tmp_path / "s1", tmp_path / "s2", tmp_path / "fresh"
    assert cli(["train", *common(2), "stage=alignment", f"out_dir={s1}"]) == 0
    cfg1 = (s1 / "config.yaml").read_text()
    assert "task: alignment" in cfg1
    # a (practically) zero learning rate: stage 2's weights after one step are stage 1's
    tiny = ["trainer.lr=1e-12", "trainer.max_steps=1", "eval.in_training=false"]
    assert cli(["train", *common(1), *tiny, "stage=referring", f"trainer.init_from={s1}", f"out_dir={s2}"]) == 0
    assert cli(["train", *common(1), *tiny, "stage=referring", f"out_dir={fresh}"]) == 0
    w1 = params_of(s1 / "checkpoints" / "step_00000002")
    w2 = params_of(s2 / "checkpoints" / "step_00000001")
    w0 = params_of(fresh / "checkpoints" / "step_00000001")
    learned = [k for k in w1 if "running_" not in k and "num_batches" not in k and not torch.equal(w1[k], w0[k])]
    assert learned  # stage 1 moved some weights away from the initialisation
    assert all(torch.allclose(w2[k], w1[k], atol=1e-7) for k in learned)


def test_eval_checkpoint_writes_predictions_and_metrics(run4, cache, tmp_path, capsys):
    out = tmp_path / "ev"
    assert cli(["eval", str(run4), f"out_dir={out}", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    processed, refer = data_paths(cache)
    val = [json.loads(x) for x in (refer / "val.jsonl").read_text().splitlines() if x.strip()]
    assert metrics["step"] == 4 and metrics["num_samples"] == len(val) == len(preds)
    assert [(p["scene_id"], p["ann_id"]) for p in preds] == [(r["scene_id"], r["ann_id"]) for r in val]
    for p in preds:
        assert set(p) >= {"dataset", "scene_id", "ann_id", "pred_masks"}
    # the predictions file scores the same in the predictions-file mode (docs/predictions_format.md)
    m2 = tmp_path / "m2.json"
    assert cli(["eval", str(out / "predictions.jsonl"), "--gt", str(refer / "val.jsonl"), "--processed",
                str(processed), "--out", str(m2), "--no-progress"]) == 0
    again = json.loads(m2.read_text())["metrics"]["overall"]
    for k in ("miou", "acc@0.25", "acc@0.5"):
        assert again[k] == pytest.approx(metrics["metrics"]["overall"][k])
    # default output dir: <run>/eval/<split>_step<step>; eval.max_samples limits the rows
    assert cli(["eval", str(run4 / "checkpoints"), "eval.max_samples=2", "eval.mask=decoder", "--no-progress"]) == 0
    small = json.loads((run4 / "eval" / "val_step4" / "metrics.json").read_text())
    assert small["num_samples"] == 2 and small["mask"] == "decoder"


def test_eval_argument_errors(run4, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="without a checkpoint"):
        cli(["eval", str(tmp_path / "empty")])
    p = tmp_path / "p.jsonl"
    p.write_text("")
    with pytest.raises(SystemExit, match="unrecognized"):
        cli(["eval", str(p), "--gt", str(p), "--processed", str(tmp_path), "eval.split=val"])
    with pytest.raises(SystemExit, match="--gt"):
        cli(["eval", str(p)])
    with pytest.raises(SystemExit, match="predictions-file mode"):
        cli(["eval", str(run4), "--gt", str(p)])
    assert cli(["eval", str(run4), "eval.splitt=val"]) == 2
    assert "config error" in capsys.readouterr().err


def test_train_config_errors_exit_2(capsys):
    assert cli(["train", "trainer.lrr=1"]) == 2
    assert cli(["train", "+trainer.lrr=1"]) == 2
    assert cli(["train", "trainer.precision=fp8"]) == 2
    err = capsys.readouterr().err
    assert err.count("config error") == 3 and "lrr" in err and "precision" in err


def test_python_m_scene3d_train_from_another_directory(cache, tmp_path):
    """Default run dir runs/<experiment>/<timestamp> under the cwd; hydra writes nothing else there."""
    env = {**os.environ, "SCENE3D_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "scene3d.train", *common(1), "eval.in_training=false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    (run,) = list((tmp_path / "runs" / "synthetic_cpu").iterdir())
    assert (run / "checkpoints" / "step_00000001" / "model.safetensors").exists()
    assert f"trained to step 1: {Path('runs') / 'synthetic_cpu' / run.name}" in res.stdout


def test_eval_checkpoint_on_the_paraphrase_split(run4, cache, tmp_path):
    """`scene3d eval CKPT data=synthetic ... data.val=<root>/refer/val_paraphrase.jsonl` (README) scores the
    paraphrase twins of the val rows: the same rows, targets and programs, other words."""
    out = tmp_path / "para"
    syn = [f"data.synthetic.num_scenes={SYN['num_scenes']}", f"data.synthetic.val_fraction={SYN['val_fraction']}"]
    assert cli(["eval", str(run4), "data=synthetic", *syn, "data.val=${data.synthetic.root}/refer/val_paraphrase.jsonl",
                f"out_dir={out}", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    _, refer = data_paths(cache)
    val = [json.loads(x) for x in (refer / "val.jsonl").read_text().splitlines() if x.strip()]
    para = [json.loads(x) for x in (refer / "val_paraphrase.jsonl").read_text().splitlines() if x.strip()]
    assert metrics["num_samples"] == len(para) == len(val) > 0
    assert {p["dataset"] for p in metrics["per_sample"]} == {"multi3drefer_paraphrase"}
    assert [(r["scene_id"], r["ann_id"], r["targets"]) for r in para] == [
        (r["scene_id"], r["ann_id"], r["targets"]) for r in val]
    assert all(a["text"] != b["text"] for a, b in zip(para, val))
    assert metrics["split"] == "val_paraphrase"
    # the default output dir is named after the split's file, not "val" (no clash with the template split)
    assert cli(["eval", str(run4), "data=synthetic", *syn, "data.val=${data.synthetic.root}/refer/val_paraphrase.jsonl",
                "eval.max_samples=2", "--no-progress"]) == 0
    assert (run4 / "eval" / "val_paraphrase_step4" / "metrics.json").is_file()


def test_token_stage_trains_the_tokenizer_and_projector_only(cache, tmp_path):
    """stage=tokens (model.objective=object_names): the object-name alignment and the proposal loss move the
    3D tokenizer and the projector; the LLM (its adapters and new token rows) and the mask decoder keep their
    initial weights; the referring stage starts from it (trainer.init_from)."""
    tok, fresh, ref = tmp_path / "tok", tmp_path / "fresh", tmp_path / "ref"
    assert cli(["train", *common(2), "stage=tokens", "data.point_dropout=0.3", f"out_dir={tok}"]) == 0
    assert "objective: object_names" in (tok / "config.yaml").read_text()
    with open(tok / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    assert logged and "obj_name" in logged[0] and "lm" not in logged[0]
    assert all(float(r["obj_name"]) > 0 for r in logged if r["split"] == "train")
    tiny = ["trainer.lr=1e-12", "trainer.max_steps=1", "eval.in_training=false"]
    assert cli(["train", *common(1), *tiny, f"out_dir={fresh}"]) == 0  # ~ the initial weights (same seed)
    w1, w0 = params_of(tok / "checkpoints" / "step_00000002"), params_of(fresh / "checkpoints" / "step_00000001")
    assert set(w1) == set(w0)
    moved = {k for k in w1 if "running_" not in k and "num_batches" not in k
             and not torch.allclose(w1[k], w0[k], atol=1e-6)}
    assert any(k.startswith("tokenizer3d.backbone.") for k in moved)
    assert any(k.startswith("segmenter.projector.") for k in moved)
    assert all(k.startswith(("tokenizer3d.", "segmenter.projector.")) for k in moved), sorted(moved)[:5]
    assert cli(["train", *common(1), *tiny, f"trainer.init_from={tok}", f"out_dir={ref}"]) == 0
    w2 = params_of(ref / "checkpoints" / "step_00000001")
    assert all(torch.allclose(w2[k], w1[k], atol=1e-7) for k in moved)


def test_bad_objective_is_refused(cache, tmp_path, capsys):
    assert cli(["train", *common(1), "model.objective=names", f"out_dir={tmp_path / 'x'}"]) != 0
    assert "model.objective" in capsys.readouterr().err


def test_tokenizer_lr_scale_zero_keeps_the_tokenizer_weights(cache, tmp_path, capsys):
    """model.tokenizer_lr_scale=0 (a tokenizer pretrained by stage=tokens kept as it is): training moves the
    referring head and never the tokenizer's weights; 0.5 moves them."""
    frozen, half, fresh = tmp_path / "frozen", tmp_path / "half", tmp_path / "fresh"
    assert cli(["train", *common(2), "model.tokenizer_lr_scale=0", "eval.in_training=false",
                f"out_dir={frozen}"]) == 0
    assert cli(["train", *common(2), "model.tokenizer_lr_scale=0.5", "eval.in_training=false",
                f"out_dir={half}"]) == 0
    tiny = ["trainer.lr=1e-12", "trainer.max_steps=1", "eval.in_training=false"]
    assert cli(["train", *common(1), *tiny, f"out_dir={fresh}"]) == 0
    w0 = params_of(fresh / "checkpoints" / "step_00000001")
    wf, wh = (params_of(d / "checkpoints" / "step_00000002") for d in (frozen, half))
    weights = [k for k in w0 if k.startswith("tokenizer3d.") and "running_" not in k and "num_batches" not in k]
    assert weights and all(torch.allclose(wf[k], w0[k], atol=1e-7) for k in weights)
    assert any(not torch.allclose(wh[k], w0[k], atol=1e-6) for k in weights)
    assert any(not torch.allclose(wf[k], w0[k], atol=1e-6) for k in w0 if k.startswith("segmenter.decoder."))
    assert cli(["train", *common(1), "model.tokenizer_lr_scale=2", f"out_dir={tmp_path / 'bad'}"]) != 0
    assert "model.tokenizer_lr_scale" in capsys.readouterr().err


def test_canonical_frame_is_saved_and_says_rotate_has_no_effect(cache, tmp_path, caplog):
    """model.canonical_frame travels in the checkpoint (so eval and the API turn scans the same way), and
    data.rotate beside it is said to do nothing rather than silently ignored."""
    from scene3d.models.loading import load_model

    out = tmp_path / "canon"
    with caplog.at_level("WARNING"):
        assert cli(["train", *common(1), "model.canonical_frame=true", "data.rotate=true", "eval.in_training=false",
                    f"out_dir={out}"]) == 0
    assert any("data.rotate has no effect with model.canonical_frame" in r.getMessage() for r in caplog.records)
    assert load_model(out, device="cpu").model.config.canonical_frame is True
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert cli(["train", *common(1), "data.rotate=true", "eval.in_training=false", f"out_dir={tmp_path / 'r'}"]) == 0
    assert not any("canonical_frame" in r.getMessage() for r in caplog.records)
