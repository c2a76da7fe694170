"""scene3d.data.augment: quarter turns of a scene with its rows' compass words, colour jitter, and the
referring dataset's ``rotate`` / ``color_jitter``. That every generated row stays TRUE on a turned real scan
is checked against the independent reference in tests/test_real_refer.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.synthetic import prepare_synthetic
from scene3d.data.augment import jitter_color, turn_compass, turn_points, turn_row
from scene3d.data.referring import ReferringDataset, read_jsonl


@pytest.mark.parametrize("text, one, two", [
    ("looking from the south side of the room towards the north, the bed",
     "looking from the east side of the room towards the west, the bed",
     "looking from the north side of the room towards the south, the bed"),
    ("Facing the North wall", "Facing the West wall", "Facing the South wall"),
    ("the northeast corner, eastwards", "the northwest corner, northwards", "the southwest corner, westwards"),
    ("with your back to the western wall", "with your back to the southern wall", "with your back to the eastern wall"),
    ("the chair closest to the northern door", "the chair closest to the western door",
     "the chair closest to the southern door"),
    ("the chair between the desk and the bed", "the chair between the desk and the bed",
     "the chair between the desk and the bed"),
    ("the easel and the southpaw's westward-facing Northrop", "the easel and the southpaw's southward-facing Northrop",
     "the easel and the southpaw's eastward-facing Northrop"),
])
def test_turn_compass(text, one, two):
    assert turn_compass(text, 1) == one and turn_compass(text, 2) == two
    assert turn_compass(text, 4) == text == turn_compass(turn_compass(text, 1), 3)


def test_turn_points_is_a_quarter_turn_about_the_middle():
    g = torch.Generator().manual_seed(0)
    coord = torch.rand(200, 3, generator=g) * torch.tensor([4.0, 2.0, 1.0]) + torch.tensor([1.0, -3.0, 0.0])
    normal = torch.nn.functional.normalize(torch.randn(200, 3, generator=g), dim=1)
    pts = {"coord": coord, "normal": normal, "color": torch.rand(200, 3, generator=g)}
    one = turn_points(pts, 1)
    mid = (coord[:, :2].amin(0) + coord[:, :2].amax(0)) / 2
    rel = coord[:, :2] - mid
    # counter-clockwise seen from above: +x goes to +y, +y to -x; z, colours and the middle stay
    assert torch.allclose(one["coord"][:, :2] - mid, torch.stack([-rel[:, 1], rel[:, 0]], 1), atol=1e-6)
    assert one["coord"][:, 2].equal(coord[:, 2]) and one["color"] is pts["color"]
    assert torch.allclose((one["coord"][:, :2].amin(0) + one["coord"][:, :2].amax(0)) / 2, mid, atol=1e-6)
    assert torch.allclose(one["normal"][:, :2], torch.stack([-normal[:, 1], normal[:, 0]], 1))
    # the compass agrees: a point east of the middle ends north of it, as "east" turns to "north"
    east = int(rel[:, 0].argmax())
    assert one["coord"][east, 1] - mid[1] == pytest.approx(float(rel[east, 0]), abs=1e-6)
    assert turn_compass("east", 1) == "north"
    four = pts
    for _ in range(4):
        four = turn_points(four, 1)
    assert torch.allclose(four["coord"], coord, atol=1e-5) and turn_points(pts, 0) is pts


def test_turn_row_copies():
    row = {"text": "facing the north wall, the chair left of the desk", "program": {"op": "left", "view": "north"}}
    out = turn_row(row, 3)
    assert out["text"] == "facing the east wall, the chair left of the desk" and out["program"]["view"] == "east"
    assert row["program"]["view"] == "north" and row["text"].startswith("facing the north")


def test_jitter_color_stays_in_range():
    rng = np.random.default_rng(0)
    c = torch.rand(500, 3)
    out = jitter_color(c, 0.3, rng)
    assert out.min() >= 0 and out.max() <= 1 and not out.equal(c)
    assert jitter_color(c, 0.0, rng) is c


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("augbench"), num_scenes=3, seed=1, progress=False)


def test_dataset_turns_points_and_rows_together(bench):
    """Each item: one of the four turns, the same for its points and its rows; the subsample and the other
    augmentations are those of the unturned dataset (own random stream); deterministic per (seed, epoch)."""
    rows = read_jsonl(bench.train)
    plain = ReferringDataset(bench.processed, None, rows=rows, max_points=400, jitter=0.01, seed=3,
                             questions_per_scene=8)
    turned = ReferringDataset(bench.processed, None, rows=rows, max_points=400, jitter=0.01, seed=3,
                              questions_per_scene=8, rotate=True)
    seen, text_changed = set(), 0
    for epoch in range(4):
        plain.set_epoch(epoch)
        turned.set_epoch(epoch)
        for i in range(len(turned)):
            a, b = plain[i], turned[i]
            ks = [k for k in range(4) if torch.allclose(turn_points(a["points"], k)["coord"], b["points"]["coord"],
                                                       atol=1e-5)]
            assert len(ks) == 1, ks
            seen.add(ks[0])
            assert [turn_row(r, ks[0]) for r in a["samples"]] == b["samples"] and b["sample"] == b["samples"][0]
            assert b["points"]["color"].equal(a["points"]["color"])
            assert b["points"]["instance"].equal(a["points"]["instance"])
            text_changed += sum(x["text"] != y["text"] for x, y in zip(a["samples"], b["samples"]))
    assert seen == {0, 1, 2, 3} and text_changed > 0
    assert turned[0]["points"]["coord"].equal(turned[0]["points"]["coord"])


def test_dataset_color_jitter_and_errors(bench):
    ds = ReferringDataset(bench.processed, bench.train, color_jitter=0.2)
    plain = ReferringDataset(bench.processed, bench.train)
    a, b = plain[0]["points"], ds[0]["points"]
    assert b["coord"].equal(a["coord"]) and not b["color"].equal(a["color"])
    assert b["color"].min() >= 0 and b["color"].max() <= 1
    with pytest.raises(ValueError, match="color_jitter"):
        ReferringDataset(bench.processed, bench.train, color_jitter=1.5)


def test_dataset_point_dropout_drops_points_but_no_object(bench):
    """``point_dropout``: each item keeps a random share of its points (drawn per item and epoch, its own
    stream), every object keeps at least min(8, its size) points, and the rows and turns are those without it."""
    from scene3d.data.referring import MIN_OBJECT_POINTS

    rows = read_jsonl(bench.train)
    kw = dict(rows=rows, seed=3, questions_per_scene=8)
    plain = ReferringDataset(bench.processed, None, **kw)
    dropped = ReferringDataset(bench.processed, None, point_dropout=0.9, **kw)
    shares = []
    for i in range(len(dropped)):
        a, b = plain[i], dropped[i]
        assert b["samples"] == a["samples"]
        inst_a, inst_b = a["points"]["instance"], b["points"]["instance"]
        shares.append(len(inst_b) / len(inst_a))
        ids, sizes = torch.unique(inst_a[inst_a >= 0], return_counts=True)
        for oid, size in zip(ids.tolist(), sizes.tolist()):
            assert int((inst_b == oid).sum()) >= min(MIN_OBJECT_POINTS, size), (i, oid)
        # the kept points are points of the item without dropout, with their colours and instances
        rows_a = {tuple(p) for p in torch.cat([a["points"]["coord"], a["points"]["color"],
                                                inst_a[:, None].float()], 1).tolist()}
        rows_b = torch.cat([b["points"]["coord"], b["points"]["color"], inst_b[:, None].float()], 1).tolist()
        assert all(tuple(p) in rows_a for p in rows_b)
    assert min(shares) < 0.9 and max(shares) <= 1.0 and len(set(shares)) == len(shares)
    # with turns: the same turn is drawn for each item as without dropout
    turned = ReferringDataset(bench.processed, None, rotate=True, **kw)
    both = ReferringDataset(bench.processed, None, rotate=True, point_dropout=0.9, **kw)
    assert all(turned[i]["samples"] == both[i]["samples"] for i in range(len(both)))
    with pytest.raises(ValueError, match="point_dropout"):
        ReferringDataset(bench.processed, bench.train, point_dropout=1.0)
