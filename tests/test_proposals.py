from __future__ import annotations

import pytest
import torch

from scene3d.structures.points import PointBatch
from scene3d.tokenizer.proposals import (
    ProposalConfig,
    ProposalHead,
    cluster_proposals,
    instance_centers,
    offset_loss,
    proposal_recall,
)


def synthetic_scene(seed: int, n_obj: int = 4, per_obj: int = 300, with_superpoints: bool = True):
    """Objects as noisy boxes on a row, 0.3 m apart; superpoints = 4 spatial quadrants of each object."""
    g = torch.Generator().manual_seed(seed)
    coords, inst, sp = [], [], []
    for k in range(n_obj):
        half = 0.2 + 0.3 * torch.rand(3, generator=g)
        c = torch.tensor([k * 1.6, 0.0, 0.5]) + 0.1 * torch.rand(3, generator=g)
        p = c + (torch.rand(per_obj, 3, generator=g) * 2 - 1) * half
        coords.append(p)
        inst.append(torch.full((per_obj,), 10 + k))
        sp.append(k * 4 + 2 * (p[:, 0] > c[0]).long() + (p[:, 1] > c[1]).long())
    out = {"coord": torch.cat(coords), "instance": torch.cat(inst)}
    if with_superpoints:
        out["superpoint"] = torch.cat(sp)
    return out


@pytest.mark.parametrize("with_superpoints", [True, False])
def test_perfect_offsets_give_full_recall(with_superpoints):
    pts = PointBatch.from_list([synthetic_scene(0, 4, with_superpoints=with_superpoints),
                                synthetic_scene(1, 3, with_superpoints=with_superpoints)])
    offset = instance_centers(pts.coord, pts.instance, pts.batch) - pts.coord
    prop = cluster_proposals(pts, offset, ProposalConfig(radius=0.1, min_points=20))
    assert prop.shape == (pts.num_points,) and (prop >= 0).all()
    r = proposal_recall(prop, pts.instance, batch=pts.batch)
    assert r.num_gt == 7 and r.recall == (1.0, 1.0)
    torch.testing.assert_close(r.best_iou, torch.ones(7, dtype=torch.float64))
    # a radius wider than the gaps between objects merges them: recall@0.5 drops (the radius is used)
    merged = cluster_proposals(pts, offset, ProposalConfig(radius=5.0, min_points=20))
    assert proposal_recall(merged, pts.instance, batch=pts.batch).recall[1] < 1.0


def test_recall_by_hand():
    pred = torch.tensor([0, 0, 1, 1, -1])
    gt = torch.tensor([0, 0, 0, 1, 1])
    r = proposal_recall(pred, gt)
    torch.testing.assert_close(r.best_iou, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert r.recall == (1.0, 0.5)
    # same ids in two scenes are different instances
    r2 = proposal_recall(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]), batch=torch.tensor([0, 0, 1, 1]))
    assert r2.num_gt == 2 and r2.recall == (1.0, 1.0)
    assert proposal_recall(torch.full((5,), -1), gt).recall == (0.0, 0.0)
    with pytest.raises(ValueError):
        proposal_recall(pred[:3], gt)
    with pytest.raises(ValueError, match="no instance"):
        proposal_recall(pred, torch.full((5,), -1))


def test_offset_loss_decreases_with_training():
    torch.manual_seed(0)
    pts = PointBatch.from_list([synthetic_scene(2, 3, per_obj=100)])
    feat = torch.cat([pts.coord, torch.randn(pts.num_points, 5)], 1)
    head = ProposalHead(8, ProposalConfig(hidden=32))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = offset_loss(head(feat), pts)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(float(loss.total))
    assert losses[-1] < 0.7 * losses[0]
    # the target itself scores zero L1 and zero direction loss
    target = instance_centers(pts.coord, pts.instance, pts.batch) - pts.coord
    perfect = offset_loss(target, pts)
    assert float(perfect.l1) == 0.0 and float(perfect.direction) < 1e-5


def test_errors():
    pts = PointBatch.from_list([synthetic_scene(3, 2, per_obj=10)])
    with pytest.raises(ValueError):
        cluster_proposals(pts, torch.zeros(3, 3))
    bad = torch.zeros(pts.num_points, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cluster_proposals(pts, bad)
    with pytest.raises(ValueError, match="instance"):
        offset_loss(torch.zeros(pts.num_points, 3), pts.replace(instance=None))


def test_oversized_proposals_names_the_rows_that_swallow_the_scene():
    from scene3d.tokenizer.proposals import oversized_proposals

    # scene0000_01 with an out-of-domain head: one proposal of 77k of 80k points (issue 16)
    p2o = torch.cat([torch.zeros(770, dtype=torch.long), torch.ones(20, dtype=torch.long),
                     torch.full((10,), -1)])
    assert oversized_proposals(p2o, 2).tolist() == [0]
    assert oversized_proposals(p2o, 2, fraction=0.99).tolist() == []
    # unassigned points count in the scene's total: 45 of 100 is not most of it
    half = torch.cat([torch.zeros(45, dtype=torch.long), torch.full((55,), -1)])
    assert oversized_proposals(half, 1).tolist() == []
    # weights (points per representative of a downsampled scene) decide, not row counts
    rows = torch.tensor([0, 1, 1, 1])
    assert oversized_proposals(rows, 2, weight=torch.tensor([10.0, 1.0, 1.0, 1.0])).tolist() == [0]
    assert oversized_proposals(rows, 2).tolist() == [1]
    with pytest.raises(ValueError, match="fraction"):
        oversized_proposals(rows, 2, fraction=1.5)


def test_min_points_counts_point_weights():
    """A downsampled scene's representatives stand for many input points: min_points counts those."""
    pts = PointBatch.from_list([synthetic_scene(0, 3, per_obj=12, with_superpoints=False)])
    offset = instance_centers(pts.coord, pts.instance, pts.batch) - pts.coord
    cfg = ProposalConfig(radius=0.1, min_points=50)
    assert (cluster_proposals(pts, offset, cfg) == -1).all()  # 12 rows per object < 50
    heavy = pts.replace(weight=torch.full((pts.num_points,), 10.0))  # ... but each row is 10 input points
    prop = cluster_proposals(heavy, offset, cfg)
    assert (prop >= 0).all() and proposal_recall(prop, pts.instance).recall == (1.0, 1.0)
