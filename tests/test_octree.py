"""Octree codec: hand-worked codes, a naive pure-Python reference, hypothesis round trips, limits, real scans."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from scene3d.tokenizer.octree import (
    OctreeCode,
    decode_objects,
    decode_points,
    encode_objects,
    encode_points,
    morton_decode,
    morton_encode,
    octree_stats,
    token_positions,
    voxelize_objects,
    voxelize_points,
)


# ----------------------------------------------------------------------------------------- naive reference
def ref_morton(x: int, y: int, z: int, depth: int) -> int:
    """Bit interleave, x fastest, written independently with Python ints."""
    key = 0
    for bit in range(depth):
        key += ((x >> bit) & 1) * 8**bit + ((y >> bit) & 1) * 2 * 8**bit + ((z >> bit) & 1) * 4 * 8**bit
    return key


def ref_encode(voxels: list[tuple[int, int, int]], depth: int, k: int) -> tuple[list[list[int]], list[int]]:
    """Tokens (lists of W byte values) and their heights of one object, by loops over nodes and voxels."""
    if not voxels:
        return [], []
    w = 8 ** (k - 1)
    keys = sorted({ref_morton(*v, depth) for v in voxels})
    groups = []
    g = 0
    while True:
        b, top = k * g, min(k * (g + 1), depth)
        span = top - b
        tokens: dict[int, list[int]] = {}
        for key in keys:
            node = key // 8**top
            below = (key // 8**b) - node * 8**span  # slot of the height-b descendant inside the node's block
            byte_list = tokens.setdefault(node, [0] * w)
            byte_list[below // 8] |= 1 << (below % 8)
        groups.append(([tokens[n] for n in sorted(tokens)], [top] * len(tokens)))
        if top >= depth:
            break
        g += 1
    out_tokens, out_heights = [], []
    for toks, hs in reversed(groups):  # breadth-first: top group first
        out_tokens += toks
        out_heights += hs
    return out_tokens, out_heights


def nodes_at_height(voxels: np.ndarray, h: int) -> int:
    return len(np.unique(voxels >> h, axis=0)) if len(voxels) else 0


def formula_count(voxels: np.ndarray, depth: int, k: int) -> int:
    """The docstring's token-count formula, evaluated with numpy."""
    if len(voxels) == 0:
        return 0
    groups = max(1, math.ceil(depth / k))
    return sum(nodes_at_height(voxels, min(k * (g + 1), depth)) for g in range(groups))


def morton_sorted_unique(voxels: np.ndarray, depth: int) -> np.ndarray:
    uniq = {tuple(int(c) for c in v) for v in voxels}
    return np.array(sorted(uniq, key=lambda v: ref_morton(*v, depth)), dtype=np.int64).reshape(-1, 3)


def encode_one(voxels, depth, k):
    v = torch.as_tensor(np.asarray(voxels, dtype=np.int64).reshape(-1, 3))
    return encode_objects(v, torch.zeros(len(v), dtype=torch.long), depth, num_objects=1, levels_per_token=k)


# ----------------------------------------------------------------------------------------- hand-worked cases
def test_hand_worked_depth1_two_voxels():
    # (0,0,0) -> child 0; (1,1,0) -> child x|y<<1 = 3; code = 0b00001001 = 9
    code = encode_one([(0, 0, 0), (1, 1, 0)], 1, k=1)
    assert code.tokens.tolist() == [[9]]
    assert code.token_height.tolist() == [1]
    # two-level tokens on a depth-1 tree: the top group is truncated to one level, the byte is the same code
    code2 = encode_one([(0, 0, 0), (1, 1, 0)], 1, k=2)
    assert code2.tokens.tolist() == [[9, 0, 0, 0, 0, 0, 0, 0]]


def test_hand_worked_child_order_is_x_fastest():
    # child index x | y<<1 | z<<2, code bit = 1 << child index
    assert encode_one([(1, 0, 0)], 1, 1).tokens.item() == 2  # child 1
    assert encode_one([(0, 1, 0)], 1, 1).tokens.item() == 4  # child 2
    assert encode_one([(0, 0, 1)], 1, 1).tokens.item() == 16  # child 4
    assert encode_one([(1, 1, 1)], 1, 1).tokens.item() == 128  # child 7


