"""scene3d.data.downsample: one representative per (voxel, instance), the inverse map, the max_points cap."""

from __future__ import annotations

import numpy as np
import pytest

from scene3d.data.downsample import voxel_downsample


def _cloud(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    coord = rng.random((n, 3)).astype(np.float32) * np.array([2.0, 1.0, 0.5], np.float32)
    instance = np.where(coord[:, 0] < 1.0, 0, 1).astype(np.int64)
    instance[coord[:, 2] < 0.1] = -1
    color = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    normal = np.tile(np.array([[0, 0, 1]], np.float32), (n, 1))
    return coord, color, normal, instance


def _naive_groups(coord, voxel, instance):
    """Reference: a dict from (voxel cell, instance) to the point rows, by a loop."""
    origin = coord.min(0)
    groups = {}
    for i, p in enumerate(coord):
        cell = tuple(np.floor((p.astype(np.float64) - origin) / voxel).astype(int))
        groups.setdefault((cell, int(instance[i])), []).append(i)
    return groups


def test_representatives_match_a_naive_grouping():
    coord, color, normal, instance = _cloud(1500)
    d = voxel_downsample(coord, 0.1, color=color, normal=normal, instance=instance)
    groups = _naive_groups(coord, 0.1, instance)
    assert d.num_points == len(groups) and d.num_input_points == 1500 and not d.coarsened
    for rows in groups.values():
        rows = np.array(rows)
        (r,) = np.unique(d.inverse[rows])  # every point of a group maps to one representative ...
        assert d.counts[r] == len(rows)  # ... that holds exactly those points
        assert np.allclose(d.coord[r], coord[rows].mean(0), atol=1e-5)
        assert np.abs(d.color[r].astype(float) - color[rows].mean(0)).max() <= 0.5 + 1e-9
        assert d.instance[r] == instance[rows[0]]
    assert np.allclose(np.linalg.norm(d.normal, axis=1), 1.0)


def test_instance_masks_map_back_exactly():
    coord, _, _, instance = _cloud()
    d = voxel_downsample(coord, 0.25, instance=instance)
    for oid in (-1, 0, 1):
        assert np.array_equal((d.instance == oid)[d.inverse], instance == oid)


def test_max_points_grows_the_voxel_until_it_fits():
    coord, _, _, _ = _cloud(20000)
    fine = voxel_downsample(coord, 0.02)
    assert fine.num_points > 1000
    d = voxel_downsample(coord, 0.02, max_points=1000)
    assert d.num_points <= 1000 and d.coarsened and d.voxel_size > 0.02 and d.model_voxel == 0.02
    assert d.inverse.shape == (20000,) and d.inverse.max() == d.num_points - 1 and d.counts.sum() == 20000
    # a cap that is already met keeps the model's voxel
    same = voxel_downsample(coord, 0.02, max_points=fine.num_points)
    assert same.voxel_size == 0.02 and not same.coarsened and same.num_points == fine.num_points


def test_bad_input():
    with pytest.raises(ValueError, match="voxel_size"):
        voxel_downsample(np.zeros((3, 3)), 0.0)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        voxel_downsample(np.zeros((0, 3)), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        voxel_downsample(np.array([[0, 0, np.nan]]), 0.1)
    with pytest.raises(ValueError, match="instance has 2 rows"):
        voxel_downsample(np.zeros((3, 3)), 0.1, instance=np.zeros(2, int))
    with pytest.raises(ValueError, match="max_points"):
        voxel_downsample(np.zeros((3, 3)), 0.1, max_points=0)
