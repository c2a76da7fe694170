from __future__ import annotations

import math

import pytest
import torch

from scene3d.tokenizer.relation import PAIR_DIM, RelationConfig, RelationContext, pair_encoding

D = 16


@pytest.fixture
def net():
    torch.manual_seed(0)
    return RelationContext(RelationConfig(dim=D, heads=2, layers=2, pair_hidden=8)).eval()


def scene(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.rand(n, 3, generator=g) * 5, torch.rand(n, 3, generator=g) + 0.1


def ragged(*scenes):
    feat, center, size = (torch.cat([s[i] for s in scenes]) for i in range(3))
    offset = torch.cumsum(torch.tensor([len(s[0]) for s in scenes]), 0)
    return feat, center, size, offset


def test_pair_encoding_by_hand():
    c = torch.tensor([[0.0, 0, 0], [3.0, 4, 0]])
    s = torch.tensor([[1.0, 1, 1], [2.0, 1, 0.5]])
    p = pair_encoding(c, s, eps=0.0)
    assert p.shape == (2, 2, PAIR_DIM)
    assert p[0, 1, :3].tolist() == [3.0, 4.0, 0.0] and p[1, 0, :3].tolist() == [-3.0, -4.0, 0.0]
    assert p[0, 1, 3].item() == 5.0
    assert p[0, 1, 4:7].tolist() == [1.0, 1, 1] and p[0, 1, 7:10].tolist() == [2.0, 1, 0.5]
    torch.testing.assert_close(p[0, 1, 10:], torch.tensor([math.log(2), 0.0, math.log(0.5)]))
    assert (p[0, 0, :4] == 0).all()


def test_ragged_equals_per_scene_and_scenes_are_isolated(net):
    a, b = scene(4, 1), scene(6, 2)
    out = net(*ragged(a, b))
    torch.testing.assert_close(out[:4], net(*ragged(a)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[4:], net(*ragged(b)), atol=1e-5, rtol=1e-5)
    out2 = net(*ragged(a, scene(9, 3)))  # other scene changed, padding length changed
    torch.testing.assert_close(out2[:4], out[:4], atol=1e-5, rtol=1e-5)


def test_geometry_matters_and_is_translation_invariant(net):
    f, c, s = scene(5, 4)
    base = net(*ragged((f, c, s)))
    shifted = net(*ragged((f, c + torch.tensor([10.0, -3, 2]), s)))
    torch.testing.assert_close(base, shifted, atol=1e-5, rtol=1e-5)
    c2 = c.clone()
    c2[4] += 3.0  # move object 4: the others see it
    moved = net(*ragged((f, c2, s)))
    assert (moved[:4] - base[:4]).abs().max() > 1e-4


def test_permutation_equivariant(net):
    f, c, s = scene(7, 5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    out = net(*ragged((f, c, s)))
    outp = net(*ragged((f[perm], c[perm], s[perm])))
    torch.testing.assert_close(outp, out[perm], atol=1e-5, rtol=1e-5)


def test_empty_scene_gradients_finite(net):
    net.train()
    a, b = scene(3, 6), scene(5, 7)
    feat, center, size, _ = ragged(a, b)
    offset = torch.tensor([3, 3, 8])  # middle scene has no objects
    feat.requires_grad_(True)
    out = net(feat, center, size, offset)
    out.sum().backward()
    assert torch.isfinite(feat.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_errors(net):
    f, c, s = scene(3, 8)
    with pytest.raises(ValueError):
        net(f[:, :4], c, s, torch.tensor([3]))
    with pytest.raises(ValueError):
        net(f, c[:2], s, torch.tensor([3]))
    with pytest.raises(ValueError):
        net(f, c, s, torch.tensor([2]))
    with pytest.raises(ValueError):
        RelationConfig(dim=10, heads=4)
