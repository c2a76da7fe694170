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
    assert metrics["num_samples"] > 0 and 0.0 <= metrics["metrics"]["overall"]["miou"] <= 1.0
    assert (out / "eval" / "predictions.jsonl").read_text().count("\n") == metrics["num_samples"]
    # pictures of the queries: valid PNGs, paths printed
    pngs = sorted((out / "queries").glob("*.png"))
    assert len(pngs) == 2 and len(sorted((out / "queries").glob("*.ply"))) == 2
    for png in pngs:
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", head[16:24])
        assert w > 200 and h > 100
        assert str(png) in printed


def test_demo_rejects_bad_steps(tmp_path):
    with pytest.raises(SystemExit, match="--steps"):
        main(["demo", "--out", str(tmp_path), "--steps", "0"])