def test_hand_worked_depth2_opposite_corners():
    # root: (0,0,0)>>1 -> child 0, (3,3,3)>>1=(1,1,1) -> child 7: 0b10000001 = 129;
    # then node 0 holds local (0,0,0) -> 1, node 7 holds local (1,1,1) -> 128
    code = encode_one([(3, 3, 3), (0, 0, 0)], 2, k=1)
    assert code.tokens.flatten().tolist() == [129, 1, 128]
    assert code.token_height.tolist() == [2, 1, 1]
    assert code.level_boundaries().tolist() == [0, 1] and code.token_level.tolist() == [0, 1, 1]
    # merged: one token = the 8 children's codes (the 4x4x4 block's 64 bits)
    code2 = encode_one([(3, 3, 3), (0, 0, 0)], 2, k=2)
    assert code2.tokens.tolist() == [[1, 0, 0, 0, 0, 0, 0, 128]]
    dec = decode_objects(code2)
    assert dec.voxels.tolist() == [[0, 0, 0], [3, 3, 3]]


def test_morton_matches_reference():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2**10, (200, 3), generator=g)
    key = morton_encode(c, 10)
    assert key.tolist() == [ref_morton(*v, 10) for v in c.tolist()]
    assert torch.equal(morton_decode(key, 10), c)


# ----------------------------------------------------------------------------------------- property tests
voxel_sets = st.integers(1, 8).flatmap(
    lambda d: st.tuples(
        st.just(d),
        st.lists(st.tuples(*[st.integers(0, 2**d - 1)] * 3), min_size=0, max_size=60),
    )
)


@settings(max_examples=80, deadline=None)
@given(data=voxel_sets, k=st.integers(1, 3))
def test_round_trip_and_reference(data, k):
    depth, voxels = data
    arr = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
    code = encode_one(arr, depth, k)
    ref_tokens, ref_heights = ref_encode([tuple(v) for v in voxels], depth, k)
    assert code.tokens.tolist() == ref_tokens
    assert code.token_height.tolist() == ref_heights
    assert code.num_tokens == formula_count(arr, depth, k)
    dec = decode_objects(code)
    assert np.array_equal(dec.voxels.numpy(), morton_sorted_unique(arr, depth))
    assert dec.offset.tolist() == [len(dec.voxels)]


@settings(max_examples=30, deadline=None)
@given(
    objects=st.lists(
        st.integers(0, 6).flatmap(
            lambda d: st.tuples(st.just(d), st.lists(st.tuples(*[st.integers(0, 2**d - 1)] * 3), max_size=25))
        ),
        min_size=1,
        max_size=6,
    ),
    k=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_batched_equals_per_object(objects, k, seed):
    depths = torch.tensor([d for d, _ in objects])
    coords = [v for _, vs in objects for v in vs]
    obj = [m for m, (_, vs) in enumerate(objects) for _ in vs]
    perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(seed))  # input order is free
    vc = torch.tensor(coords, dtype=torch.long).reshape(-1, 3)[perm]
    oi = torch.tensor(obj, dtype=torch.long)[perm]
    code = encode_objects(vc, oi, depths, num_objects=len(objects), levels_per_token=k)
    dec = decode_objects(code)
    for m, (d, vs) in enumerate(objects):
        alone = encode_one(vs, d, k)
        part = code.object(m)
        assert torch.equal(part.tokens, alone.tokens)
        assert torch.equal(part.token_height, alone.token_height)
        sel = dec.obj == m
        assert np.array_equal(dec.voxels[sel].numpy(), morton_sorted_unique(np.asarray(vs).reshape(-1, 3), d))


def test_positions_are_node_centres():
    code = encode_one([(3, 3, 3), (0, 0, 0)], 2, k=1)
    pos = token_positions(code)
    # root centre (0.5,..); node 0 covers [0,2)^3 of a 4-cube -> centre 0.25; node 7 -> 0.75
    assert torch.allclose(pos, torch.tensor([[0.5] * 3, [0.25] * 3, [0.75] * 3]))


