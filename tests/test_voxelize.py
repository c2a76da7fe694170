from __future__ import annotations

import pytest
import torch

from scene3d.structures.points import PointBatch
from scene3d.tokenizer.voxelize import scatter_pool, voxelize


def batch():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 3, generator=g) * 0.3 + torch.tensor([5.0, -2.0, 1.0])
    b = torch.rand(150, 3, generator=g) * 0.2
    return PointBatch.from_list([{"coord": a}, {"coord": b}])


def test_voxels_against_python_sets():
    pts = batch()
    feat = torch.randn(pts.num_points, 2)
    vox = voxelize(pts, 0.05, feat=feat)
    # independent reference: a dict keyed by (scene, floor((p - scene min) / size))
    ref: dict = {}
    for i, (p, b) in enumerate(zip(pts.coord.tolist(), pts.batch.tolist())):
        lo = pts.coord[pts.batch == b].min(0).values.tolist()
        key = (b, *[int((p[d] - lo[d]) // 0.05) for d in range(3)])
        ref.setdefault(key, []).append(i)
    got = [tuple(r) for r in vox.indices.tolist()]
    assert sorted(ref) == got  # sorted by (scene, x, y, z), one row per occupied cell
    assert vox.indices.dtype == torch.int32 and vox.indices.is_contiguous()
    for row, key in enumerate(got):
        members = ref[key]
        assert sorted((vox.inverse == row).nonzero()[:, 0].tolist()) == members
        torch.testing.assert_close(vox.feat[row], feat[members].mean(0))
        assert int(vox.num_points[row]) == len(members)
    assert vox.voxel_offset.tolist() == [sum(k[0] == 0 for k in got), len(got)]
    assert vox.spatial_shape == tuple((vox.indices[:, 1:].max(0).values + 1).tolist())
    # centres lie within half a voxel of their points
    assert ((vox.centers()[vox.inverse] - pts.coord).abs() <= 0.025 + 1e-6).all()


def test_voxel_size_changes_count_and_reductions():
    pts = batch()
    assert voxelize(pts, 0.02).num_voxels > voxelize(pts, 0.1).num_voxels
    f = torch.arange(pts.num_points, dtype=torch.float32)[:, None]
    vox = voxelize(pts, 0.1, feat=f, reduce="amax")
    for row in range(vox.num_voxels):
        assert vox.feat[row, 0] == f[vox.inverse == row].max()


def test_scatter_pool_grad_and_empty_segments():
    src = torch.tensor([[1.0], [3.0], [5.0]], requires_grad=True)
    out = scatter_pool(src, torch.tensor([0, 0, 2]), 4, "mean")
    assert out[:, 0].tolist() == [2.0, 0.0, 5.0, 0.0]
    out.sum().backward()
    assert src.grad[:, 0].tolist() == [0.5, 0.5, 1.0]
    with pytest.raises(ValueError):
        scatter_pool(src, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError):
        scatter_pool(src, torch.tensor([0, 1, 1]), 2, "median")


def test_errors():
    pts = batch()
    with pytest.raises(ValueError, match="voxel_size"):
        voxelize(pts, 0.0)
    bad = pts.coord.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        voxelize(pts.replace(coord=bad), 0.02)
    with pytest.raises(ValueError, match="rows"):
        voxelize(pts, 0.02, feat=torch.zeros(5, 2))
    empty = PointBatch(coord=torch.zeros(0, 3), offset=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        voxelize(empty, 0.02)
