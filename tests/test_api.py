"""scene3d.api: Segmenter.from_pretrained, load_scene for every input kind, segment (single / list /
proposals), and the errors of bad input."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from scene3d import Segmenter
from scene3d.api import SceneLoadError, SegmentResult, load_scene
from scene3d.data.augment import turn_points
from scene3d.data.referring import scene_to_tensors
from scene3d.data.scene import load_processed_scene
from data_prep.synthetic import prepare_synthetic
from scene3d.engine.checkpoint import CheckpointError, save_checkpoint
from scene3d.models.pipeline import Scene3DModel
from scene3d.structures import PointBatch
from helpers import small_config



@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("api"), num_scenes=1, seed=3, val_fraction=0.0,
                             progress=False)


@pytest.fixture(scope="module")
def scene_dir(syn):
    (sid,) = os.listdir(syn.processed)
    return syn.processed / sid


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model and the run dir of a checkpoint of it (written by the engine's save_checkpoint)."""
    torch.manual_seed(0)
    model = Scene3DModel(small_config()).eval()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoints", 3, model.trainable_state_dict(), config={"model": small_config().to_dict()})
    return model, run


@pytest.fixture(scope="module")
def seg(trained):
    return Segmenter.from_pretrained(trained[1], device="cpu")


@pytest.fixture(scope="module")
def scene(seg, scene_dir):
    return seg.load_scene(scene_dir)


# ------------------------------------------------------------------------------------------ from_pretrained
def test_from_pretrained_answers_like_the_saved_model(seg, trained, scene_dir, scene):
    model, _ = trained
    assert seg.step == 3 and seg.checkpoint.endswith("step_00000003")
    s = load_processed_scene(scene_dir)
    pts = PointBatch.from_list([scene_to_tensors(s)], scene_ids=[s.scene_id])
    ref = model.predict(pts, ["the brown chair"])[0]  # independent path: the dataset's tensors + model.predict
    got = seg.segment(scene, "the brown chair")
    assert np.array_equal(got.point_mask, ref.point_mask.numpy())
    assert np.allclose(got.all_scores, ref.obj_scores.numpy(), atol=1e-6)
    assert np.array_equal(got.object_ids, ref.object_ids.numpy()) and got.source == ref.source


def test_from_pretrained_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Segmenter.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        Segmenter.from_pretrained(tmp_path)  # exists, holds no checkpoint


# ------------------------------------------------------------------------------------------ load_scene
def test_load_processed_dir(scene, scene_dir):
    s = load_processed_scene(scene_dir)
    assert scene.source == "scene3d" and scene.scene_id == s.scene_id and scene.num_points == s.num_points
    assert np.array_equal(scene.coord, s.coord) and np.array_equal(scene.color, s.color)
    assert np.array_equal(scene.instance, s.instance) and np.array_equal(scene.superpoint, s.superpoint)
    assert scene.labels == {o.id: o.label for o in s.objects}
    assert not scene.coord.flags.writeable  # immutable: the segmenter's cache keys on identity


def test_load_raw_scan_dir_runs_the_prep_in_memory(syn, scene, scene_dir):
    scan = syn.root / "raw" / "scans" / scene_dir.name
    before = sorted(os.listdir(scan))
    raw = load_scene(scan)
    assert raw.source == "scannet-raw" and raw.scene_id == scene_dir.name
    # the processed dir written by the prep tool is the reference
    for name in ("coord", "color", "normal", "instance", "superpoint"):
        assert np.array_equal(getattr(raw, name), getattr(scene, name)), name
    assert raw.labels == scene.labels
    assert sorted(os.listdir(scan)) == before  # nothing written
    # the mesh file itself, with its segs beside it, is read the same way
    assert load_scene(scan / f"{scene_dir.name}_vh_clean_2.ply").source == "scannet-raw"