# ----------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("k", [1, 2, 3])
def test_empty_and_single_voxel_objects(k):
    vc = torch.tensor([[5, 1, 7]])
    code = encode_objects(vc, torch.tensor([1]), torch.tensor([4, 3, 2]), num_objects=3, levels_per_token=k)
    assert code.counts.tolist() == [0, math.ceil(3 / k), 0]  # one node per level of a single-voxel chain
    dec = decode_objects(code)
    assert dec.voxels.tolist() == [[5, 1, 7]] and dec.obj.tolist() == [1]
    assert dec.offset.tolist() == [0, 1, 1]
    none = encode_objects(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3, num_objects=2)
    assert none.num_tokens == 0 and none.counts.tolist() == [0, 0]
    assert decode_objects(none).voxels.shape == (0, 3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_depth_zero(k):
    code = encode_one([(0, 0, 0)], 0, k)
    assert code.num_tokens == 1 and code.tokens[0, 0].item() == 1 and code.tokens[0, 1:].sum() == 0
    assert decode_objects(code).voxels.tolist() == [[0, 0, 0]]
    assert encode_one(np.zeros((0, 3)), 0, k).num_tokens == 0
    with pytest.raises(ValueError, match="out of range"):
        encode_one([(1, 0, 0)], 0, k)


@pytest.mark.parametrize("depth,k", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2), (3, 3)])
def test_full_cube(depth, k):
    n = 2**depth
    g = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    code = encode_one(g.numpy(), depth, k)
    # every internal node is full: plain codes 255; merged tokens are all-ones bitmaps (truncated at the top)
    groups = math.ceil(depth / k)
    expected = sum(8 ** (depth - min(k * (gi + 1), depth)) for gi in range(groups))
    assert code.num_tokens == expected
    top_span = depth - k * (groups - 1)
    top_bits = 8**top_span
    assert code.tokens[0].tolist()[: max(1, top_bits // 8)] == [255] * max(1, top_bits // 8)
    assert bool((code.tokens[1:] == 255).all())
    assert torch.equal(decode_objects(code).voxels, morton_decode(morton_encode(g, depth).sort().values, depth))


def test_duplicates_are_deduplicated():
    a = encode_one([(1, 2, 3), (1, 2, 3), (0, 0, 0), (1, 2, 3)], 2, 1)
    b = encode_one([(0, 0, 0), (1, 2, 3)], 2, 1)
    assert torch.equal(a.tokens, b.tokens)
    assert decode_objects(a).voxels.tolist() == [[0, 0, 0], [1, 2, 3]]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="out of range"):
        encode_one([(4, 0, 0)], 2, 1)
    with pytest.raises(ValueError, match="out of range"):
        encode_one([(-1, 0, 0)], 2, 1)
    with pytest.raises(ValueError, match="voxel_coords must be \\[V, 3\\]"):
        encode_objects(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="integer"):
        encode_objects(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="obj_index must be \\[3\\]"):
        encode_objects(torch.zeros(3, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="num_objects"):
        encode_objects(torch.zeros(1, 3, dtype=torch.long), torch.tensor([2]), 2, num_objects=2)
    with pytest.raises(ValueError, match="depth"):
        encode_one([(0, 0, 0)], 22, 1)
    with pytest.raises(ValueError, match="levels_per_token"):
        encode_one([(0, 0, 0)], 2, 0)


def test_corrupt_streams_raise():
    code = encode_one([(0, 0, 0), (3, 3, 3), (2, 0, 1)], 2, 1)
    zeroed = code.tokens.clone()
    zeroed[1] = 0
    with pytest.raises(ValueError, match="all-zero"):
        decode_objects(OctreeCode(zeroed, code.token_height, code.offset, code.depth, code.origin,
                                  code.voxel_size, 1))
    extra_bit = code.tokens.clone()
    extra_bit[0] |= 8  # announces child 3, whose token is missing
    with pytest.raises(ValueError, match="too short"):
        decode_objects(OctreeCode(extra_bit, code.token_height, code.offset, code.depth, code.origin,
                                  code.voxel_size, 1))
    longer = torch.cat([code.tokens, code.tokens[-1:]])
    with pytest.raises(ValueError, match="more tokens"):
        decode_objects(OctreeCode(longer, torch.cat([code.token_height, code.token_height[-1:]]),
                                  code.offset + 1, code.depth, code.origin, code.voxel_size, 1))
    with pytest.raises(ValueError, match="offset\\[-1\\]"):
        OctreeCode(code.tokens, code.token_height, code.offset + 1, code.depth, code.origin, code.voxel_size, 1)
    # a truncated top bitmap (depth 1 under k=2 holds 8 bits) may not set bits of bytes 1..7
    c2 = encode_one([(1, 1, 1)], 1, 2)
    bad = c2.tokens.clone()
    bad[0, 3] = 1
    with pytest.raises(ValueError, match="outside"):
        decode_objects(OctreeCode(bad, c2.token_height, c2.offset, c2.depth, c2.origin, c2.voxel_size, 2))


# ----------------------------------------------------------------------------------------- voxelize / depth limits
def test_voxelize_depth_and_inverse():
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.05, 0.01, 0.0], [0.159, 0.0, 0.0], [0.051, 0.019, 0.001]])
    grid = voxelize_points(pts, 0.02)
    # x extent 0.159 -> voxel 7 -> 8 voxels -> depth 3
    assert grid.depth == 3 and grid.voxel_size == pytest.approx(0.02)
    assert torch.equal(grid.origin, pts.min(0).values)
    expected = torch.floor((pts - pts.min(0).values) / 0.02).long()
    assert torch.equal(grid.voxels[grid.inverse], expected)
    assert grid.voxels.shape[0] == 3  # points 1 and 3 share a voxel


