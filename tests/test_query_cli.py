"""`scene3d query` end to end in-process: a checkpoint written here, a processed scene and a mesh file."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from scene3d.cli import main
from data_prep.synthetic import prepare_synthetic
from scene3d.engine.checkpoint import save_checkpoint
from scene3d.models.pipeline import Scene3DModel
from helpers import small_config



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    syn = prepare_synthetic(root / "syn", num_scenes=1, seed=5, val_fraction=0.0, progress=False)
    torch.manual_seed(0)
    model = Scene3DModel(small_config())
    ckpt = save_checkpoint(root / "run" / "checkpoints", 7, model.trainable_state_dict(),
                           config={"model": small_config().to_dict()})
    (sid,) = os.listdir(syn.processed)
    return ckpt, syn.processed / sid, syn.root / "raw" / "scans" / sid


def _wrote(out: str) -> list:
    return [Path(m) for m in re.findall(r"^wrote (.+)$", out, flags=re.M)]


def test_query_processed_scene(setup, tmp_path, capsys):
    from plyfile import PlyData

    from scene3d import Segmenter

    ckpt, scene_dir, _ = setup
    rc = main(["query", str(ckpt), str(scene_dir), "the", "brown", "chair", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'query: "the brown chair"' in out and "objects from instances" in out
    ply, png = _wrote(out)
    assert ply.suffix == ".ply" and png.suffix == ".png" and ply.parent == png.parent == tmp_path / "o"
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1400, 700)
    # the printed answer is the API's answer on the same inputs
    seg = Segmenter.from_pretrained(ckpt)
    scene = seg.load_scene(scene_dir)
    r = seg.segment(scene, "the brown chair")
    assert f"points: {r.num_points} of {scene.num_points}" in out
    for oid in r.object_ids:
        assert re.search(rf"^  id {oid}\b", out, flags=re.M)
    v = PlyData.read(str(ply))["vertex"]
    assert len(v) == scene.num_points and np.allclose(np.c_[v["x"], v["y"], v["z"]], scene.coord)


def test_query_mesh_file_uses_proposals(setup, tmp_path, capsys):
    import trimesh

    _, _, scan = setup
    mesh = trimesh.load(next(scan.glob("*_vh_clean_2.ply")), process=False)
    mesh.export(tmp_path / "room.obj")
    rc = main(["query", str(setup[0]), str(tmp_path / "room.obj"), "the table", "--out", str(tmp_path),
               "--no-pictures"])
    out = capsys.readouterr().out
    assert rc == 0 and "objects from proposals" in out and "points:" in out and not _wrote(out)


def test_query_mesh_file_with_a_learned_proposal_model(setup, tmp_path, capsys):
    import trimesh

    from scene3d.data.scene import load_processed_scene
    from scene3d.tokenizer.instance_proposals import InstanceConfig, scan_from_scene, train_instance_model

    ckpt, scene_dir, scan = setup
    torch.manual_seed(0)
    model = train_instance_model([scan_from_scene(load_processed_scene(scene_dir))], steps=40, progress=False,
                                 cfg=InstanceConfig(voxel=0.08, channels=(8, 16), radii=(0.1, 0.2), min_points=20),
                                 lr=5e-3, score_passes=1)
    model.save(tmp_path / "inst")
    mesh = trimesh.load(next(scan.glob("*_vh_clean_2.ply")), process=False)
    mesh.export(tmp_path / "room.obj")
    rc = main(["query", str(ckpt), str(tmp_path / "room.obj"), "the table", "--no-pictures", "--proposal-model",
               str(tmp_path / "inst")])
    out, err = capsys.readouterr()
    assert rc == 0 and "learned instance model" in out and "points:" in out
    rc = main(["query", str(ckpt), str(tmp_path / "room.obj"), "the table", "--no-pictures", "--proposal-model",
               str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["missing_ckpt", "not_a_cloud", "empty_text"])
def test_query_errors(setup, tmp_path, capsys, case):
    ckpt, scene_dir, _ = setup
    text = "the chair"
    if case == "missing_ckpt":
        ckpt, expect = tmp_path / "no_ckpt", "no_ckpt"
    elif case == "not_a_cloud":
        scene_dir = tmp_path / "readme.ply"
        scene_dir.write_text("hello\n")
        expect = "readme.ply"
    else:
        text, expect = "   ", "empty"
    rc = main(["query", str(ckpt), str(scene_dir), text, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err
    assert not (tmp_path / "o").exists()


def test_query_rejects_overrides(setup):
    ckpt, scene_dir, _ = setup
    with pytest.raises(SystemExit) as e:
        main(["query", str(ckpt), str(scene_dir), "x", "--bogus", "1"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------ issue 16
def _result(**kw):
    from scene3d.api import SegmentResult

    n = 6
    mask = np.array([True, True, False, False, False, False])
    base = dict(text="the bed", point_mask=mask, object_masks=mask[None], objects=np.array([0]),
                object_ids=np.array([4]), scores=np.array([0.2], np.float32),
                boxes=np.zeros((1, 6), np.float32), all_scores=np.array([0.2, 0.1], np.float32),
                decoder_mask=mask, answer="none [SEG]", identifiers=[], source="decoder", proposals=False,
                model_points=n)
    base.update(kw)
    return SegmentResult(**base)


def test_answer_is_never_none_while_objects_come_back():
    from scene3d.api import make_scene
    from scene3d.cli.query import format_result

    scene = make_scene(np.zeros((6, 3)))
    # the LLM's text says "none" but the decoder chose an object: the answer is that object
    out = format_result(scene, _result())
    assert "answer: none" not in out and "answer: 1 object (chosen by the mask decoder's scores)" in out
    assert "llm text: 'none [SEG]'" in out and re.search(r"^  id 4 \(0\.20\): 2 points", out, flags=re.M)
    empty = _result(point_mask=np.zeros(6, bool), object_masks=np.zeros((0, 6), bool), objects=np.zeros(0, int),
                    object_ids=np.zeros(0, int), scores=np.zeros(0, np.float32), boxes=np.zeros((0, 6)),
                    source="none")
    assert "answer: none (the model says no object matches)" in format_result(scene, empty)
    low = empty._replace(all_below_threshold=True, warnings=("every object scored below the decoder threshold",))
    out = format_result(scene, low)
    assert "answer: none (every object scored below the threshold; best 0.200)" in out
    assert "warning: every object scored below the decoder threshold" in out


@pytest.fixture(scope="module")
def strict_ckpt(tmp_path_factory):
    """A checkpoint whose decoder threshold no object of a random model reaches."""
    torch.manual_seed(0)
    cfg = small_config(threshold=0.999)
    model = Scene3DModel(cfg)
    return save_checkpoint(tmp_path_factory.mktemp("strict") / "checkpoints", 1, model.trainable_state_dict(),
                           config={"model": cfg.to_dict()})


def test_query_says_when_every_object_scores_below_threshold(setup, strict_ckpt, capsys):
    _, scene_dir, _ = setup
    rc = main(["query", str(strict_ckpt), str(scene_dir), "the bed", "--no-pictures"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^warning: every object scored below the decoder threshold 0\.999 \(best 0\.\d{3}\)", out,
                     flags=re.M)
    answer = re.search(r"^answer: (.*)$", out, flags=re.M).group(1)
    objects = re.findall(r"^  (id \d+|proposal \d+)", out, flags=re.M)
    assert answer.startswith("none") == (not objects)  # "none" exactly when nothing comes back


def test_query_downsamples_large_scenes_and_says_so(setup, tmp_path, capsys):
    from plyfile import PlyData

    from scene3d.data.scene import load_processed_scene

    ckpt, scene_dir, _ = setup
    n = load_processed_scene(scene_dir).num_points
    rc = main(["query", str(ckpt), str(scene_dir), "the chair", "--out", str(tmp_path), "--max-points", "300"])
    out = capsys.readouterr().out
    assert rc == 0
    m = re.search(rf"^downsampled: the model saw (\d+) of {n} points \([\d.]+ m voxels\); the masks cover all {n}$",
                  out, flags=re.M)
    assert m and int(m.group(1)) <= 300
    assert re.search(r"^warning: .*coarser than its resolution", out, flags=re.M)  # 300 is below the model's grid
    assert re.search(rf"^points: \d+ of {n}$", out, flags=re.M)
    ply = _wrote(out)[0]
    assert len(PlyData.read(str(ply))["vertex"]) == n  # the picture has every input point
    assert main(["query", str(ckpt), str(scene_dir), "x", "--max-points", "-1"]) == 2


def test_query_turns_prints_how_many_orientations_agreed(setup, capsys):
    from scene3d import Segmenter

    ckpt, scene_dir, _ = setup
    rc = main(["query", str(ckpt), str(scene_dir), "the", "chair", "--turns", "4", "--no-pictures"])
    out = capsys.readouterr().out
    assert rc == 0
    seg = Segmenter.from_pretrained(ckpt, turns=4)
    r = seg.segment(seg.load_scene(scene_dir), "the chair")
    assert f"orientations: {round(r.agreement * 4)} of 4 quarter turns gave this answer" in out
    assert f"points: {r.num_points} of " in out
    assert main(["query", str(ckpt), str(scene_dir), "the", "chair", "--no-pictures"]) == 0
    assert "orientations:" not in capsys.readouterr().out  # one orientation: nothing to say
    rc = main(["query", str(ckpt), str(scene_dir), "the", "chair", "--turns", "5", "--no-pictures"])
    err = capsys.readouterr().err
    assert rc == 2 and "turns must be an integer in 1..4" in err and len(err.strip().splitlines()) == 1