def test_load_pointcept_dir_and_mmdet_export(tmp_path, scene):
    pc = tmp_path / "pc" / "scene_pc"
    pc.mkdir(parents=True)
    np.save(pc / "coord.npy", scene.coord)
    np.save(pc / "color.npy", scene.color.astype(np.float32))  # Pointcept-style float colours
    np.save(pc / "instance.npy", scene.instance.astype(np.int16))
    got = load_scene(pc)
    assert got.source == "pointcept" and got.scene_id == "scene_pc"
    assert np.array_equal(got.coord, scene.coord) and np.array_equal(got.color, scene.color)
    assert np.array_equal(got.instance, scene.instance)

    mm = tmp_path / "mm"
    mm.mkdir()
    np.save(mm / "sc_vert.npy", np.c_[scene.coord, scene.color.astype(np.float32)])
    np.save(mm / "sc_ins_label.npy", (scene.instance + 1).astype(np.int64))  # exports store objectId + 1
    np.save(mm / "sc_sem_label.npy", np.zeros(scene.num_points, dtype=np.int64))
    got = load_scene(mm / "sc_vert.npy")
    assert got.source == "mmdet3d" and np.array_equal(got.instance, scene.instance)
    assert np.array_equal(got.coord, scene.coord)


def _sphere():
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    rgb = (np.abs(mesh.vertices) * 400).clip(0, 255).astype(np.uint8)
    mesh.visual.vertex_colors = np.c_[rgb, np.full(len(rgb), 255, np.uint8)]
    return mesh, rgb


def _sorted_rows(a):
    a = np.round(np.asarray(a, dtype=np.float64), 5)
    return a[np.lexsort(a.T[::-1])]


def test_load_mesh_files_with_trimesh(tmp_path):
    mesh, rgb = _sphere()
    mesh.export(tmp_path / "ball.ply")
    got = load_scene(tmp_path / "ball.ply")
    assert got.source == "mesh" and got.scene_id == "ball" and got.instance is None
    assert np.allclose(got.coord, mesh.vertices, atol=1e-6) and np.array_equal(got.color, rgb)
    assert np.allclose(np.linalg.norm(got.normal, axis=1), 1.0, atol=1e-4)
    mesh.export(tmp_path / "ball.obj")
    got = load_scene(tmp_path / "ball.obj")
    assert got.num_points == len(mesh.vertices)
    assert np.allclose(_sorted_rows(got.coord), _sorted_rows(mesh.vertices), atol=1e-5)
    import trimesh  # a point-only PLY (no faces) is a point cloud

    trimesh.PointCloud(mesh.vertices, colors=np.c_[rgb, np.full(len(rgb), 255)]).export(tmp_path / "pts.ply")
    got = load_scene(tmp_path / "pts.ply")
    assert got.source == "pointcloud" and np.array_equal(got.color, rgb) and got.normal is None


def test_load_pcd_with_open3d(tmp_path):
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(0)
    xyz = rng.random((300, 3))
    col = rng.random((300, 3))
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    pcd.colors = o3d.utility.Vector3dVector(col)
    assert o3d.io.write_point_cloud(str(tmp_path / "room.pcd"), pcd)
    got = load_scene(tmp_path / "room.pcd")
    assert got.source == "pointcloud" and got.num_points == 300
    assert np.allclose(got.coord, xyz, atol=1e-6)
    assert np.abs(got.color.astype(int) - np.round(col * 255)).max() <= 1


def test_load_arrays():
    coord = np.arange(30, dtype=np.float64).reshape(10, 3)
    got = load_scene(coord=coord, color=np.full((10, 3), 0.5), instance=np.r_[np.zeros(5), np.ones(5)].astype(int),
                     scene_id="mine")
    assert got.scene_id == "mine" and got.coord.dtype == np.float32 and np.array_equal(got.coord, coord)
    assert (got.color == 128).all() and got.has_instances  # floats in [0, 1] -> round(0.5 * 255)
    assert load_scene(coord=coord, color=np.full((10, 3), 200, np.uint8)).color[0, 0] == 200
    assert not load_scene(coord=coord, instance=np.full(10, -1)).has_instances