def test_voxelize_depth_limit_raise_and_coarsen():
    pts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.2]])
    assert voxelize_points(pts, 0.01, max_depth=7).depth == 7  # voxel 100 < 128
    with pytest.raises(ValueError, match="max_depth=6"):
        voxelize_points(pts, 0.01, max_depth=6)
    grid = voxelize_points(pts, 0.01, max_depth=5, on_overflow="coarsen")
    assert grid.depth == 5 and grid.voxel_size == pytest.approx(0.04)  # 100 -> 25 < 32
    assert grid.voxels.max().item() < 2**5
    zero = voxelize_points(torch.zeros(4, 3), 0.02, max_depth=0)
    assert zero.depth == 0 and zero.voxels.tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match="NaN"):
        voxelize_points(torch.tensor([[0.0, float("nan"), 0.0]]), 0.02)
    with pytest.raises(ValueError, match="voxel_size"):
        voxelize_points(pts, 0.0)
    with pytest.raises(ValueError, match="below the given origin"):
        voxelize_points(pts, 0.02, origin=torch.tensor([0.5, 0.0, 0.0]))


def test_encode_points_recovers_points_within_half_a_voxel():
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(500, 3, generator=g) * torch.tensor([1.0, 0.3, 2.0])
    obj = torch.randint(0, 4, (500,), generator=g)
    pts = pts + obj[:, None].float() * 5  # objects far apart: each gets its own frame
    code = encode_points(pts, obj, 0.05, num_objects=5)
    assert code.counts[4].item() == 0
    centres, cobj = decode_points(code)
    vox = voxelize_objects(pts, obj, 0.05, num_objects=5)
    assert torch.equal(cobj, vox.obj)
    err = (centres[vox.inverse] - pts).abs()
    assert float(err.max()) <= 0.025 + 1e-5


# ----------------------------------------------------------------------------------------- stats / real scans
def test_octree_stats_synthetic_and_bad_input():
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(3000, 3, generator=g) * 2
    inst = torch.randint(-1, 5, (3000,), generator=g)
    st_ = octree_stats(pts, inst, voxel_size=0.05, levels_per_token=2)
    vox = np.unique(np.floor((pts.numpy() - pts.numpy().min(0)) / 0.05).astype(np.int64), axis=0)
    depth = int(np.ceil(np.log2(vox.max() + 1)))
    assert st_.scene.occupied_voxels == len(vox)
    assert st_.scene.plain_tokens == formula_count(vox, depth, 1)
    assert st_.scene.compressed_tokens == formula_count(vox, depth, 2)
    assert st_.scene.lossless and st_.objects.lossless and st_.objects.num_objects == 5
    with pytest.raises(ValueError, match="instance must be"):
        octree_stats(pts, inst[:10])
    with pytest.raises(ValueError, match="empty"):
        octree_stats(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


REAL = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"


def test_real_scan_lossless_and_reduction(real_data):
    vert = np.load(real_data / REAL / "scene0000_01_vert_all.npy")
    ins = np.load(real_data / REAL / "scene0000_01_ins_label_all.npy").astype(np.int64) - 1
    xyz = vert[:, :3]
    vox = np.unique(np.floor((xyz - xyz.min(0)) / 0.02).astype(np.int64), axis=0)
    depth = int(np.ceil(np.log2(vox.max() + 1)))
    st3 = octree_stats(xyz, ins, voxel_size=0.02, levels_per_token=3)
    assert st3.scene.lossless and st3.objects.lossless
    assert st3.scene.occupied_voxels == len(vox)
    assert st3.scene.compressed_tokens == formula_count(vox, depth, 3)
    assert st3.scene.plain_tokens == formula_count(vox, depth, 1)
    # the goal: >= 8x fewer tokens than occupied 2 cm voxels, for the scene and per object
    assert st3.scene.reduction_ratio >= 8 and st3.objects.reduction_ratio >= 8
