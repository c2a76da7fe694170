"""Ragged point batches and object tokens."""

from __future__ import annotations

import pytest
import torch

from scene3d.structures import (
    ObjectTokens, PointBatch, batch_from_offset, counts_from_offset, offset_from_batch, offset_from_counts,
)


def _scene(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"coord": torch.rand(n, 3, generator=g), "color": torch.rand(n, 3, generator=g),
            "instance": torch.randint(-1, 4, (n,), generator=g)}


def test_offset_conversions_roundtrip():
    counts = torch.tensor([3, 0, 2, 5])
    offset = offset_from_counts(counts)
    assert offset.tolist() == [3, 3, 5, 10]
    assert counts_from_offset(offset).tolist() == counts.tolist()
    batch = batch_from_offset(offset)
    assert batch.tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3, 3]
    assert offset_from_batch(batch, batch_size=4).tolist() == offset.tolist()


@pytest.mark.parametrize("offset, msg", [
    (torch.tensor([3, 2]), "non-decreasing"),
    (torch.tensor([[3]]), "1-D"),
    (torch.tensor([1.0]), "integer"),
])
def test_bad_offsets(offset, msg):
    with pytest.raises(ValueError, match=msg):
        counts_from_offset(offset)


def test_offset_from_unsorted_batch_rejected():
    with pytest.raises(ValueError, match="sorted"):
        offset_from_batch(torch.tensor([0, 1, 0]))


def test_collate_split_roundtrip():
    scenes = [_scene(5, 0), _scene(0, 1), _scene(7, 2)]
    pb = PointBatch.from_list(scenes, scene_ids=["a", "b", "c"])
    assert pb.batch_size == 3 and pb.num_points == 12
    assert pb.offset.tolist() == [5, 5, 12]
    assert pb.batch.tolist() == [0] * 5 + [2] * 7
    back = pb.split()
    for orig, item, sid in zip(scenes, back, "abc"):
        assert item["scene_id"] == sid
        for k in orig:
            assert torch.equal(orig[k], item[k])
    one = pb.scene(2)
    assert one.batch_size == 1 and one.scene_ids == ["c"] and torch.equal(one.coord, scenes[2]["coord"])


def test_validation_messages():
    with pytest.raises(ValueError, match="coord must be"):
        PointBatch(coord=torch.zeros(4, 2), offset=torch.tensor([4]))
    with pytest.raises(ValueError, match="offset\\[-1\\]"):
        PointBatch(coord=torch.zeros(4, 3), offset=torch.tensor([3]))
    with pytest.raises(ValueError, match="color has 3 rows"):
        PointBatch(coord=torch.zeros(4, 3), offset=torch.tensor([4]), color=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="fields"):
        PointBatch.from_list([{"coord": torch.zeros(2, 3)}, {"coord": torch.zeros(2, 3), "color": torch.zeros(2, 3)}])
    with pytest.raises(ValueError, match="empty list"):
        PointBatch.from_list([])


def test_replace_is_a_copy_and_to_moves_everything():
    pb = PointBatch.from_list([_scene(4, 0)])
    pb2 = pb.replace(coord=pb.coord * 2)
    assert torch.equal(pb2.coord, pb.coord * 2) and not torch.equal(pb2.coord, pb.coord)
    moved = pb.to("cpu")
    assert moved.offset.device.type == "cpu" and torch.equal(moved.color, pb.color)


def test_object_tokens_walk_back_to_points():
    point2obj = torch.tensor([0, 0, 1, -1, 2, 2, 2])
    tok = ObjectTokens(feat=torch.randn(3, 8), center=torch.zeros(3, 3), size=torch.ones(3, 3),
                       obj_offset=torch.tensor([2, 3]), point2obj=point2obj)
    assert tok.obj_batch.tolist() == [0, 0, 1]
    assert tok.point_mask(2).nonzero().flatten().tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="point2obj"):
        tok.replace(point2obj=torch.tensor([3]))
    with pytest.raises(ValueError, match="obj_offset"):
        tok.replace(obj_offset=torch.tensor([1, 2]))
