"""Synthetic ScanNet-format scenes: read back with independent readers (plyfile, json, csv) and compared
with the layout of real ScanNet files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import plyfile
import pytest

from data_prep.synth import generate_dataset

SCAN0011 = "fatPeter__ThreeDAC/dataset/Scannet_v2/scans/scene0011_00"


def _files(root: Path, sid: str) -> dict:
    d = root / "scans" / sid
    return {
        "ply": d / f"{sid}_vh_clean_2.ply",
        "segs": d / f"{sid}_vh_clean_2.0.010000.segs.json",
        "agg": d / f"{sid}.aggregation.json",
        "txt": d / f"{sid}.txt",
    }


def _alignment(txt: Path) -> np.ndarray:
    for line in txt.read_text().splitlines():
        if line.startswith("axisAlignment"):
            return np.array([float(x) for x in line.split("=")[1].split()]).reshape(4, 4)
    raise AssertionError("no axisAlignment line")


def _scene_ids(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "scans").iterdir())


def test_ply_is_scannet_binary_layout(synth_root):
    for sid in _scene_ids(synth_root):
        path = _files(synth_root, sid)["ply"]
        ply = plyfile.PlyData.read(str(path))
        assert ply.text is False and ply.byte_order == "<"
        v, f = ply["vertex"], ply["face"]
        assert [p.name for p in v.properties] == ["x", "y", "z", "red", "green", "blue", "alpha"]
        assert [str(v.data.dtype[n]) for n in ("x", "red", "alpha")] == ["float32", "uint8", "uint8"]
        assert (v["alpha"] == 255).all()
        fp = f.properties[0]
        assert fp.name == "vertex_indices" and fp.len_dtype == "u1" and fp.val_dtype == "i4"
        faces = np.stack(f["vertex_indices"])
        assert faces.shape[1] == 3 and faces.min() >= 0 and faces.max() < v.count
        # exact byte size: header + 16 bytes per vertex + 13 per face, as ScanNet's files
        header_len = path.read_bytes().index(b"end_header\n") + len(b"end_header\n")
        assert path.stat().st_size == header_len + 16 * v.count + 13 * f.count


def test_segments_and_aggregation_consistent(synth_root):
    for sid in _scene_ids(synth_root):
        fs = _files(synth_root, sid)
        n = plyfile.PlyData.read(str(fs["ply"]))["vertex"].count
        segs = json.loads(fs["segs"].read_text())
        agg = json.loads(fs["agg"].read_text())
        seg = np.asarray(segs["segIndices"])
        assert segs["sceneId"] == sid and len(seg) == n
        # ScanNet numbers each segment by one of its own vertices
        assert np.isin(np.unique(seg), np.arange(n)).all()
        assert (seg[np.unique(seg)] == np.unique(seg)).all()
        assert agg["sceneId"] == f"scannet.{sid}" and agg["appId"] == "Aggregator.v2"
        groups = agg["segGroups"]
        assert [g["objectId"] for g in groups] == list(range(len(groups)))
        all_segs = [s for g in groups for s in g["segments"]]
        assert len(all_segs) == len(set(all_segs)), "a segment belongs to at most one object"
        assert set(all_segs) <= set(seg.tolist())
        # objects are over-segmented into surface patches, not one segment per object
        assert np.mean([len(g["segments"]) for g in groups]) > 2
        # some vertices are unannotated (clutter), most are annotated
        covered = np.isin(seg, all_segs)
        assert 0.5 < covered.mean() < 1.0


def test_alignment_puts_room_on_axes(synth_root):
    layout = json.loads((synth_root / "synth_layout.json").read_text())
    for sid in _scene_ids(synth_root):
        fs = _files(synth_root, sid)
        m = _alignment(fs["txt"])
        assert np.allclose(m[3], [0, 0, 0, 1]) and np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-5)
        assert not np.allclose(m, np.eye(4)), "scenes are written misaligned"
        v = plyfile.PlyData.read(str(fs["ply"]))["vertex"]
        xyz = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float64)
        aligned = (np.c_[xyz, np.ones(len(xyz))] @ m.T)[:, :3]
        w, d, h = layout["scenes"][sid]["room"]
        assert aligned.min(0) == pytest.approx([0, 0, 0], abs=1e-3)
        assert aligned.max(0) == pytest.approx([w, d, h], abs=1e-3)
        # layout boxes are the AABBs of each object's aligned vertices
        seg = np.asarray(json.loads(fs["segs"].read_text())["segIndices"])
        for g, obj in zip(json.loads(fs["agg"].read_text())["segGroups"], layout["scenes"][sid]["objects"]):
            assert obj["object_id"] == g["objectId"] and obj["label"] == g["label"]
            pts = aligned[np.isin(seg, g["segments"])]
            assert len(pts) == obj["num_vertices"]
            assert (pts.min(0) + pts.max(0)) / 2 == pytest.approx(obj["center"], abs=1e-4)
            assert pts.max(0) - pts.min(0) == pytest.approx(obj["size"], abs=1e-4)


def test_support_relation_is_geometric(synth_root):
    layout = json.loads((synth_root / "synth_layout.json").read_text())
    n_support = 0
    for scene in layout["scenes"].values():
        objs = {o["object_id"]: o for o in scene["objects"]}
        for o in objs.values():
            if o["on_top_of"] is None:
                continue
            n_support += 1
            base = objs[o["on_top_of"]]
            bottom = o["center"][2] - o["size"][2] / 2
            top = base["center"][2] + base["size"][2] / 2
            assert bottom >= top - 0.6 and bottom <= top + 0.01, (o["label"], base["label"])
            for k in (0, 1):  # the supported object's centre lies over its support
                assert abs(o["center"][k] - base["center"][k]) <= base["size"][k] / 2 + 1e-6
    assert n_support > 0


def test_labels_tsv_matches_real_label_map(synth_root, real_data):
    ours = list(csv.DictReader(io.StringIO((synth_root / "scannetv2-labels.combined.tsv").read_text()), delimiter="\t"))
    real_path = real_data / "daveredrum__ScanRefer/data/scannet/meta_data/scannetv2-labels.combined.tsv"
    with open(real_path, newline="") as f:
        real_reader = csv.DictReader(f, delimiter="\t")
        real = {r["raw_category"]: r for r in real_reader}
        real_columns = real_reader.fieldnames
    assert list(ours[0].keys()) == real_columns
    for row in ours:
        assert row == real[row["raw_category"]], row["raw_category"]
    layout = json.loads((synth_root / "synth_layout.json").read_text())
    used = {o["label"] for s in layout["scenes"].values() for o in s["objects"]}
    assert used <= {r["raw_category"] for r in ours}
    assert {"chair", "table", "wall", "floor"} <= used


def test_layout_matches_real_scannet_files(synth_root, real_data):
    real_segs = json.loads((real_data / SCAN0011 / "scene0011_00_vh_clean_2.0.010000.segs.json").read_text())
    real_agg = json.loads((real_data / SCAN0011 / "scene0011_00.aggregation.json").read_text())
    sid = _scene_ids(synth_root)[0]
    fs = _files(synth_root, sid)
    segs, agg = json.loads(fs["segs"].read_text()), json.loads(fs["agg"].read_text())
    assert segs.keys() == real_segs.keys() and segs["params"].keys() == real_segs["params"].keys()
    assert agg.keys() == real_agg.keys()
    assert agg["segGroups"][0].keys() == real_agg["segGroups"][0].keys()
    real_txt_keys = [l.split("=")[0].strip() for l in
                     (real_data / "ripl__Transcrib3D/data/scannet_scene_info/scene0011_00.txt").read_text().splitlines()]
    our_txt_keys = [l.split("=")[0].strip() for l in fs["txt"].read_text().splitlines()]
    assert our_txt_keys == real_txt_keys


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_and_seeded(tmp_path):
    a = generate_dataset(tmp_path / "a", num_scenes=2, seed=3)
    generate_dataset(tmp_path / "b", num_scenes=2, seed=3)
    generate_dataset(tmp_path / "c", num_scenes=2, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert sorted(a["splits"]["train"] + a["splits"]["val"]) == a["scenes"]
    # scene k does not depend on how many scenes are generated
    generate_dataset(tmp_path / "d", num_scenes=1, seed=3)
    sid = a["scenes"][0]
    assert _files(tmp_path / "a", sid)["ply"].read_bytes() == _files(tmp_path / "d", sid)["ply"].read_bytes()


def test_real_preset_has_scannet_size(tmp_path):
    out = generate_dataset(tmp_path, num_scenes=1, seed=0, preset="real")
    st = next(iter(out["stats"].values()))
    assert 120_000 <= st["vertices"] <= 200_000
    assert 1.8 * st["vertices"] <= st["faces"] <= 2.2 * st["vertices"]
    assert 25 <= st["objects"] <= 50


@pytest.mark.parametrize("kwargs, match", [
    ({"num_scenes": 0}, "num_scenes"),
    ({"preset": "huge"}, "preset"),
    ({"val_fraction": 1.0}, "val_fraction"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path, **kwargs)


def test_cli_synth(tmp_path):
    from scene3d.cli import main

    assert main(["synth", str(tmp_path / "out"), "--scenes", "2", "--seed", "1"]) == 0
    assert len(list((tmp_path / "out" / "scans").iterdir())) == 2
    assert (tmp_path / "out" / "scannetv2-labels.combined.tsv").exists()
