"""A small learning check: briefly trained, the tiny model beats trivial predictors by a clear margin.

The bigger benchmark (a 15-minute budget) is bench/learn_synthetic.py. Here 8 synthetic scenes are made,
6 trained on for 600 steps through :func:`scene3d.train.run_training`, and the model is scored with
:mod:`scene3d.metrics` on the sentences of the 2 **held-out** scenes (the val split, never seen in training)
against trivial predictors computed independently below: the scene's largest object, a random object and
"nothing" (right on zero-target rows), each by a clear margin. Since the decoder reads the words only through
the LLM's states (model architecture 3), this is a check of the LLM path; the report (``-s``) also prints the
identifier-only figure. Architecture 2 (sentence state at the [SEG] after the answer), 300 steps at lr 3e-3:
0.471 against 0.000 / 0.117 / 0.233; architecture 3 at that setting stalled at 0.30 (also at 450 steps), and
reaches 0.455 (identifier-only 0.424) with 450 steps at the benchmark's lr 1e-3; with identifier_grounding (the
default since) 0.467 (identifier-only 0.450). With anchor supervision (the default since) 450 steps gave 0.350
(identifier-only 0.356), too close to "empty" + margin (0.333): the anchor head's loss competes in the first
steps. 600 steps: 0.438 (identifier-only 0.425).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scene3d.metrics import evaluate_rows

pytestmark = pytest.mark.slow

SCENES, STEPS, ROWS = 8, 600, 60
#: a short run: identity identifiers, light proposal loss (the benchmark keeps the defaults)
EXTRA = ["trainer.lr=1e-3", "trainer.warmup_steps=10", "model.referring.shuffle_identifiers=false",
         "model.tokenizer_loss_weight=0.1"]


def trivial_predictions(rows, processed: Path, kind: str, seed: int = 0) -> dict:
    """(dataset, scene_id, ann_id) -> prediction row of a trivial predictor (reads objects.json directly)."""
    rng = np.random.default_rng(seed)
    out = {}
    for r in rows:
        objs = [o for o in json.loads((processed / r["scene_id"] / "objects.json").read_text())["objects"]
                if o["num_points"] > 0]
        if kind == "largest":
            ids = [max(objs, key=lambda o: o["num_points"])["id"]]
        elif kind == "random":
            ids = [objs[int(rng.integers(len(objs)))]["id"]]
        else:
            ids = []
        key = (r["dataset"], r["scene_id"], str(r["ann_id"]))
        out[key] = {"dataset": r["dataset"], "scene_id": r["scene_id"], "ann_id": r["ann_id"],
                    "pred_object_ids": ids, "_where": kind}
    return out


def test_brief_training_beats_trivial_predictors(tmp_path, monkeypatch):
    from scene3d.config import compose
    from scene3d.engine.evaluate import evaluate_model, spread_rows
    from scene3d.models.loading import load_model
    from scene3d.train import run_training, split_rows

    monkeypatch.setenv("SCENE3D_CACHE", str(tmp_path / "cache"))
    cfg = compose("train", ["experiment=synthetic_cpu", f"data.synthetic.num_scenes={SCENES}",
                            "data.synthetic.val_fraction=0.25", f"trainer.max_steps={STEPS}", *EXTRA,
                            f"trainer.ckpt_every={STEPS}", "trainer.progress=false", "eval.in_training=false",
                            f"out_dir={tmp_path / 'run'}"])
    summary = run_training(cfg)
    assert summary.step == STEPS
    from scene3d.config import to_objects

    data = split_rows(to_objects(cfg).data, "val")
    rows = spread_rows(data.rows, ROWS)
    model = load_model(summary.checkpoint).model
    ours = evaluate_model(model, data.processed_dir, rows, progress=False).metrics["overall"]
    base = {k: evaluate_rows(trivial_predictions(rows, data.processed_dir, k), rows, data.processed_dir,
                             progress=False).metrics["overall"] for k in ("largest", "random", "empty")}
    # the LLM path alone: the objects whose identifiers the LLM's answer names
    named = evaluate_model(model, data.processed_dir, rows, "identifier", progress=False).metrics["overall"]
    report = (f"model {ours['miou']:.3f} (identifier-only {named['miou']:.3f}) vs "
              + ", ".join(f"{k} {b['miou']:.3f}" for k, b in base.items()))
    print(report)
    # beats every trivial predictor on unseen scenes by a clear margin
    for k in ("largest", "random", "empty"):
        assert ours["miou"] >= base[k]["miou"] + MARGIN, report
    # and the training loss fell well below its start
    import csv

    losses = [float(r["loss"]) for r in csv.DictReader(open(summary.metrics_csv)) if r["split"] == "train"]
    assert losses[-1] < 0.75 * losses[0], losses


MARGIN = 0.1
