"""GeometryEncoder: shapes, empty objects, gradients, object permutation, batching, bad configs."""

from __future__ import annotations

import pytest
import torch

from scene3d.tokenizer.geometry import GeometryEncoder, GeometryEncoderConfig
from scene3d.tokenizer.octree import encode_objects, encode_points


def random_objects(seed: int, m: int = 6, empty=(1, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    depth = torch.randint(0, 6, (m,), generator=g)
    coords, obj = [], []
    for i in range(m):
        if i in empty:
            continue
        n = int(torch.randint(1, 40, (1,), generator=g))
        coords.append(torch.randint(0, 2 ** int(depth[i]), (n, 3), generator=g))
        obj.append(torch.full((n,), i))
    return torch.cat(coords), torch.cat(obj), depth


def make(k=2, pool="attention", out_dim=16):
    torch.manual_seed(0)
    return GeometryEncoder(GeometryEncoderConfig(out_dim=out_dim, hidden_dim=24, levels_per_token=k, pool=pool))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("pool", ["attention", "meanmax"])
def test_shapes_and_empty_objects(k, pool):
    enc = make(k, pool)
    vc, obj, depth = random_objects(0)
    code = encode_objects(vc, obj, depth, num_objects=6, levels_per_token=k)  # objects 1, 4, 5 are empty
    out = enc(code)
    assert out.shape == (6, 16) and torch.isfinite(out).all()
    for m in (1, 4, 5):
        assert torch.equal(out[m], enc.empty.detach())
    assert not torch.allclose(out[0], out[2])  # different geometry, different vectors


def test_all_empty_and_no_objects():
    enc = make()
    code = encode_objects(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3,
                          num_objects=3, levels_per_token=2)
    out = enc(code)
    assert out.shape == (3, 16) and torch.equal(out, enc.empty.detach().expand(3, -1))
    none = encode_objects(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3,
                          num_objects=0, levels_per_token=2)
    assert enc(none).shape == (0, 16)


def test_gradients_reach_every_parameter():
    enc = make(k=2)
    vc, obj, depth = random_objects(3)
    code = encode_objects(vc, obj, depth, num_objects=6, levels_per_token=2)
    assert code.counts.max() > 1  # attention weights only get gradients when an object has several tokens
    enc(code).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_object_permutation_permutes_outputs():
    enc = make(k=2).eval()
    vc, obj, depth = random_objects(2)
    code = encode_objects(vc, obj, depth, num_objects=6, levels_per_token=2)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])  # new object i is old object perm[i]
    inv = torch.argsort(perm)
    code_p = encode_objects(vc, inv[obj], depth[perm], num_objects=6, levels_per_token=2)
    with torch.no_grad():
        assert torch.allclose(enc(code_p), enc(code)[perm], atol=1e-5)


def test_batched_equals_one_object_at_a_time():
    enc = make(k=3).eval()
    vc, obj, depth = random_objects(3)
    code = encode_objects(vc, obj, depth, num_objects=6, levels_per_token=3)
    with torch.no_grad():
        batched = enc(code)
        alone = torch.cat([enc(code.object(m)) for m in range(6)])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_real_size_points_and_bad_inputs():
    g = torch.Generator().manual_seed(4)
    pts = torch.rand(4000, 3, generator=g) * 2
    inst = torch.randint(0, 20, (4000,), generator=g)
    code = encode_points(pts, inst, 0.02, num_objects=20, levels_per_token=3)
    out = make(k=3)(code)
    assert out.shape == (20, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="levels_per_token=3"):
        make(k=2)(code)
    with pytest.raises(ValueError, match="pool"):
        GeometryEncoderConfig(pool="sum")
