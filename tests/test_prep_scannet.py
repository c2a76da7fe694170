"""data_prep.scannet: raw ScanNet -> processed scenes. Hand-computed tiny scenes written with plyfile (an
independent writer), real ScanNet / ScanRefer / mmdet3d files, synthetic scenes, failures, kill and resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from data_prep import scannet as sn
from scene3d.data.labels import CLASS_LABELS_20, NYU40_CLASSES, VALID_CLASS_IDS_20, VALID_CLASS_IDS_200
from scene3d.cli import main as cli_main
from scene3d.constants import PROCESSED_FORMAT_VERSION
from scene3d.data import load_processed_scene

REPO = Path(__file__).resolve().parents[1]
TSV_HEADER = ("id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class\teigen13class\t"
              "ModelNet40\tModelNet10\tShapeNetCore55\tsynsetoffset\twnsynsetid\twnsynsetkey\tmpcat40\tmpcat40index")
# rows as in the real tsv (id, raw_category, ..., nyu40id in column 5)
TSV_ROWS = {
    "wall": "1\twall\twall\t8277\t1\t12\twall\twall\tWall\t\t\t\t\tn04546855\twall.n.01\twall\t1",
    "chair": "2\tchair\tchair\t4646\t5\t4\tchair\tchair\tChair\tchair\tchair\tchair\t3001627\tn03001627\tchair.n.01\tchair\t3",
    "floor": "3\tfloor\tfloor\t1553\t2\t5\tfloor\tfloor\tFloor\t\t\t\t\tn03365592\tfloor.n.01\tfloor\t2",
}
SCANREFER_TSV = "daveredrum__ScanRefer/data/scannet/meta_data/scannetv2-labels.combined.tsv"
POINTCEPT_TSV = "Pointcept__Pointcept/pointcept/datasets/preprocessing/scannet/meta_data/scannetv2-labels.combined.tsv"
MMDET = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"
SCAN0011 = "fatPeter__ThreeDAC/dataset/Scannet_v2/scans/scene0011_00"


# ----------------------------------------------------------------------------------------------- writers

def write_tsv(path: Path, rows=TSV_ROWS.values(), newline="\n") -> Path:
    path.write_text(newline.join([TSV_HEADER, *rows]) + newline, newline="")
    return path


def write_ply(path: Path, xyz, rgb, faces, text=False):
    v = np.empty(len(xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                  ("blue", "u1"), ("alpha", "u1")])
    v["x"], v["y"], v["z"] = np.asarray(xyz, np.float32).T
    v["red"], v["green"], v["blue"] = np.asarray(rgb, np.uint8).T
    v["alpha"] = 255
    f = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
    f["vertex_indices"] = faces
    PlyData([PlyElement.describe(v, "vertex"),
             PlyElement.describe(f, "face", len_types={"vertex_indices": "u1"}, val_types={"vertex_indices": "i4"})],
            text=text, byte_order="<").write(str(path))


def write_raw_scene(root: Path, sid: str, xyz, rgb, faces, seg, groups, align=None) -> Path:
    d = root / sid
    d.mkdir(parents=True, exist_ok=True)
    write_ply(d / f"{sid}_vh_clean_2.ply", xyz, rgb, faces)
    (d / f"{sid}_vh_clean_2.0.010000.segs.json").write_text(json.dumps(
        {"params": {"kThresh": "0.0001"}, "sceneId": sid, "segIndices": [int(s) for s in seg]}))
    (d / f"{sid}.aggregation.json").write_text(json.dumps({
        "sceneId": f"scannet.{sid}", "appId": "Aggregator.v2",
        "segGroups": [{"id": o, "objectId": o, "segments": s, "label": lab} for o, lab, s in groups]}))
    txt = "colorHeight = 968\n"
    if align is not None:
        txt = "axisAlignment = " + " ".join(f"{x:.6f}" for x in np.asarray(align).reshape(-1)) + " \n" + txt
    (d / f"{sid}.txt").write_text(txt + "sceneType = Kitchen\n")
    return d


# Tiny scene: a 2x2 floor square (4 vertices, 2 faces, z = 0, facing up), a unit cube centred at the origin
# (8 vertices, 12 faces, outward), and one isolated vertex that no face and no segGroup touches.
FLOOR = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float)
FLOOR_F = np.array([[0, 1, 2], [0, 2, 3]])
CUBE = np.array([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)], float) + [0, 0, 2]
CUBE_F = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],
                   [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
# rotation of 90 degrees about z, then a translation (the axisAlignment M, aligned = M @ raw)
ALIGN = np.array([[0, -1, 0, 1.0], [1, 0, 0, 2.0], [0, 0, 1, 3.0], [0, 0, 0, 1]])


def tiny_scene(root: Path, sid="scene0001_00", align=ALIGN) -> Path:
    xyz = np.vstack([FLOOR, CUBE, [[5, 5, 5]]])
    faces = np.vstack([FLOOR_F, CUBE_F + 4])
    rgb = np.arange(13 * 3).reshape(13, 3) * 5
    seg = [100] * 4 + [200, 200, 200, 200, 201, 201, 201, 201] + [300]
    groups = [(0, "floor", [100]), (1, "chair", [200, 201])]
    return write_raw_scene(root, sid, xyz, rgb, faces, seg, groups, align)


def naive_normals(xyz, faces):
    """Reference: per-face Python loop accumulating unnormalised face normals."""
    acc = np.zeros((len(xyz), 3))
    for a, b, c in faces:
        n = np.cross(xyz[b] - xyz[a], xyz[c] - xyz[a])
        for i in (a, b, c):
            acc[i] += n
    out = np.tile([0.0, 0.0, 1.0], (len(xyz), 1))
    for i in range(len(xyz)):
        if np.linalg.norm(acc[i]) > 0:
            out[i] = acc[i] / np.linalg.norm(acc[i])
    return out


# ----------------------------------------------------------------------------------------------- hand cases

def test_tiny_scene_matches_hand_computed_values(tmp_path):
    raw = tiny_scene(tmp_path / "scans")
    tsv = write_tsv(tmp_path / "labels.tsv")
    res = sn.process_scene(raw, tmp_path / "out" / raw.name, sn.read_label_tsv(tsv))
    assert res.status == "done" and res.num_vertices == 13
    out = tmp_path / "out" / raw.name
    coord = np.load(out / "coord.npy")
    raw_xyz = np.vstack([FLOOR, CUBE, [[5, 5, 5]]])
    # by hand: (x, y, z) -> (-y + 1, x + 2, z + 3)
    expect = np.stack([-raw_xyz[:, 1] + 1, raw_xyz[:, 0] + 2, raw_xyz[:, 2] + 3], axis=1)
    assert coord.dtype == np.float32 and np.allclose(coord, expect, atol=1e-6)
    assert np.array_equal(np.load(out / "color.npy"), np.arange(39).reshape(13, 3) * 5)
    assert np.load(out / "instance.npy").tolist() == [0] * 4 + [1] * 8 + [-1]
    assert np.load(out / "superpoint.npy").tolist() == [100] * 4 + [200] * 4 + [201] * 4 + [300]
    # floor: nyu40 2 -> ScanNet-20 index 1, tsv id 3 -> ScanNet-200 index 2; chair: nyu40 5 -> 4, id 2 -> 1
    assert np.load(out / "segment20.npy").tolist() == [1] * 4 + [4] * 8 + [-1]
    assert np.load(out / "segment200.npy").tolist() == [2] * 4 + [1] * 8 + [-1]
    for name, dt in [("coord", "f4"), ("color", "u1"), ("normal", "f4"), ("superpoint", "i4"),
                     ("segment20", "i2"), ("segment200", "i2"), ("instance", "i4")]:
        assert np.load(out / f"{name}.npy").dtype == np.dtype(dt), name
    normal = np.load(out / "normal.npy")
    assert np.allclose(normal, naive_normals(expect, np.vstack([FLOOR_F, CUBE_F + 4])), atol=1e-6)
    assert np.allclose(normal[:4], [0, 0, 1]) and np.allclose(normal[12], [0, 0, 1])  # up; isolated: fallback
    assert np.allclose(np.linalg.norm(normal, axis=1), 1, atol=1e-6)
    objs = json.loads((out / "objects.json").read_text())["objects"]
    assert [(o["id"], o["label"], o["nyu40_id"], o["num_points"]) for o in objs] == [(0, "floor", 2, 4), (1, "chair", 5, 8)]
    # floor square rotated 90 deg: still 2x2, centred at (1, 2, 3); cube: centre (1, 2, 5), size 1
    assert np.allclose(objs[0]["center"], [1, 2, 3]) and np.allclose(objs[0]["size"], [2, 2, 0])
    assert np.allclose(objs[1]["center"], [1, 2, 5]) and np.allclose(objs[1]["size"], [1, 1, 1])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == PROCESSED_FORMAT_VERSION and meta["scene_id"] == raw.name
    assert np.allclose(meta["axis_alignment"], ALIGN)
    assert (meta["num_vertices"], meta["num_faces"], meta["num_normal_fallback"]) == (13, 14, 1)
    for role, fname in [("ply", "_vh_clean_2.ply"), ("segs", "_vh_clean_2.0.010000.segs.json"),
                        ("aggregation", ".aggregation.json"), ("txt", ".txt")]:
        assert meta["sources"][role]["sha256"] == hashlib.sha256((raw / f"{raw.name}{fname}").read_bytes()).hexdigest()
    assert meta["label_tsv"]["sha256"] == hashlib.sha256(tsv.read_bytes()).hexdigest()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_missing_axis_alignment_is_identity(tmp_path):
    raw = tiny_scene(tmp_path / "scans", align=None)
    scene = sn.build_scene(raw, sn.read_label_tsv(write_tsv(tmp_path / "l.tsv")))
    assert np.allclose(scene["arrays"]["coord"], np.vstack([FLOOR, CUBE, [[5, 5, 5]]]))
    assert scene["meta"]["axis_alignment_in_txt"] is False and np.allclose(scene["meta"]["axis_alignment"], np.eye(4))


def test_ply_reader_agrees_with_plyfile_and_keeps_extra_properties(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(50, 3))
    faces = rng.integers(0, 50, size=(70, 3))
    # a .labels.ply-like vertex layout with an extra ushort property after alpha
    v = np.empty(50, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                            ("blue", "u1"), ("alpha", "u1"), ("label", "u2")])
    v["x"], v["y"], v["z"] = xyz.T
    v["red"], v["green"], v["blue"], v["alpha"] = rng.integers(0, 256, size=(4, 50))
    v["label"] = rng.integers(0, 41, 50)
    f = np.empty(70, dtype=[("vertex_indices", "i4", (3,))])
    f["vertex_indices"] = faces
    path = tmp_path / "m.ply"
    PlyData([PlyElement.describe(v, "vertex"),
             PlyElement.describe(f, "face", len_types={"vertex_indices": "u1"}, val_types={"vertex_indices": "i4"})],
            byte_order="<").write(str(path))
    mesh = sn.read_ply(path)
    ref = PlyData.read(str(path))
    for name in v.dtype.names:
        assert np.array_equal(mesh.vertex[name], ref["vertex"][name]), name
    assert np.array_equal(mesh.faces, np.stack(ref["face"]["vertex_indices"]))


@pytest.mark.parametrize("case, needle", [
    ("truncated", "truncated"), ("ascii", "binary_little_endian"), ("no_color", "lacks"),
    ("quads", "triangle"), ("bad_index", "out of range"), ("not_ply", "not a ply"),
])
def test_bad_ply_errors_name_the_file(tmp_path, case, needle):
    path = tmp_path / "m.ply"
    xyz, faces = np.vstack([FLOOR, CUBE]), np.vstack([FLOOR_F, CUBE_F + 4])
    rgb = np.zeros((12, 3))
    if case == "ascii":
        write_ply(path, xyz, rgb, faces, text=True)
    elif case == "no_color":
        v = np.array([tuple(p) for p in xyz], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
        f = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
        f["vertex_indices"] = faces
        PlyData([PlyElement.describe(v, "vertex"), PlyElement.describe(f, "face")], byte_order="<").write(str(path))
    elif case == "quads":
        v = np.zeros(4, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
        f = np.empty(1, dtype=[("vertex_indices", "i4", (4,))])
        f["vertex_indices"] = [[0, 1, 2, 3]]
        PlyData([PlyElement.describe(v, "vertex"), PlyElement.describe(
            f, "face", len_types={"vertex_indices": "u1"}, val_types={"vertex_indices": "i4"})],
            byte_order="<").write(str(path))
    elif case == "bad_index":
        write_ply(path, xyz, rgb, np.vstack([faces, [[0, 1, 99]]]))
    elif case == "not_ply":
        path.write_bytes(b"solid stl\n")
    else:
        write_ply(path, xyz, rgb, faces)
        path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(sn.ScanNetFormatError, match=needle) as ei:
        sn.read_ply(path)
    assert str(path) in str(ei.value)


# ----------------------------------------------------------------------------------------------- failures

def _corrupt(raw: Path, sid: str, case: str):
    ply = raw / f"{sid}_vh_clean_2.ply"
    segs = raw / f"{sid}_vh_clean_2.0.010000.segs.json"
    agg = raw / f"{sid}.aggregation.json"
    if case == "truncated_ply":
        ply.write_bytes(ply.read_bytes()[:-20])
        return ply.name
    if case == "ascii_ply":
        write_ply(ply, np.vstack([FLOOR, CUBE, [[5, 5, 5]]]), np.zeros((13, 3)), np.vstack([FLOOR_F, CUBE_F + 4]),
                  text=True)
        return ply.name
    if case == "seg_length":
        d = json.loads(segs.read_text())
        d["segIndices"] = d["segIndices"][:-1]
        segs.write_text(json.dumps(d))
        return segs.name
    if case == "unknown_segment":
        d = json.loads(agg.read_text())
        d["segGroups"][1]["segments"].append(777)
        agg.write_text(json.dumps(d))
        return agg.name
    if case == "nan_coord":
        xyz = np.vstack([FLOOR, CUBE, [[np.nan, 5, 5]]])
        write_ply(ply, xyz, np.zeros((13, 3)), np.vstack([FLOOR_F, CUBE_F + 4]))
        return ply.name
    if case == "inf_coord":
        xyz = np.vstack([FLOOR, CUBE, [[5, np.inf, 5]]])
        write_ply(ply, xyz, np.zeros((13, 3)), np.vstack([FLOOR_F, CUBE_F + 4]))
        return ply.name
    if case == "missing_agg":
        agg.unlink()
        return agg.name
    if case == "missing_txt":
        (raw / f"{sid}.txt").unlink()
        return f"{sid}.txt"
    if case == "bad_json":
        segs.write_text('{"segIndices": [1, 2,')
        return segs.name
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated_ply", "ascii_ply", "seg_length", "unknown_segment", "nan_coord",
                                  "inf_coord", "missing_agg", "missing_txt", "bad_json"])
def test_bad_scene_fails_alone_with_scene_and_file_named(tmp_path, case):
    scans = tmp_path / "scans"
    tiny_scene(scans, "scene0001_00")
    bad = tiny_scene(scans, "scene0002_00")
    tiny_scene(scans, "scene0003_00")
    fname = _corrupt(bad, "scene0002_00", case)
    tsv = write_tsv(tmp_path / "labels.tsv")
    summary = sn.process_scans(scans, tmp_path / "out", tsv, progress=False)
    assert summary.done == ["scene0001_00", "scene0003_00"]
    assert list(summary.failed) == ["scene0002_00"]
    msg = summary.failed["scene0002_00"]
    assert msg.startswith("scene0002_00: ") and fname in msg
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scene0001_00", "scene0003_00"]
    assert "FAILED scene0002_00" in summary.format()


def test_unreadable_tsv_row_fails_only_scenes_using_it(tmp_path):
    scans = tmp_path / "scans"
    tiny_scene(scans, "scene0001_00")  # uses floor + chair
    xyz = np.vstack([FLOOR, [[5, 5, 5]]])
    write_raw_scene(scans, "scene0002_00", xyz, np.zeros((5, 3)), FLOOR_F, [1, 1, 1, 1, 2], [(0, "floor", [1])])
    rows = dict(TSV_ROWS)
    rows["chair"] = "2\tchair\tchair\t4646\tfive\t4"  # nyu40id not an integer
    tsv = write_tsv(tmp_path / "labels.tsv", rows.values(), newline="\r\n")
    summary = sn.process_scans(scans, tmp_path / "out", tsv, progress=False)
    assert summary.done == ["scene0002_00"]
    msg = summary.failed["scene0001_00"]
    assert "labels.tsv" in msg and "line 3" in msg and "chair" in msg and "aggregation.json" in msg


def test_missing_scene_dir_and_cli_exit_status(tmp_path, capsys):
    scans = tmp_path / "scans"
    tiny_scene(scans, "scene0001_00")
    tsv = write_tsv(tmp_path / "labels.tsv")
    split = tmp_path / "split.txt"
    split.write_text("scene0001_00\n\nscene0009_00\n")
    rc = cli_main(["prep", "scannet", str(scans), str(tmp_path / "out"), "--labels", str(tsv), "--split-file",
                   str(split), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED scene0009_00" in err and "missing scan directory" in err
    assert (tmp_path / "out" / "scene0001_00" / "meta.json").exists()
    rc = cli_main(["prep", "scannet", str(scans), str(tmp_path / "out"), "--labels", str(tsv), "--scenes",
                   "scene0001_00", "--no-progress"])
    assert rc == 0 and "1 up to date" in capsys.readouterr().out
    rc = cli_main(["prep", "scannet", str(scans), str(tmp_path / "out"), "--labels", str(tmp_path / "nope.tsv")])
    assert rc == 2 and "nope.tsv" in capsys.readouterr().err


def test_unannotated_scan_allowed_only_when_asked(tmp_path):
    raw = tiny_scene(tmp_path / "scans")
    (raw / f"{raw.name}.aggregation.json").unlink()
    lm = sn.read_label_tsv(write_tsv(tmp_path / "l.tsv"))
    with pytest.raises(sn.ScanNetFormatError, match="aggregation.json: missing file"):
        sn.build_scene(raw, lm)
    scene = sn.build_scene(raw, lm, sn.PrepConfig(allow_unannotated=True))
    assert (scene["arrays"]["instance"] == -1).all() and scene["objects"] == []


# ----------------------------------------------------------------------------------------------- real data

@pytest.mark.realdata
def test_real_scene0011_instances_match_simple_reference(real_data):
    d = real_data / SCAN0011
    seg = sn.read_segs(d / "scene0011_00_vh_clean_2.0.010000.segs.json")
    groups = sn.read_aggregation(d / "scene0011_00.aggregation.json")
    assert seg.shape == (237360,) and len(groups) == 33
    inst = sn.instance_from_segments(seg, groups)
    # independent reference: ScanRefer/votenet style seg -> vertices map, then a loop over groups
    raw_seg = json.loads((d / "scene0011_00_vh_clean_2.0.010000.segs.json").read_text())["segIndices"]
    agg = json.loads((d / "scene0011_00.aggregation.json").read_text())["segGroups"]
    seg_to_verts = {}
    for i, s in enumerate(raw_seg):
        seg_to_verts.setdefault(s, []).append(i)
    ref = np.full(len(raw_seg), -1)
    for g in agg:
        for s in g["segments"]:
            ref[seg_to_verts[s]] = g["objectId"]
    assert np.array_equal(inst, ref)
    assert sorted(set(inst.tolist()) - {-1}) == sorted(g["objectId"] for g in agg)
    assert (inst == -1).any()


@pytest.mark.realdata
def test_real_tsv_copies_agree_and_read_with_crlf(real_data):
    a = sn.read_label_tsv(real_data / SCANREFER_TSV)
    b = sn.read_label_tsv(real_data / POINTCEPT_TSV)  # CRLF plus a stray CR per line
    assert b"\r" in (real_data / POINTCEPT_TSV).read_bytes()
    assert len(a.raw_to_nyu40) == 607 and len(b.raw_to_nyu40) == 606
    assert not a.bad_rows and not b.bad_rows and not a.unreadable_lines and not b.unreadable_lines
    shared = set(a.raw_to_nyu40) & set(b.raw_to_nyu40)
    assert len(shared) == 606 and set(a.raw_to_nyu40) - shared == {"stick"}
    assert all(a.raw_to_nyu40[k] == b.raw_to_nyu40[k] for k in shared)
    # spot checks against the file text: first data rows
    assert a.lookup("wall") == (1, 1) and a.lookup("chair") == (2, 5) and b.lookup("floor") == (3, 2)
    with pytest.raises(KeyError, match="not in the tsv"):
        b.lookup("stick")


@pytest.mark.realdata
def test_class_lists_match_benchmark_files(real_data):
    bench = (real_data / "ScanNet__ScanNet/Tasks/Benchmark/classes_SemVoxLabel-nyu40id.txt").read_text().split("\n")
    pairs = [ln.split() for ln in bench if ln.strip()]
    assert [int(p[0]) for p in pairs] == list(VALID_CLASS_IDS_20)
    assert [" ".join(p[1:]) for p in pairs] == list(CLASS_LABELS_20)
    csv_rows = (real_data / "daveredrum__ScanRefer/data/scannet/meta_data/nyu40_labels.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1].replace("_", " ") for r in csv_rows] == list(NYU40_CLASSES)
    # ScanNet-200 ids are tsv `id` values (one per `category`; several raw_categories share one): every row
    # with such an id names the class in its `category` column, in both tsv copies
    from scene3d.data.labels import CLASS_LABELS_200
    for tsv in (POINTCEPT_TSV, SCANREFER_TSV):
        rows = [ln.split("\t") for ln in (real_data / tsv).read_text().splitlines() if ln.strip()][1:]
        cats, names = {}, {}
        for r in rows:
            cats.setdefault(int(r[0]), set()).add(r[2])
            names.setdefault(int(r[0]), set()).update(r[1:3])
        assert all(n in names[i] for i, n in zip(VALID_CLASS_IDS_200, CLASS_LABELS_200))
        # id 1163 ("object") is the one both copies edited: stick / object rows (SOURCES.md)
        assert all(cats[i] == {n} for i, n in zip(VALID_CLASS_IDS_200, CLASS_LABELS_200) if i != 1163)


@pytest.mark.realdata
def test_real_axis_alignment_matches_referit3d(real_data):
    ref = json.loads((real_data / "referit3d__referit3d/referit3d/data/scannet/scans_axis_alignment_matrices.json")
                     .read_text())
    for sid in ("scene0000_01", "scene0000_02", "scene0011_00"):
        m = sn.read_axis_alignment(real_data / f"ripl__Transcrib3D/data/scannet_scene_info/{sid}.txt")
        assert m.shape == (4, 4) and np.allclose(m, np.asarray(ref[sid]).reshape(4, 4), atol=1e-6), sid
        assert not np.allclose(m, np.eye(4))


@pytest.mark.realdata
@pytest.mark.parametrize("sid", ["scene0000_01", "scene0000_02"])
def test_real_boxes_reproduce_scanrefer_and_mmdet3d(real_data, sid):
    d = real_data / MMDET
    vert = np.load(d / f"{sid}_vert_all.npy")
    ins = np.load(d / f"{sid}_ins_label_all.npy").astype(np.int64)
    sem = np.load(d / f"{sid}_sem_label_all.npy").astype(np.int64)
    boxes = sn.compute_object_boxes(vert[:, :3], ins - 1)  # instance = objectId = ins - 1
    row = {int(i): j for j, i in enumerate(boxes.ids)}
    scanrefer = np.load(real_data / f"ripl__Transcrib3D/data/scanrefer/scannet/scannet_data/{sid}_aligned_bbox.npy")
    for r in scanrefer:
        j = row[int(r[7])]
        assert np.allclose(np.r_[boxes.center[j], boxes.size[j]], r[:6], atol=1e-5)
        assert set(np.unique(sem[ins - 1 == int(r[7])]).tolist()) == {int(r[6])}
    structure = {int(i) for i in boxes.ids if int(np.unique(sem[ins - 1 == i])[0]) in (1, 2, 22)}
    assert set(scanrefer[:, 7].astype(int)) == set(row) - structure  # ScanRefer drops wall/floor/ceiling only
    mb, mi = np.load(d / f"{sid}_bbox.npy"), np.load(d / f"{sid}_bbox_idx.npy")
    for r, i in zip(mb, mi):
        j = row[int(i) - 1]
        assert np.allclose(np.r_[boxes.center[j], boxes.size[j]], r[:6], atol=1e-5)
    # the same through the export reader + loader: objects keep wall/floor, with their nyu40 ids
    scene = load_processed_scene(d / sid)
    objs = scene.object_by_id()
    assert scene.source == "mmdet3d" and scene.num_points == vert.shape[0] and len(objs) == len(row)
    for r in scanrefer:
        o = objs[int(r[7])]
        assert o.nyu40_id == int(r[6]) and np.allclose(np.r_[o.center, o.size], r[:6], atol=1e-5)
    assert any(o.is_structure for o in scene.objects)


# ----------------------------------------------------------------------------------------------- synthetic

def test_synth_end_to_end_boxes_resume_force(synth_root, tmp_path):
    layout = json.loads((synth_root / "synth_layout.json").read_text())["scenes"]
    out = tmp_path / "out"
    tsv = synth_root / "scannetv2-labels.combined.tsv"
    s = sn.process_scans(synth_root / "scans", out, tsv, workers=2, progress=False)
    assert s.ok and s.done == sorted(layout)
    for sid, lay in layout.items():
        scene = load_processed_scene(out / sid)
        objs = scene.object_by_id()
        assert len(objs) == len(lay["objects"])
        for o in lay["objects"]:
            got = objs[o["object_id"]]
            assert got.label == o["label"] and got.nyu40_id == o["nyu40id"]
            assert np.allclose(got.center, o["center"], atol=2e-6) and np.allclose(got.size, o["size"], atol=2e-6)
        # the floor of an aligned scene lies at z = 0 (synth builds rooms z-up, floor at 0)
        floor = [o for o in scene.objects if o.label == "floor"][0]
        assert abs(floor.center[2] - floor.size[2] / 2) < 1e-4
        assert np.allclose(np.linalg.norm(scene.normal, axis=1), 1, atol=1e-5)
    s2 = sn.process_scans(synth_root / "scans", out, tsv, progress=False)
    assert s2.done == [] and s2.skipped == sorted(layout)
    s3 = sn.process_scans(synth_root / "scans", out, tsv, scenes=[sorted(layout)[0]], force=True, progress=False)
    assert s3.done == [sorted(layout)[0]]


def test_changed_source_is_redone(tmp_path):
    scans = tmp_path / "scans"
    tiny_scene(scans, "scene0001_00")
    tiny_scene(scans, "scene0002_00")
    tsv = write_tsv(tmp_path / "labels.tsv")
    assert sn.process_scans(scans, tmp_path / "out", tsv, progress=False).done == ["scene0001_00", "scene0002_00"]
    txt = scans / "scene0002_00" / "scene0002_00.txt"
    txt.write_text(txt.read_text().replace("Kitchen", "Bedroom"))
    s = sn.process_scans(scans, tmp_path / "out", tsv, progress=False)
    assert s.done == ["scene0002_00"] and s.skipped == ["scene0001_00"]
    write_tsv(tsv, list(TSV_ROWS.values()) + ["4\ttable\ttable\t1170\t7\t10"])  # a new tsv redoes everything
    assert len(sn.process_scans(scans, tmp_path / "out", tsv, progress=False).done) == 2


def test_kill_during_run_leaves_no_half_scene_and_resume_skips_done(tmp_path):
    scans = tmp_path / "scans"
    ids = [f"scene000{i}_00" for i in range(1, 5)]
    for sid in ids:
        tiny_scene(scans, sid)
    tsv = write_tsv(tmp_path / "labels.tsv")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scene3d", "prep", "scannet", str(scans), str(out), "--labels", str(tsv),
           "--no-progress"]
    env = dict(os.environ, **{sn.TEST_SLEEP_ENV: "0.6"})
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not (out / ids[0] / "meta.json").exists():
            time.sleep(0.02)
        time.sleep(0.3)  # the second scene is now mid-write (sleeping before its meta.json)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / ids[0] / "meta.json").exists()
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert 1 <= len(visible) < len(ids)
    for sid in visible:  # every visible scene is complete and loads
        assert load_processed_scene(out / sid).num_points == 13
    assert any(p.name.startswith(".") for p in out.iterdir())  # the killed scene's temp dir
    s = sn.process_scans(scans, out, tsv, progress=False)
    assert s.ok and s.skipped == visible and s.done == sorted(set(ids) - set(visible))
    assert sorted(p.name for p in out.iterdir()) == ids  # stale temp dir cleaned
    s = sn.process_scans(scans, out, tsv, force=True, progress=False)
    assert s.done == ids


def test_instance_from_segments_hand_case_and_bad_ids(tmp_path):
    seg = np.array([1, 1, 2, 3, 2, 9])
    groups = [sn.SegGroup(0, "a", np.array([1, 2])), sn.SegGroup(4, "b", np.array([2]))]  # later group wins
    assert sn.instance_from_segments(seg, groups).tolist() == [0, 0, 4, -1, 4, -1]
    with pytest.raises(sn.ScanNetFormatError, match="names segment 5"):
        sn.instance_from_segments(seg, [sn.SegGroup(0, "a", np.array([1, 5]))], "x.aggregation.json")
    tiny_scene(tmp_path / "scans", "scene0001_00")
    s = sn.process_scans(tmp_path / "scans", tmp_path / "out", write_tsv(tmp_path / "l.tsv"),
                         scenes=["../scans", "scene0001_00"], progress=False)
    assert s.done == ["scene0001_00"] and "invalid scene id" in s.failed["../scans"]


# ----------------------------------------------------------------------------------------------- not raw scans

def test_mmdet_export_dir_is_refused_with_the_reason(real_data, tmp_path, capsys):
    tsv = write_tsv(tmp_path / "labels.tsv")
    with pytest.raises(sn.ScanNetFormatError, match="mmdetection3d/votenet exports .2 scenes: scene0000_01, "
                                                    "scene0000_02.*need no prep"):
        sn.process_scans(real_data / MMDET, tmp_path / "out", tsv, progress=False)
    assert not (tmp_path / "out").exists()
    rc = cli_main(["prep", "scannet", str(real_data / MMDET), str(tmp_path / "out"), "--labels", str(tsv),
                   "--no-progress"])
    assert rc == 2 and str(real_data / MMDET) in capsys.readouterr().err
    # what the message promises: the export loads as it is
    assert load_processed_scene(real_data / MMDET / "scene0000_01").source == "mmdet3d"


def test_zero_scenes_and_other_layouts_are_errors(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "labels.tsv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sn.ScanNetFormatError, match="zero scenes"):
        sn.process_scans(tmp_path / "empty", tmp_path / "out", tsv, progress=False)
    rc = cli_main(["prep", "scannet", str(tmp_path / "empty"), str(tmp_path / "out"), "--labels", str(tsv)])
    assert rc == 2 and "zero scenes" in capsys.readouterr().err
    scan = tiny_scene(tmp_path / "scans")
    with pytest.raises(sn.ScanNetFormatError, match=f"one scan directory.*{tmp_path / 'scans'}"):
        sn.process_scans(scan, tmp_path / "out", tsv, progress=False)
    with pytest.raises(sn.ScanNetFormatError, match="scene list .* is empty"):
        sn.process_scans(tmp_path / "scans", tmp_path / "out", tsv, scenes=[], progress=False)
    s = sn.process_scans(tmp_path / "scans", tmp_path / "out", tsv, progress=False)
    assert s.done == ["scene0001_00"]
    with pytest.raises(sn.ScanNetFormatError, match="scene3d-processed scenes .1: scene0001_00.*need no prep"):
        sn.process_scans(tmp_path / "out", tmp_path / "out2", tsv, progress=False)
    for f in (tmp_path / "out" / "scene0001_00").glob("*.json"):  # Pointcept keeps only the arrays
        f.unlink()
    with pytest.raises(sn.ScanNetFormatError, match="Pointcept-processed scenes"):
        sn.process_scans(tmp_path / "out", tmp_path / "out2", tsv, progress=False)


# ----------------------------------------------------------------------------------------------- BOM

def test_label_tsv_split_file_and_txt_with_a_bom(tmp_path):
    tsv = tmp_path / "labels.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + ("\n".join([TSV_HEADER, *TSV_ROWS.values()]) + "\n").encode())
    assert sn.read_label_tsv(tsv).raw_to_nyu40["chair"] == 5
    split = tmp_path / "split.txt"
    split.write_bytes(b"\xef\xbb\xbfscene0001_00\nscene0002_00\n")
    assert sn.read_scene_list(split) == ["scene0001_00", "scene0002_00"]
    txt = tmp_path / "scene.txt"
    txt.write_bytes(b"\xef\xbb\xbfaxisAlignment = " + " ".join(["2"] + ["0"] * 4 + ["1"] + ["0"] * 4 + ["1"] +
                                                                ["0"] * 4 + ["1"]).encode() + b"\n")
    assert sn.read_axis_alignment(txt)[0, 0] == 2


# ----------------------------------------------------------------------------------------------- workers

def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from Linux /proc")
def test_kill_9_of_a_parallel_run_ends_its_workers(tmp_path):
    scans = tmp_path / "scans"
    for i in range(1, 7):
        tiny_scene(scans, f"scene000{i}_00")
    tsv = write_tsv(tmp_path / "labels.tsv")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scene3d", "prep", "scannet", str(scans), str(out), "--labels", str(tsv),
           "--workers", "2", "--no-progress"]
    env = dict(os.environ, **{sn.TEST_SLEEP_ENV: "60"})  # each worker sleeps mid-scene for a minute
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len([p for p in out.glob(".*.tmp")]) < 2:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) >= 2, "the workers did not start"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and any(map(_alive, workers)):
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "workers outlived their killed parent"
    finally:
        for w in workers:  # never leave a stray process behind a failing test
            if _alive(w):
                os.kill(w, signal.SIGKILL)