# ------------------------------------------------------------------------------------------ segment
def _box_of(coord, mask):
    lo, hi = coord[mask].min(0), coord[mask].max(0)
    return np.r_[(lo + hi) / 2, hi - lo]


def test_segment_result_is_consistent_with_the_scene(seg, scene):
    r = seg.segment(scene, "the table next to the sofa")
    assert isinstance(r, SegmentResult) and r.text == "the table next to the sofa" and not r.proposals
    n, t = scene.num_points, len(r.objects)
    assert r.point_mask.shape == (n,) and r.point_mask.dtype == bool and r.object_masks.shape == (t, n)
    assert np.array_equal(r.point_mask, r.object_masks.any(0)) and r.num_points == int(r.point_mask.sum())
    assert r.boxes.shape == (t, 6) and r.scores.shape == (t,)
    assert np.allclose(r.scores, r.all_scores[r.objects])
    assert r.answer.endswith("[SEG]") and r.source in ("identifiers", "decoder", "none")
    for k, oid in enumerate(r.object_ids):  # instance scenes: object k is exactly the points of its instance id
        assert np.array_equal(r.object_masks[k], scene.instance == oid)
        assert np.allclose(r.boxes[k], _box_of(scene.coord, scene.instance == oid), atol=1e-5)


def test_segment_list_equals_single_and_encodes_once(seg, scene, monkeypatch):
    texts = ["the chair", "all the pillows", "the lamp on the nightstand"]
    singles = [seg.segment(scene, t) for t in texts]
    seg._cached = None
    calls = {"encode": 0, "predict": []}
    encode, predict = seg.model.encode, seg.model.segmenter.predict

    def count_encode(*a, **k):
        calls["encode"] += 1
        return encode(*a, **k)

    def count_predict(scene_inputs, txts, use_cache=True):
        calls["predict"].append(list(txts))
        return predict(scene_inputs, txts, use_cache=use_cache)

    monkeypatch.setattr(seg.model, "encode", count_encode)
    monkeypatch.setattr(seg.model.segmenter, "predict", count_predict)
    batch = seg.segment(scene, texts)
    assert calls["encode"] == 1 and calls["predict"] == [texts]  # one encoded scene, one predict call
    assert isinstance(batch, list) and len(batch) == 3
    for a, b in zip(batch, singles):
        for name in SegmentResult._fields:
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, np.ndarray) and x.dtype.kind == "f":
                # batched queries run as one padded LLM batch: float scores move by ~1e-7, nothing else
                assert x.shape == y.shape and np.allclose(x, y, atol=1e-5), name
            else:
                assert (np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y), name
    seg.segment(scene, "the bed")
    assert calls["encode"] == 1  # the cached encoding is reused for the same scene


@pytest.mark.parametrize("forced", [False, True])
def test_segment_without_instances_uses_proposals(seg, scene, forced):
    bare = scene if forced else load_scene(coord=scene.coord, color=scene.color, scene_id="bare")  # no instances
    r = seg.segment(bare, "the sofa", proposals=forced)
    enc = seg.encode(bare, proposals=forced)
    assert r.proposals and enc.proposals and enc.inputs.tokens.num_objects > 0
    assert r.object_source == "geometric" and r.num_proposals == enc.inputs.tokens.num_objects
    assert r.num_candidates >= r.num_proposals
    assert (r.object_ids == -1).all() and r.point_mask.shape == (bare.num_points,)
    p2o = enc.inputs.tokens.point2obj.numpy()
    assert np.array_equal(r.point_mask, np.isin(p2o, r.objects))
    for k, row in enumerate(r.objects):
        assert np.array_equal(r.object_masks[k], p2o == row)
        assert np.allclose(r.boxes[k], _box_of(bare.coord, p2o == row), atol=1e-5)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("text, match", [("", "text"), ("   \n", "text"), (["ok", " "], r"text\[1\]"),
                                         ([], "text"), ([3], r"text\[0\]")])
