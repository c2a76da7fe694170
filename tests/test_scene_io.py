"""scene3d.data.scene: loading and validating processed scenes (scene3d, Pointcept, mmdet3d exports)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import scannet as sn
from scene3d.data.exports import majority_per_instance, read_mmdet_export
from scene3d.data.labels import CLASS_LABELS_200, VALID_CLASS_IDS_20
from scene3d.data import SceneFormatError, load_processed_scene
from scene3d.data.scene import load_scene_arrays

from tests.test_prep_scannet import MMDET, tiny_scene, write_tsv


@pytest.fixture()
def processed(tmp_path) -> Path:
    raw = tiny_scene(tmp_path / "scans")
    out = tmp_path / "out" / raw.name
    sn.process_scene(raw, out, sn.read_label_tsv(write_tsv(tmp_path / "l.tsv")))
    return out


def test_roundtrip_fields_and_dtypes(processed):
    s = load_processed_scene(processed)
    assert s.source == "scene3d" and s.scene_id == processed.name and s.num_points == 13
    assert (s.coord.dtype, s.color.dtype, s.normal.dtype) == (np.float32, np.uint8, np.float32)
    assert (s.superpoint.dtype, s.segment20.dtype, s.segment200.dtype, s.instance.dtype) == (
        np.int32, np.int16, np.int16, np.int32)
    assert [(o.id, o.label, o.nyu40_id, o.num_points) for o in s.objects] == [(0, "floor", 2, 4), (1, "chair", 5, 8)]
    assert s.objects[0].is_structure and not s.objects[1].is_structure
    assert np.allclose(s.objects[1].center, [1, 2, 5]) and s.meta["num_faces"] == 14


@pytest.mark.parametrize("case, file, needle", [
    ("dtype", "instance.npy", "dtype int64"),
    ("shape", "color.npy", "shape"),
    ("nan", "coord.npy", "NaN"),
    ("missing", "normal.npy", "missing file"),
    ("range", "segment20.npy", "values in"),
    ("garbage", "superpoint.npy", "not a readable"),
    ("objects", "objects.json", r"objects\[0\] is malformed"),
    ("unlisted", "instance.npy", "no entry in"),
    ("version", "meta.json", "format_version"),
])
def test_corrupt_processed_scene_names_the_file(processed, case, file, needle):
    p = processed / file
    if case == "dtype":
        np.save(p, np.load(p).astype(np.int64))
    elif case == "shape":
        np.save(p, np.load(p)[:-1])
    elif case == "nan":
        a = np.load(p)
        a[3, 1] = np.nan
        np.save(p, a)
    elif case == "missing":
        p.unlink()
    elif case == "range":
        np.save(p, np.full(13, 25, np.int16))
    elif case == "garbage":
        p.write_bytes(b"not an npy")
    elif case == "objects":
        p.write_text(json.dumps({"objects": [{"id": 0}]}))
    elif case == "unlisted":
        a = np.load(p)
        a[-1] = 7
        np.save(p, a)
    elif case == "version":
        meta = json.loads(p.read_text())
        meta["format_version"] = 999
        p.write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match=needle) as ei:
        load_processed_scene(processed)
    assert file in str(ei.value)


def test_pickled_npy_is_refused(processed):
    np.save(processed / "color.npy", np.array([{"a": 1}] * 13, dtype=object), allow_pickle=True)
    with pytest.raises(SceneFormatError, match="color.npy"):
        load_processed_scene(processed)


def test_not_a_scene(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a processed scene"):
        load_processed_scene(tmp_path)
    with pytest.raises(FileNotFoundError, match="no processed scene"):
        load_processed_scene(tmp_path / "scene0000_00")


def test_pointcept_directory_with_its_dtypes(processed, tmp_path):
    pc = tmp_path / "pointcept" / "scene0001_00"
    pc.mkdir(parents=True)
    ours = load_processed_scene(processed)
    np.save(pc / "coord.npy", ours.coord)
    np.save(pc / "color.npy", ours.color.astype(np.float64))  # whole numbers in a float array: castable
    np.save(pc / "normal.npy", ours.normal)
    np.save(pc / "segment20.npy", ours.segment20.astype(np.int64))
    np.save(pc / "segment200.npy", ours.segment200.astype(np.int64))
    np.save(pc / "instance.npy", ours.instance.astype(np.int16))
    s = load_processed_scene(pc)
    assert s.source == "pointcept" and s.superpoint is None
    assert np.array_equal(s.color, ours.color) and s.instance.dtype == np.int32
    assert np.array_equal(s.instance, ours.instance) and np.array_equal(s.segment200, ours.segment200)
    # labels come back from the class indices: floor (200-index 2, 20-index 1 = nyu40 2), chair (1, 4 = nyu40 5)
    assert [(o.id, o.label, o.nyu40_id) for o in s.objects] == [(0, CLASS_LABELS_200[2], VALID_CLASS_IDS_20[1]),
                                                               (1, CLASS_LABELS_200[1], VALID_CLASS_IDS_20[4])]
    assert [(o.label, o.nyu40_id) for o in s.objects] == [("floor", 2), ("chair", 5)]
    for a, b in zip(s.objects, ours.objects):
        assert np.allclose(a.center, b.center) and np.allclose(a.size, b.size)
    np.save(pc / "color.npy", ours.color.astype(np.float64) + 0.5)
    with pytest.raises(SceneFormatError, match="color.npy.*non-integer"):
        load_processed_scene(pc)


def test_load_scene_arrays_reads_what_load_processed_scene_reads(processed, tmp_path):
    ours = load_processed_scene(processed)
    got = load_scene_arrays(processed, ("coord", "instance"))
    assert list(got) == ["coord", "instance"]
    assert np.array_equal(got["coord"], ours.coord) and np.array_equal(got["instance"], ours.instance)
    np.save(processed / "instance.npy", ours.instance.astype(np.int64))     # scene3d dirs: exact dtypes
    with pytest.raises(SceneFormatError, match="instance.npy: dtype int64"):
        load_scene_arrays(processed)
    (processed / "meta.json").write_text(json.dumps({"format_version": -1}))
    with pytest.raises(SceneFormatError, match="format_version"):
        load_scene_arrays(processed)
    pc = tmp_path / "pc" / "scene0001_00"        # a Pointcept dir with only the two arrays: cast where lossless
    pc.mkdir(parents=True)
    np.save(pc / "coord.npy", ours.coord.astype(np.float64))
    np.save(pc / "instance.npy", ours.instance.astype(np.int64))
    got = load_scene_arrays(pc)
    assert got["instance"].dtype == np.int32 and np.array_equal(got["instance"], ours.instance)
    np.save(pc / "instance.npy", np.full(len(ours.coord), -2))
    with pytest.raises(SceneFormatError, match="instance.npy: values in"):
        load_scene_arrays(pc)
    (pc / "instance.npy").unlink()
    with pytest.raises(FileNotFoundError, match="instance.npy"):
        load_scene_arrays(pc)
    with pytest.raises(ValueError, match="unknown scene arrays"):
        load_scene_arrays(pc, ("coords",))


def test_majority_per_instance_matches_loop():
    rng = np.random.default_rng(3)
    inst = rng.integers(-1, 6, 500)
    val = rng.integers(0, 4, 500)
    ids = np.arange(7)
    got = majority_per_instance(inst, val, ids)
    for i in ids:
        v = val[inst == i]
        if v.size == 0:
            assert got[i] == -1
        else:
            counts = np.bincount(v, minlength=4)
            assert got[i] == int(np.flatnonzero(counts == counts.max())[0])


@pytest.mark.realdata
def test_mmdet_export_sampled_and_full(real_data, tmp_path):
    d = real_data / MMDET
    full = load_processed_scene(d / "scene0000_02_vert_all.npy")
    sub = load_processed_scene(d / "scene0000_02_vert.npy")
    assert full.num_points == 86001 and sub.num_points == 50000 and full.normal is None
    ins = np.load(d / "scene0000_02_ins_label_all.npy")
    assert np.array_equal(full.instance, ins.astype(np.int64) - 1)
    assert np.array_equal(full.color, np.load(d / "scene0000_02_vert_all.npy")[:, 3:6].astype(np.uint8))
    # every sampled point is one of the full scene's points with the same instance id
    key = {tuple(p): i for p, i in zip(full.coord.tolist(), full.instance.tolist())}
    assert all(key[tuple(p)] == i for p, i in zip(sub.coord[:500].tolist(), sub.instance[:500].tolist()))
    # a length mismatch between the export's files is an error naming the file
    for name in ("vert", "ins_label", "sem_label"):
        shutil.copy(d / f"scene0000_02_{name}_all.npy", tmp_path / f"scene0000_02_{name}_all.npy")
    np.save(tmp_path / "scene0000_02_sem_label_all.npy", np.zeros(10, np.uint32))
    with pytest.raises(SceneFormatError, match="scene0000_02_sem_label_all.npy"):
        read_mmdet_export(tmp_path / "scene0000_02")
