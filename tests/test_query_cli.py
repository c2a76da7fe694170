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
from scene3d.data.synthetic import prepare_synthetic
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