def test_bad_query_text(seg, scene, text, match):
    with pytest.raises(ValueError, match=match):
        seg.segment(scene, text)


def test_unknown_words_are_warned_about_and_reported(seg, scene):
    from scene3d.api import UnknownWordsWarning

    with pytest.warns(UnknownWordsWarning, match="'xyzzy'"):
        res = seg.segment(scene, "the xyzzy near the chair")
    assert res.unknown_words == ["xyzzy"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)  # known words: no warning
        assert seg.segment(scene, "the chair").unknown_words == []


def test_long_query_is_cut_with_a_warning(seg, scene):
    """A 300-token sentence: answered (not an error), its tail cut by the documented rule, said twice."""
    from scene3d.llm.prompt import TextTruncatedWarning

    long = "this is a brown wooden chair . it is placed at the end of the table , next to the window . " * 15
    cap = seg.model.segmenter.config.prompt.max_text_tokens
    n = len(seg.model.segmenter.text_tokenizer(long.strip(), add_special_tokens=False)["input_ids"])
    assert n >= 300
    with pytest.warns(TextTruncatedWarning, match=f"{n} tokens cut to its first {cap}"):
        res = seg.segment(scene, long)
    assert res.text_tokens_dropped == n - cap
    # only the first cap tokens count: a sentence that differs after them gets the same answer
    with pytest.warns(TextTruncatedWarning):
        other = seg.segment(scene, long + " the lamp on the desk")
    assert other.answer == res.answer and np.array_equal(other.all_scores, res.all_scores)


def test_bad_arrays():
    with pytest.raises(SceneLoadError, match="no points"):
        load_scene(coord=np.zeros((0, 3)))
    with pytest.raises(SceneLoadError, match=r"row 1"):
        load_scene(coord=np.array([[0, 0, 0], [np.nan, 0, 0]]))
    with pytest.raises(SceneLoadError, match="every point"):
        load_scene(coord=np.full((4, 3), np.nan))
    with pytest.raises(SceneLoadError, match=r"'color'.*coord"):
        load_scene(coord=np.zeros((5, 3)), color=np.zeros((4, 3)))
    with pytest.raises(SceneLoadError, match=r"'instance'.*coord"):
        load_scene(coord=np.zeros((5, 3)), instance=np.zeros(6, int))
    with pytest.raises(SceneLoadError, match=r"\[N, 3\]"):
        load_scene(coord=np.zeros((5, 2)))
    with pytest.raises(SceneLoadError, match="path or coord"):
        load_scene()


def _ascii_ply(path, rows):
    head = f"ply\nformat ascii 1.0\nelement vertex {len(rows)}\nproperty float x\nproperty float y\n" \
           "property float z\nend_header\n"
    path.write_text(head + "".join(" ".join(str(v) for v in r) + "\n" for r in rows))


def test_bad_files_name_the_file(tmp_path):
    notes = tmp_path / "notes.ply"
    notes.write_text("these are not vertices\n")
    with pytest.raises(SceneLoadError, match="notes.ply"):
        load_scene(notes)
    nan = tmp_path / "nan.ply"
    _ascii_ply(nan, [(0, 0, 0), (1, "nan", 0), (0, 1, 0)])
    with pytest.raises(SceneLoadError, match=r"nan\.ply.*NaN"):
        load_scene(nan)
    all_nan = tmp_path / "allnan.ply"
    _ascii_ply(all_nan, [("nan", "nan", "nan")] * 3)
    with pytest.raises(SceneLoadError, match=r"allnan\.ply.*every point"):
        load_scene(all_nan)
    empty = tmp_path / "empty.ply"
    _ascii_ply(empty, [])
    with pytest.raises(SceneLoadError, match="empty.ply"):
        load_scene(empty)
    junk = tmp_path / "junk.pcd"
    junk.write_bytes(b"\x00\x01garbage")
    pytest.importorskip("open3d")
    with pytest.raises(SceneLoadError, match="junk.pcd"):
        load_scene(junk)
    with pytest.raises(FileNotFoundError, match="missing.ply"):
        load_scene(tmp_path / "missing.ply")
    (tmp_path / "folder").mkdir()
    with pytest.raises(SceneLoadError, match="folder.*not a scene directory"):
        load_scene(tmp_path / "folder")


