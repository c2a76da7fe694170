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


def test_descriptors_are_kept_by_turns_moves_and_density():
    """The descriptors of an object do not change when its scan is turned a quarter turn, moved, or sampled at
    half the density; they are its extents (larger first), height, and bottom / top above the scene's floor."""
    from scene3d.data.augment import turn_points
    from scene3d.tokenizer.pooling import DESCRIPTOR_DIM, object_descriptors, pool_objects

    s = scene(7, 3)
    s["coord"][:, 0] *= 2.0  # objects longer in x than in y
    floor = {"coord": torch.tensor([[x, y, 0.0] for x in torch.linspace(-1, 3, 21) for y in torch.linspace(-1, 2, 16)]),
             "color": torch.zeros(336, 3), "instance": torch.full((336,), -1)}
    s = {k: torch.cat([s[k], floor[k]]) for k in s}

    def desc(d):
        pts = PointBatch.from_list([d])
        pooled = pool_objects(torch.zeros(pts.num_points, 4), pts, pts.instance)
        return object_descriptors(pts, pooled)

    ref = desc(s)
    assert ref.shape == (3, DESCRIPTOR_DIM)
    m = s["instance"] == 1
    c = s["coord"][m]
    ext = c.max(0).values - c.min(0).values
    torch.testing.assert_close(ref[0, :3], torch.log(ext + 0.01))  # x (doubled) is the larger extent
    torch.testing.assert_close(ref[0, 3:], torch.stack([c[:, 2].min(), c[:, 2].max()]))  # the floor lies at z = 0
    turned = turn_points(s, 1)
    moved = dict(s, coord=s["coord"] + torch.tensor([5.0, -3.0, 1.5]))
    half = {k: v[::2] for k, v in s.items()}
    torch.testing.assert_close(desc(turned), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(desc(moved), ref, atol=1e-5, rtol=1e-5)
    # the same surfaces at half the density: the boxes barely change (the point counts halve)
    torch.testing.assert_close(desc(half), ref, atol=0.1, rtol=0.0)
    assert not torch.allclose(desc(dict(s, coord=s["coord"] * torch.tensor([1.0, 1.0, 2.0]))), ref)


def test_descriptors_and_learned_dropout_in_the_tokenizer():
    """``descriptors`` widens the projection's input by the descriptors; ``learned_dropout`` zeroes whole
    objects' learned features in training only (tokens then still differ by their statistics), never at
    evaluation; a probability of 1 or more is refused."""
    torch.manual_seed(8)
    cfg = small_cfg(geometry=True)
    cfg.descriptors, cfg.learned_dropout = True, 0.5
    model = ObjectTokenizer(cfg)
    base = ObjectTokenizer(small_cfg(geometry=True))
    assert model.project[0].in_features == base.project[0].in_features + 5
    pts = PointBatch.from_list([scene(9, 4)])
    model.eval()
    with torch.no_grad():
        a, b = model(pts, objects=pts.instance).tokens.feat, model(pts, objects=pts.instance).tokens.feat
    torch.testing.assert_close(a, b)  # evaluation: no dropout, deterministic
    model.train()
    seen = set()
    captured = {}
    hook = model.project.register_forward_hook(lambda mod, inp, out: captured.__setitem__("x", inp[0].detach()))
    for _ in range(8):
        model(pts)
        c = model.backbone.out_channels
        learned_zero = (captured["x"][:, : 2 * c] == 0).all(1)
        stats_kept = (captured["x"][:, 2 * c : 2 * c + 13] != 0).any(1)
        assert stats_kept.all()
        seen.update(learned_zero.tolist())
    hook.remove()
    assert seen == {True, False}  # some objects lost their learned features, others kept them
    with pytest.raises(ValueError, match="learned_dropout"):
        ObjectTokenizerConfig(learned_dropout=1.0)
