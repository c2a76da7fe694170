from __future__ import annotations

import pytest
import torch

from scene3d.structures.points import PointBatch
from scene3d.tokenizer.backbone import BackboneConfig
from scene3d.tokenizer.model import ObjectTokenizer, ObjectTokenizerConfig
from scene3d.tokenizer.proposals import ProposalConfig
from scene3d.tokenizer.relation import RelationConfig


def scene(seed, n_obj):
    g = torch.Generator().manual_seed(seed)
    coords, inst = [], []
    for k in range(n_obj):
        c = torch.tensor([k * 0.8, 0.2 * k, 0.3])
        coords.append(c + torch.rand(120, 3, generator=g) * 0.4)
        inst.append(torch.full((120,), 3 * k + 1))
    coord = torch.cat(coords)
    inst = torch.cat(inst)
    inst[:10] = -1  # some unannotated points
    return {"coord": coord, "color": torch.rand(len(coord), 3, generator=g), "instance": inst}


def small_cfg(geometry: bool) -> ObjectTokenizerConfig:
    return ObjectTokenizerConfig(
        voxel_size=0.05, out_dim=32, backbone=BackboneConfig(in_channels=6, channels=(8, 16)),
        relation=RelationConfig(dim=32, heads=2), proposal=ProposalConfig(min_points=20, radius=0.1),
        use_geometry=geometry, geometry_dim=16, geometry_voxel_size=0.05,
    )


def test_training_forward_uses_gt_and_walks_back():
    torch.manual_seed(0)
    pts = PointBatch.from_list([scene(0, 3), scene(1, 2)])
    model = ObjectTokenizer(small_cfg(geometry=False)).train()
    out = model(pts)
    tok = out.tokens
    assert tok.feat.shape == (5, 32) and tok.obj_counts.tolist() == [3, 2]
    assert tok.object_ids.tolist() == [1, 4, 7, 1, 4]
    for m in range(5):
        b = int(tok.obj_batch[m])
        sel = (pts.batch == b) & (pts.instance == tok.object_ids[m])
        assert torch.equal(tok.point_mask(m), sel)
        c = pts.coord[sel]
        torch.testing.assert_close(tok.center[m], (c.min(0).values + c.max(0).values) / 2)
    assert out.point_feat.shape == (pts.num_points, 8)
    losses = model.losses(pts, out)
    (losses.total + tok.feat.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_scene_results_do_not_depend_on_batch_mates():
    torch.manual_seed(1)
    model = ObjectTokenizer(small_cfg(geometry=False)).eval()
    a, b = scene(2, 2), scene(3, 3)
    both = model(PointBatch.from_list([a, b]), objects=torch.cat([a["instance"], b["instance"]]))
    alone = model(PointBatch.from_list([a]), objects=a["instance"])
    torch.testing.assert_close(both.tokens.feat[:2], alone.tokens.feat, atol=1e-4, rtol=1e-4)


def test_inference_uses_proposals():
    torch.manual_seed(2)
    model = ObjectTokenizer(small_cfg(geometry=False)).eval()
    pts = PointBatch.from_list([scene(4, 3)])
    with torch.no_grad():
        out = model(pts)
    assert (out.tokens.object_ids == -1).all()
    expected = int(out.point_obj.max()) + 1 if (out.point_obj >= 0).any() else 0
    assert out.tokens.num_objects == expected
    with pytest.raises(ValueError, match="instance"):
        model.train()(pts.replace(instance=None))
    with pytest.raises(ValueError, match="objects"):
        model(pts, objects=torch.zeros(3, dtype=torch.long))


def test_with_octree_geometry():
    torch.manual_seed(3)
    model = ObjectTokenizer(small_cfg(geometry=True)).train()
    pts = PointBatch.from_list([scene(5, 2), scene(6, 1)])
    out = model(pts)
    assert out.tokens.feat.shape == (3, 32)
    out.tokens.feat.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.geometry.parameters())


def test_config_validation():
    with pytest.raises(ValueError, match="relation.dim"):
        ObjectTokenizerConfig(out_dim=64, relation=RelationConfig(dim=32, heads=2))
    with pytest.raises(ValueError, match="in_channels"):
        ObjectTokenizerConfig(backbone=BackboneConfig(in_channels=3))


@pytest.mark.parametrize("point_xy", [True, False])
def test_point_xy_off_hides_where_in_the_room_a_point_lies(point_xy):
    """A copy of the scene 40 m away along x moves the scene mean 20 m in x and leaves its z: with
    ``point_xy`` off, the original points' backbone features stay as they were (the copy lies outside
    every receptive field); with it on, they change, as their x relative to the mean does."""
    torch.manual_seed(4)
    cfg = small_cfg(geometry=False)
    cfg.point_xy = point_xy
    model = ObjectTokenizer(cfg).eval()
    a = scene(5, 3)
    # on the 5 cm voxel grid's centres, so that the shifted copy voxelizes exactly alike
    a["coord"] = (torch.floor(a["coord"] / 0.05) + 0.5) * 0.05
    far = {"coord": a["coord"] + torch.tensor([40.0, 0.0, 0.0]), "color": a["color"],
           "instance": torch.where(a["instance"] >= 0, a["instance"] + 100, a["instance"])}
    both = {k: torch.cat([a[k], far[k]]) for k in a}
    with torch.no_grad():
        alone_feat, _ = model.point_features(PointBatch.from_list([a]))
        both_feat, _ = model.point_features(PointBatch.from_list([both]))
    n = len(a["coord"])
    same = torch.allclose(both_feat[:n], alone_feat, atol=1e-5, rtol=1e-4)
    assert same != point_xy