def test_scene_without_objects(seg):
    tiny = load_scene(coord=np.random.default_rng(0).random((12, 3)), scene_id="speck")  # < min_points
    with pytest.raises(ValueError, match="speck.*no objects"):
        seg.segment(tiny, "the chair")


def test_too_many_objects_follows_the_model_rule(scene):
    from scene3d.llm.loader import LLMConfig

    torch.manual_seed(0)
    few = Segmenter(Scene3DModel(small_config(llm=LLMConfig(num_obj_tokens=4))))
    assert len(np.unique(scene.instance[scene.instance >= 0])) > 4
    with pytest.raises(ValueError, match=r"objects but the model has 4 identifiers"):
        few.segment(scene, "the chair")
    few.model.segmenter.config.overflow = "topk"  # the model's other rule: keep the 4 largest objects
    few._cached = None
    from scene3d.api import ObjectsOverflowWarning

    m = len(np.unique(scene.instance[scene.instance >= 0]))
    with pytest.warns(ObjectsOverflowWarning, match=f"{m} objects but the model has 4 identifiers.*{m - 4} are left out"):
        r = few.segment(scene, "the chair")
    assert r.point_mask.shape == (scene.num_points,)
    # the result names the objects left out: every object but the 4 with the most points
    ids, counts = np.unique(scene.instance[scene.instance >= 0], return_counts=True)
    kept = set(ids[np.argsort(-counts, kind="stable")[:4]].tolist())
    assert sorted(r.left_out_ids.tolist()) == sorted(set(ids.tolist()) - kept)
    if r.source == "identifiers":  # named objects can only be among the 4 that got identifiers
        counts = np.bincount(scene.instance[scene.instance >= 0])
        assert set(r.object_ids.tolist()) <= set(np.argsort(-counts, kind="stable")[:4].tolist())


@pytest.mark.realdata
def test_real_scannet_export_boxes_match_mmdet3d(real_data, seg):
    """A real ScanNet scene (mmdet3d export, 80k points): object boxes equal the export's own aligned boxes."""
    d = real_data / "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"
    scene = seg.load_scene(d / "scene0000_01_vert_all.npy")
    assert scene.source == "mmdet3d" and scene.num_points == 80583
    r = seg.segment(scene, "the bed")
    enc = seg.encode(scene)
    ids = enc.inputs.tokens.object_ids.numpy()
    boxes = torch.cat([enc.inputs.tokens.center, enc.inputs.tokens.size], 1).numpy()
    ref, ref_idx = np.load(d / "scene0000_01_bbox.npy"), np.load(d / "scene0000_01_bbox_idx.npy")
    for row, ins_label in zip(ref, ref_idx):  # bbox_idx holds ins_label = objectId + 1
        (j,) = np.flatnonzero(ids == int(ins_label) - 1)
        assert np.allclose(boxes[j], row[:6], atol=1e-4)
    assert np.allclose(r.boxes, boxes[r.objects], atol=1e-6)


# ------------------------------------------------------------------------------------------ large scenes (issue 16)
def _full_box(coord, mask):
    lo, hi = coord[mask].min(0), coord[mask].max(0)
    return np.r_[(lo + hi) / 2, hi - lo]


