from __future__ import annotations

import pytest
import torch

from scene3d.structures.points import PointBatch
from scene3d.tokenizer.pooling import STATS_DIM, pool_objects, pooled_parts, token_dim


def make_batch():
    g = torch.Generator().manual_seed(0)
    scenes = []
    for n, ids in ((30, [5, 2, -1]), (20, [7]), (6, [-1])):  # third scene: no object at all
        coord = torch.rand(n, 3, generator=g) * 4
        color = torch.rand(n, 3, generator=g)
        inst = torch.tensor(ids)[torch.randint(len(ids), (n,), generator=g)]
        scenes.append({"coord": coord, "color": color, "instance": inst})
    return PointBatch.from_list(scenes)


def test_pool_matches_naive_loop():
    pts = make_batch()
    feat = torch.randn(pts.num_points, 4, requires_grad=True)
    tok = pool_objects(feat, pts, pts.instance)
    assert tok.feat.shape == (tok.num_objects, token_dim(4)) == (3, 8 + STATS_DIM)
    assert tok.obj_counts.tolist() == [2, 1, 0]
    assert tok.object_ids.tolist() == [2, 5, 7]  # sorted by scene, then id
    batch = pts.batch
    parts = pooled_parts(tok, 4)
    for m, (b, oid) in enumerate([(0, 2), (0, 5), (1, 7)]):
        sel = (batch == b) & (pts.instance == oid)
        assert torch.equal(tok.point_mask(m), sel)  # walk back to points
        c = pts.coord[sel]
        torch.testing.assert_close(parts["mean"][m], feat[sel].mean(0))
        torch.testing.assert_close(parts["max"][m], feat[sel].max(0).values)
        torch.testing.assert_close(tok.center[m], (c.min(0).values + c.max(0).values) / 2)
        torch.testing.assert_close(tok.size[m], c.max(0).values - c.min(0).values)
        s = parts["stats"][m]
        torch.testing.assert_close(s[:3], tok.center[m] - pts.coord[batch == b].mean(0))
        torch.testing.assert_close(s[6:9], pts.color[sel].mean(0))
        torch.testing.assert_close(s[9:12], pts.color[sel].std(0, unbiased=False), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s[12], torch.log1p(torch.tensor(float(sel.sum()))))
    assert (tok.point2obj[pts.instance < 0] == -1).all()
    tok.feat[:, :8].sum().backward()
    assert feat.grad[pts.instance >= 0].abs().sum() > 0
    assert (feat.grad[pts.instance < 0] == 0).all()


def test_pool_without_color_and_errors():
    pts = make_batch().replace(color=None)
    tok = pool_objects(torch.zeros(pts.num_points, 2), pts, pts.instance)
    assert (tok.feat[:, 4 + 6 : 4 + 12] == 0).all()
    with pytest.raises(ValueError, match="point_feat"):
        pool_objects(torch.zeros(3, 2), pts, pts.instance)
    with pytest.raises(ValueError, match="point_obj"):
        pool_objects(torch.zeros(pts.num_points, 2), pts, pts.instance[:-1])


def test_no_objects_at_all():
    pts = make_batch()
    tok = pool_objects(torch.zeros(pts.num_points, 2), pts, torch.full((pts.num_points,), -1))
    assert tok.num_objects == 0 and tok.obj_counts.tolist() == [0, 0, 0]
    assert (tok.point2obj == -1).all()
