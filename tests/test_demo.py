"""`scene3d demo --quick`: the README's main job, reduced, end to end (synth -> prep -> train -> eval -> query)."""

from __future__ import annotations

import json
import struct

import pytest

from scene3d.cli import main


@pytest.mark.slow
def test_quick_demo_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # every stage ran and reported
    for stage in ("1-2/5", "3/5", "4/5", "5/5", "done in"):
        assert stage in printed
    # the raw ScanNet-format data and the processed scenes (real prep tools)
    assert list((out / "data" / "raw" / "scans").glob("scene*/scene*_vh_clean_2.ply"))
    assert list((out / "data" / "processed").glob("scene*/meta.json"))
    # training run: checkpoint, logs, plot
    run = out / "run"
    assert (run / "checkpoints" / "latest").exists() and (run / "metrics.csv").exists()
    assert (run / "loss_curves.png").exists() and list((run / "tb").glob("events.*"))
    # evaluation on held-out scenes
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] > 0 and "miou" in metrics["metrics"]["overall"]
    assert (out / "eval" / "predictions.jsonl").read_text().count("\n") == metrics["num_samples"]
    # the pretrained LLM is the default wherever set-up installed it (CI installs it)
    from scene3d.llm.registry import default_model_path

    if default_model_path() is not None:
        assert "training on SmolLM2-135M-Instruct" in printed
        import yaml

        step = (run / "checkpoints" / "latest").read_text().strip()
        cfg = yaml.safe_load((run / "checkpoints" / step / "config.yaml").read_text())
        assert cfg["model"]["referring"]["llm"]["path"] == "smollm2"
    # answers beside the truth, and a count of the right ones that agrees with them
    verdicts = [ln for ln in printed.splitlines() if "(truth [" in ln]
    assert len(verdicts) == 2
    n_right = sum("RIGHT" in ln for ln in verdicts)
    assert f"{n_right} of 2 queries right" in printed
    # pictures of the queries: valid PNGs, paths printed
    pngs = sorted((out / "queries").glob("*.png"))
    assert len(pngs) == 2 and len(sorted((out / "queries").glob("*.ply"))) == 2
    for png in pngs:
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", head[16:24])
        assert w > 200 and h > 0.9 * w  # two rows: the prediction, and the ground truth below it
        assert str(png) in printed


def test_queries_are_picked_by_a_fixed_rule():
    from scene3d.demo import pick_queries

    rows = [{"scene_id": f"s{i % 3}", "ann_id": str(i), "text": f"q{i}"} for i in range(12)]
    picked = pick_queries(list(reversed(rows)), 4)  # input order does not matter
    ordered = sorted(rows, key=lambda r: (r["scene_id"], r["ann_id"]))
    assert picked == [ordered[0], ordered[3], ordered[6], ordered[9]]
    assert {r["scene_id"] for r in picked} == {"s0", "s1", "s2"}
    assert pick_queries(rows, 0) == [] and len(pick_queries(rows[:2], 5)) == 2


def test_demo_rejects_bad_steps(tmp_path):
    with pytest.raises(SystemExit, match="--steps"):
        main(["demo", "--out", str(tmp_path), "--steps", "0"])