def test_large_scene_is_downsampled_and_masks_cover_every_point(trained, scene):
    from scene3d.api import DEFAULT_MAX_POINTS

    model, _ = trained
    assert Segmenter(model).max_points == DEFAULT_MAX_POINTS
    whole = Segmenter(model).segment(scene, "the chair")
    assert not whole.downsampled and whole.model_points == scene.num_points and whole.warnings == ()
    small = Segmenter(model, max_points=scene.num_points - 1)  # a cheap stand-in for a 5 M point scan
    r = small.segment(scene, ["the chair", "all the pillows"])[0]
    enc = small.encode(scene)
    voxel = model.config.tokenizer.voxel_size
    assert r.downsampled and r.downsample_voxel == voxel and not enc.downsample.coarsened
    assert r.model_points == enc.inputs.points.num_points == enc.downsample.num_points < scene.num_points
    n, t = scene.num_points, len(r.objects)
    assert r.point_mask.shape == (n,) and r.decoder_mask.shape == (n,) and r.object_masks.shape == (t, n)
    assert np.array_equal(r.point_mask, r.object_masks.any(0))
    # one representative per voxel and instance: every input point of an object is in its mask, exactly
    ids = enc.inputs.tokens.object_ids.numpy()
    assert sorted(ids.tolist()) == sorted(np.unique(scene.instance[scene.instance >= 0]).tolist())
    for k, oid in enumerate(r.object_ids):
        assert np.array_equal(r.object_masks[k], scene.instance == oid)
        assert np.allclose(r.boxes[k], _full_box(scene.coord, scene.instance == oid), atol=1e-5)
    # the decoder's dense mask comes back through the voxel of each point
    p2o_model = enc.inputs.tokens.point2obj.numpy()
    assert np.array_equal(r.point_mask, np.isin(p2o_model[enc.downsample.inverse], r.objects))
    assert not any("coarser" in w for w in r.warnings)


def test_downsampling_coarser_than_the_model_says_so(trained, scene):
    from scene3d.api import DegradedSceneWarning

    model, _ = trained
    cap = 150
    seg_ = Segmenter(model, max_points=cap)
    with pytest.warns(DegradedSceneWarning, match="coarser than its resolution"):
        r = seg_.segment(scene, "the table")
    assert r.model_points <= cap and r.downsample_voxel > model.config.tokenizer.voxel_size
    assert any("coarser than its resolution" in w for w in r.warnings)
    assert r.point_mask.shape == (scene.num_points,)
    for k, oid in enumerate(r.object_ids):  # instances stay exact even on a coarse grid
        assert np.array_equal(r.object_masks[k], scene.instance == oid)
    seg_.max_points = None  # no cap: the cache notices the change and the model sees every point
    assert seg_.segment(scene, "the table").model_points == scene.num_points


