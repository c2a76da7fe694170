"""scene3d.viz: highlight colours, PLY writing, the two-panel PNG render, save_result."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from scene3d.api import SegmentResult, make_scene
from scene3d.viz import PALETTE, _oblique, highlight_colors, render_png, save_result, slug, write_ply


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG signature + IHDR chunk (read by hand, independent of matplotlib)."""
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_highlight_colors_by_hand():
    color = np.array([[100, 100, 100], [0, 0, 0], [250, 10, 0]], dtype=np.uint8)
    out = highlight_colors(color, np.array([False, True, False]), dim=0.5)
    # unmasked: halfway to grey 170 -> round(0.5 * 100 + 85) = 135; round(0.5*250+85)=210, round(5+85)=90
    assert out.tolist() == [[135, 135, 135], PALETTE[0].tolist(), [210, 90, 85]]
    two = highlight_colors(None, np.array([[True, False, False], [False, False, True]]), n=3)
    assert two.tolist() == [PALETTE[0].tolist(), [170, 170, 170], PALETTE[1].tolist()]
    with pytest.raises(ValueError, match="mask"):
        highlight_colors(color, np.array([True, False]))
    with pytest.raises(ValueError, match="boolean"):
        highlight_colors(color, np.array([0, 1, 0]))


def test_write_ply_round_trip_and_atomic(tmp_path):
    from plyfile import PlyData

    rng = np.random.default_rng(0)
    xyz = rng.random((20, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (20, 3)).astype(np.uint8)
    faces = np.array([[0, 1, 2], [2, 3, 4]])
    p = write_ply(tmp_path / "out" / "s.ply", xyz, rgb, faces)
    ply = PlyData.read(str(p))
    v = ply["vertex"]
    assert np.array_equal(np.c_[v["x"], v["y"], v["z"]], xyz)
    assert np.array_equal(np.c_[v["red"], v["green"], v["blue"]], rgb)
    assert np.array_equal(np.stack(ply["face"]["vertex_indices"]), faces)
    before = p.read_bytes()
    with pytest.raises(ValueError, match="faces"):
        write_ply(p, xyz, rgb, np.array([[0, 1, 99]]))
    assert p.read_bytes() == before and sorted(x.name for x in p.parent.iterdir()) == ["s.ply"]
    with pytest.raises(ValueError, match="NaN"):
        write_ply(tmp_path / "bad.ply", np.array([[0, np.nan, 0]]))


def test_oblique_projection_by_hand():
    pts = np.array([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])  # mean 0
    xy, depth = _oblique(pts, azim_deg=0.0, elev_deg=0.0)  # camera on +x: right = +y, up = +z, depth = x
    assert np.allclose(xy, [[2, 3], [-2, -3]]) and np.allclose(depth, [1, -1])
    xy, depth = _oblique(pts, azim_deg=-90.0, elev_deg=90.0)  # from above: right = +x, up = +y, depth = z
    assert np.allclose(xy, [[1, 2], [-1, -2]], atol=1e-12) and np.allclose(depth, [3, -3])


def _room(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    xyz = rng.random((n, 3)) * [4.0, 3.0, 0.05]  # a floor
    obj = rng.random((300, 3)) * 0.5 + [1.0, 1.0, 0.0]  # a box on it
    return np.r_[xyz, obj].astype(np.float32), np.r_[np.zeros(n, bool), np.ones(300, bool)]


def _red_pixels(path) -> int:
    from matplotlib.image import imread

    img = (imread(str(path))[..., :3] * 255).round().astype(int)
    return int((np.abs(img - PALETTE[0].astype(int)).sum(-1) <= 30).sum())


def test_render_png_size_and_highlight(tmp_path):
    xyz, mask = _room()
    color = np.full((len(xyz), 3), 120, np.uint8)
    p = render_png(tmp_path / "a.png", xyz, color, mask, title="the box", boxes=np.array([[1.25, 1.25, 0.25, .5, .5, .5]]),
                   labels=["box"], size=(900, 450))
    assert png_size(p) == (900, 450)
    none = render_png(tmp_path / "b.png", xyz, color, np.zeros(len(xyz), bool), size=(900, 450))
    assert _red_pixels(p) > 200 and _red_pixels(none) == 0  # the mask (and only it) is painted red
    with pytest.raises(ValueError, match="mask"):
        render_png(tmp_path / "c.png", xyz, color, mask[:-1])
    assert not (tmp_path / "c.png").exists()


def _red_rows(path):
    """Red pixel counts in the upper and the lower half of a picture."""
    from matplotlib.image import imread

    img = (imread(str(path))[..., :3] * 255).round().astype(int)
    red = np.abs(img - PALETTE[0].astype(int)).sum(-1) <= 30
    h = img.shape[0] // 2
    return int(red[:h].sum()), int(red[h:].sum())


def test_ground_truth_row_below_the_prediction(tmp_path):
    xyz, mask = _room()
    color = np.full((len(xyz), 3), 120, np.uint8)
    nothing = np.zeros(len(xyz), bool)
    # prediction empty, truth the box: the picture doubles in height and only its lower row shows red
    p = render_png(tmp_path / "gt.png", xyz, color, nothing, gt_mask=mask, size=(900, 450))
    assert png_size(p) == (900, 900)
    top, bottom = _red_rows(p)
    assert top == 0 and bottom > 200
    # both: red in both rows; truth "no target" (empty [0, N]): the lower row has none
    top, bottom = _red_rows(render_png(tmp_path / "both.png", xyz, color, mask, gt_mask=mask, size=(900, 450)))
    assert top > 200 and bottom > 200
    top, bottom = _red_rows(render_png(tmp_path / "none.png", xyz, color, mask, gt_mask=np.zeros((0, len(xyz)), bool),
                                       size=(900, 450)))
    assert top > 200 and bottom == 0


def test_save_result_writes_both_files(tmp_path):
    from plyfile import PlyData

    xyz, mask = _room(500)
    scene = make_scene(xyz, np.full((len(xyz), 3), 90, np.uint8), scene_id="room")
    lo, hi = xyz[mask].min(0), xyz[mask].max(0)
    result = SegmentResult(text="The box!", point_mask=mask, object_masks=mask[None], objects=np.array([0]),
                           object_ids=np.array([-1]), scores=np.array([0.9], np.float32),
                           boxes=np.r_[(lo + hi) / 2, hi - lo][None], all_scores=np.array([0.9], np.float32),
                           decoder_mask=mask, answer="<OBJ000> [SEG]", identifiers=["<OBJ000>"],
                           source="identifiers", proposals=True)
    saved = save_result(scene, result, tmp_path, size=(640, 320))
    assert saved.ply.name == "room_the_box.ply" and saved.png.name == "room_the_box.png"
    assert png_size(saved.png) == (640, 320)
    v = PlyData.read(str(saved.ply))["vertex"]
    rgb = np.c_[v["red"], v["green"], v["blue"]]
    assert (rgb[mask] == PALETTE[0]).all() and not (rgb[~mask] == PALETTE[0]).all(1).any()


def test_slug():
    assert slug("The chair, by the WINDOW!") == "the_chair_by_the_window"
    assert slug("???") == "query"