def test_downsampled_proposals_map_back_to_every_point(trained, scene):
    model, _ = trained
    bare = load_scene(coord=scene.coord, color=scene.color, scene_id="bare")
    seg_ = Segmenter(model, max_points=bare.num_points // 2)
    r = seg_.segment(bare, "the sofa")
    enc = seg_.encode(bare)
    assert r.proposals and r.downsampled and r.point_mask.shape == (bare.num_points,)
    p2o = enc.inputs.tokens.point2obj.numpy()[enc.downsample.inverse]  # proposal row of every input point
    for k, row in enumerate(r.objects):
        assert np.array_equal(r.object_masks[k], p2o == row)
        assert np.allclose(r.boxes[k], _full_box(bare.coord, p2o == row), atol=1e-5)


# ------------------------------------------------------------------------------------------ degraded answers (issue 16)
def test_every_score_below_threshold_is_reported(trained, scene, monkeypatch):
    model, _ = trained
    seg_ = Segmenter(model)
    r = seg_.segment(scene, "the chair")
    assert r.all_below_threshold == bool(r.all_scores.max() < model.segmenter.config.threshold)
    monkeypatch.setattr(model.segmenter.config, "threshold", 0.999)  # no object of a random model reaches it
    assert r.all_scores.max() < 0.999
    low = seg_.segment(scene, "the chair")
    assert low.all_below_threshold
    (w,) = [w for w in low.warnings if "below the decoder threshold" in w]
    assert "0.999" in w and f"best {low.all_scores.max():.3f}" in w
    assert ("only the best of weak candidates" in w) == bool(len(low.objects))


def test_oversized_proposals_are_reported(trained, scene, monkeypatch):
    """Proposals that hold most of the scene are named on the result and warned about (and only those)."""
    from scene3d.api import DegradedSceneWarning

    model, _ = trained
    seg_ = Segmenter(model)
    bare = load_scene(coord=scene.coord, color=scene.color, scene_id="bare")
    enc = seg_.encode(bare, objects="learned")  # an untrained proposal head: its clusters are whatever they are
    p2o = enc.inputs.tokens.point2obj.numpy()
    share = np.bincount(p2o[p2o >= 0], minlength=enc.inputs.tokens.num_objects) / bare.num_points
    expect = np.flatnonzero(share > 0.5)
    r = seg_.segment(bare, "the sofa", objects="learned")
    assert r.object_source == "learned" and r.num_proposals == enc.inputs.tokens.num_objects
    assert r.oversized.tolist() == expect.tolist()  # ... and the report says which of them swallow the scene
    assert any("did not separate the objects" in w for w in r.warnings) == bool(expect.size)
    # a proposal that is the whole scene: every point one object
    one = Segmenter(model)
    monkeypatch.setattr(model.tokenizer3d.cfg.proposal, "radius", 100.0)  # every voted centre joins one cluster
    with pytest.warns(DegradedSceneWarning, match="holds more than 50% of its points"):
        r = one.segment(bare, "the sofa", objects="learned")
    assert r.oversized.tolist() == [0] and any("proposal 0 (100%)" in w for w in r.warnings)
    assert not Segmenter(model).segment(scene, "the sofa").oversized.size  # instances are never "oversized"


@pytest.mark.realdata
def test_real_scan_without_instances_reports_the_swallowing_proposal(real_data, trained):
    """scene0000_01 as bare arrays (issue 16: 2 proposals, one of 77k of 80k points): the result says so."""
    from scene3d.api import DegradedSceneWarning

    d = real_data / "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"
    vert = np.load(d / "scene0000_01_vert_all.npy")
    seg_ = Segmenter(trained[0])
    bare = seg_.load_scene(coord=vert[:, :3], color=vert[:, 3:6].astype(np.uint8), scene_id="scene0000_01")
    with pytest.warns(DegradedSceneWarning, match="did not separate the objects"):
        r = seg_.segment(bare, "the bed", objects="learned")
    p2o = seg_.encode(bare, objects="learned").inputs.tokens.point2obj.numpy()
    (row,) = r.oversized
    assert (p2o == row).sum() > 0.5 * bare.num_points
    # the default for a scan without instances, the geometric proposals, separate it into many objects
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegradedSceneWarning)
        g = seg_.segment(bare, "the bed")
    assert g.object_source == "geometric" and g.num_proposals > 30 and not g.oversized.size


def test_objects_argument(seg, scene):
    """objects= chooses where the objects come from; a bad value or an impossible choice is a one-line error."""
    inst = seg.segment(scene, "the sofa", objects="instances")
    assert inst.object_source == "instances" and inst.num_proposals == 0 and not inst.proposals
    auto = seg.segment(scene, "the sofa")  # instances when the scene has them
    assert auto.object_source == "instances" and np.array_equal(auto.all_scores, inst.all_scores)
    prop = seg.segment(scene, "the sofa", objects="proposals")
    enc = seg.encode(scene, objects="proposals")
    assert prop.proposals and prop.object_source == "geometric" and prop.num_proposals == enc.inputs.tokens.num_objects
    # the proposals are the geometric ones of the scene's own points, not its instances
    from scene3d.tokenizer.geometric_proposals import proposal_objects

    labels = proposal_objects(scene.coord, scene.color).labels
    assert np.array_equal(enc.inputs.tokens.point2obj.numpy(), labels)
    with pytest.raises(ValueError, match="objects: expected one of auto, instances, proposals, learned, got 'gt'"):
        seg.segment(scene, "the sofa", objects="gt")
    bare = load_scene(coord=scene.coord, scene_id="bare")
    with pytest.raises(ValueError, match="scene 'bare' has no instance ids"):
        seg.segment(bare, "the sofa", objects="instances")
    with pytest.raises(ValueError, match="contradicts"):
        seg.segment(scene, "the sofa", proposals=True, objects="learned")


def test_turns_vote_over_orientations_and_say_so(trained, scene):
    model, run = trained
    seg = Segmenter.from_pretrained(run, device="cpu", turns=4)
    texts = ["the chair on the north side", "all the tables"]
    results = seg.segment(scene, texts)
    points = scene.to_points("cpu")
    voted = model.predict(points, texts, turns=4)
    for r, p in zip(results, voted):
        assert r.turns == 4 and r.agreement == p.agreement and r.agreement in (0.25, 0.5, 0.75, 1.0)
        assert np.array_equal(r.objects, p.objects.numpy()) and np.array_equal(r.point_mask, p.point_mask.numpy())
        assert np.allclose(r.all_scores, p.obj_scores.numpy(), atol=1e-6)
        disagree = [w for w in r.warnings if "orientations disagree" in w]
        assert bool(disagree) == (r.agreement < 1.0)  # a split vote is said, a unanimous one is not
        if disagree:
            assert f"{round(r.agreement * 4)} of 4 quarter turns gave this answer" in disagree[0]
    plain = Segmenter.from_pretrained(run, device="cpu").segment(scene, texts[0])
    assert plain.turns == 1 and plain.agreement == 1.0 and not plain.warnings
    split = seg._turned(plain, 4, 0.5)  # a split vote, whatever this random model answered above
    assert split.turns == 4 and split.warnings[-1].startswith("the orientations disagree: 2 of 4 quarter turns")
    assert seg._turned(plain, 4, 1.0).warnings == plain.warnings
    with pytest.raises(ValueError, match="turns must be an integer in 1..4"):
        Segmenter.from_pretrained(run, device="cpu", turns=0)
    seg.turns = 9
    with pytest.raises(ValueError, match="Segmenter.turns must be an integer in 1..4"):
        seg.segment(scene, texts[0])


def test_canonical_frame_model_answers_in_the_input_frame(scene, tmp_path):
    """A model with model.canonical_frame tokenizes each scan turned into its canonical frame; the result's masks
    and boxes are still those of the points as given, and the scan turned a quarter turn (its question with it)
    gets the same objects."""
    torch.manual_seed(0)
    cfg = small_config()
    cfg.canonical_frame = True
    model = Scene3DModel(cfg).eval()
    save_checkpoint(tmp_path / "checkpoints", 1, model.trainable_state_dict(), config={"model": cfg.to_dict()})
    seg = Segmenter.from_pretrained(tmp_path, device="cpu")
    assert seg.model.config.canonical_frame
    text = "the chair on the north side of the room"
    r = seg.segment(scene, text)
    for k, oid in enumerate(r.object_ids):
        assert np.array_equal(r.object_masks[k], scene.instance == oid)
        assert np.allclose(r.boxes[k], _box_of(scene.coord, scene.instance == oid), atol=1e-5)
    # a quarter turn counter-clockwise about the middle of the scan's xy extent
    turned = turn_points({"coord": torch.from_numpy(scene.coord)}, 1)["coord"].numpy()
    other = seg.load_scene(coord=turned, color=scene.color, instance=scene.instance)
    t = seg.segment(other, "the chair on the west side of the room")
    assert np.array_equal(t.object_ids, r.object_ids) and np.array_equal(t.point_mask, r.point_mask)
    for k, oid in enumerate(t.object_ids):
        assert np.allclose(t.boxes[k], _box_of(turned, scene.instance == oid), atol=1e-5)
