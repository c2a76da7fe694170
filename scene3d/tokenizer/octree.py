"""Lossless octree codes of voxel sets, with subtree compression (after Uni-3DAR), batched over objects.

Octree
------
An object's voxels are integer coordinates in ``[0, 2**D)^3`` (``D`` = the object's depth). A node at
*height* ``h`` (``h = 0``: the voxels/leaves, ``h = D``: the root) is a cube of ``2**h`` voxels per side; its
Morton key is the leaf Morton key shifted right by ``3*h``. The Morton key interleaves the coordinate bits
with **x fastest**: child index inside a parent = ``x_bit | y_bit << 1 | z_bit << 2``. The 8-bit *occupancy
code* of an internal node has bit ``i`` set when its child ``i`` holds at least one voxel.

Tokens (``levels_per_token = k``)
--------------------------------
Levels are grouped **from the leaves upward** in groups of ``k`` (group ``g`` spans heights
``k*g+1 .. min(k*(g+1), D)``; the top group of an object may hold fewer levels). One token is emitted per
occupied node at the top height ``H = min(k*(g+1), D)`` of each group; it holds the occupancy bitmap of that
node's descendants at the group's bottom height ``b = k*g``: a ``(2**(H-b))^3`` block, i.e. ``8**(H-b)`` bits
in Morton order, stored as ``W = 8**(k-1)`` bytes (byte ``j`` = bits ``8j..8j+7`` = the 8-bit occupancy code
of the descendant at height ``b+1`` with Morton index ``j`` under the node, 0 where that descendant is empty;
bytes past ``8**(H-b-1)`` are 0). The node's own code and any intermediate codes are the OR of these bytes,
so a token carries exactly the ``k`` levels of Uni-3DAR's subtree (``k = 2``: the node's code plus its 8
children's codes = the 64-bit occupancy of its 4x4x4 block). ``k = 1`` is the plain octree (one 8-bit code
per internal node). An object of depth 0 holding its single voxel gets one token whose bitmap is 1 bit.

Token order: objects in index order; inside an object breadth-first (top group first), inside a group by
Morton key. Decoding needs only the token bytes and each object's depth: the bits of a group's tokens list
the nodes whose tokens come next, in order, so the stream is self-delimiting (checked on decode).

Token count (exact; ``n_o(h)`` = occupied nodes of object ``o`` at height ``h`` = ``#unique(voxel >> h)``)::

    T_o = 0                                              if object o is empty
    T_o = sum_{g=0}^{G_o-1} n_o(min(k*(g+1), D_o)),      G_o = max(1, ceil(D_o / k))    otherwise

For ``k = 1`` and ``D_o >= 1`` this is the number of internal nodes ``sum_{h=1}^{D_o} n_o(h)``.

Vocabulary for an embedding layer: a token is the bag of its non-zero bytes, each a sub-token id
``slot * 256 + byte`` with ``slot < W`` -- ``W * 256`` ids (256 for k=1, 2048 for k=2, 16384 for k=3);
:class:`scene3d.tokenizer.geometry.GeometryEncoder` sums their embeddings (``nn.EmbeddingBag``). The number
of non-zero bytes over all tokens equals the number of nodes at the groups' bottom-plus-one heights, never
more than the plain octree's code count.

Everything is vectorised torch: sorting Morton keys, ``torch.unique`` per group, ``scatter_add`` of child
bits; the only Python loops run over groups/bits (at most ``depth`` iterations), never over nodes or objects.
Morton coding is written here (a loop over <= 21 bit positions) because torch/numpy/spconv have no helper.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Union

import torch

from scene3d.structures.ragged import batch_from_offset, counts_from_offset, offset_from_counts

#: Largest depth the codec accepts (3*21 bits fit a signed 64-bit Morton key).
MAX_DEPTH = 21
#: Default cap on an object's depth when voxelizing (2 cm * 2**16 = 1.3 km: never reached by real scenes).
DEFAULT_MAX_DEPTH = 16
#: Default number of octree levels merged into one token. 2 is Uni-3DAR's subtree compression; 3 is the
#: smallest that reaches the >= 8x token reduction vs occupied 2 cm voxels on real ScanNet scans (which hold
#: about one point per 2 cm voxel, so 2-level merging cannot go below ~1 token per 2.9 voxels there).
DEFAULT_LEVELS_PER_TOKEN = 3
_BIT_VALUES = (1 << torch.arange(8, dtype=torch.int64))  # value of bit i of a byte


# ----------------------------------------------------------------------------------------------- Morton keys
def morton_encode(coords: torch.Tensor, depth: int) -> torch.Tensor:
    """Morton keys ``[V]`` int64 of integer coordinates ``[V, 3]`` in ``[0, 2**depth)`` (x fastest)."""
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must lie in [0, {MAX_DEPTH}], got {depth}")
    c = coords.long()
    key = torch.zeros(c.shape[0], dtype=torch.int64, device=c.device)
    for bit in range(depth):
        for axis in range(3):
            key |= ((c[:, axis] >> bit) & 1) << (3 * bit + axis)
    return key


def morton_decode(key: torch.Tensor, depth: int) -> torch.Tensor:
    """Integer coordinates ``[V, 3]`` int64 of Morton keys ``[V]`` (inverse of :func:`morton_encode`)."""
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must lie in [0, {MAX_DEPTH}], got {depth}")
    out = torch.zeros(key.shape[0], 3, dtype=torch.int64, device=key.device)
    for bit in range(depth):
        for axis in range(3):
            out[:, axis] |= ((key >> (3 * bit + axis)) & 1) << bit
    return out


# ----------------------------------------------------------------------------------------------- structures
@dataclass(frozen=True)
class OctreeCode:
    """Ragged octree token streams of M objects.

    ==================  ===============  ======================================================================
    field               shape / dtype    meaning
    ==================  ===============  ======================================================================
    ``tokens``          [T, W] uint8     token bitmaps, W = 8**(levels_per_token-1) bytes (see module doc)
    ``token_height``    [T] int64        height above the leaves of each token's node (its group's top);
                                         per object it is non-increasing -> the per-level boundaries
    ``offset``          [M] int64        cumulative token counts per object (object m: offset[m-1]..offset[m])
    ``depth``           [M] int64        octree depth of each object (voxel coords in [0, 2**depth))
    ``origin``          [M, 3] float     world position of voxel (0,0,0)'s min corner
    ``voxel_size``      [M] float        edge of a leaf voxel (world units)
    ``levels_per_token`` int             octree levels merged into one token (k)
    ==================  ===============  ======================================================================

    World coordinates of a decoded voxel ``v`` of object ``m``: ``origin[m] + (v + 0.5) * voxel_size[m]``.
    """

    tokens: torch.Tensor
    token_height: torch.Tensor
    offset: torch.Tensor
    depth: torch.Tensor
    origin: torch.Tensor
    voxel_size: torch.Tensor
    levels_per_token: int

    def __post_init__(self) -> None:
        k = self.levels_per_token
        if not isinstance(k, int) or k < 1 or k > 4:
            raise ValueError(f"levels_per_token must be an int in [1, 4], got {k!r}")
        w = 8 ** (k - 1)
        if self.tokens.dim() != 2 or self.tokens.shape[1] != w or self.tokens.dtype != torch.uint8:
            raise ValueError(f"tokens must be uint8 [T, {w}], got {self.tokens.dtype} {tuple(self.tokens.shape)}")
        t = self.tokens.shape[0]
        if self.token_height.shape != (t,):
            raise ValueError(f"token_height must be [{t}], got {tuple(self.token_height.shape)}")
        counts_from_offset(self.offset)  # validates
        m = self.offset.numel()
        if m and int(self.offset[-1]) != t:
            raise ValueError(f"offset[-1]={int(self.offset[-1])} must equal the number of tokens {t}")
        if not m and t:
            raise ValueError("tokens given for zero objects")
        if self.depth.shape != (m,) or self.voxel_size.shape != (m,) or self.origin.shape != (m, 3):
            raise ValueError(
                f"depth [{m}], voxel_size [{m}], origin [{m}, 3] expected, got {tuple(self.depth.shape)}, "
                f"{tuple(self.voxel_size.shape)}, {tuple(self.origin.shape)}"
            )

    @property
    def num_objects(self) -> int:
        return int(self.offset.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def token_width(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def vocab_size(self) -> int:
        """Number of sub-token ids ``slot * 256 + byte`` (see module doc)."""
        return self.token_width * 256

    @property
    def counts(self) -> torch.Tensor:
        """Tokens per object ``[M]``."""
        return counts_from_offset(self.offset)

    @property
    def token_obj(self) -> torch.Tensor:
        """Object index of each token ``[T]``."""
        return batch_from_offset(self.offset)

    @property
    def token_level(self) -> torch.Tensor:
        """Level below the root of each token's node ``[T]`` (0 = root)."""
        return self.depth[self.token_obj] - self.token_height

    def level_boundaries(self) -> torch.Tensor:
        """Start index of each token run of one height, per object: ``[R]`` int64 token indices.

        A run is a maximal block of consecutive tokens with the same object and height (one octree group).
        """
        if self.num_tokens == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.tokens.device)
        obj = self.token_obj
        change = torch.ones(self.num_tokens, dtype=torch.bool, device=self.tokens.device)
        change[1:] = (obj[1:] != obj[:-1]) | (self.token_height[1:] != self.token_height[:-1])
        return change.nonzero().flatten()

    def object(self, m: int) -> "OctreeCode":
        """The code of object ``m`` alone (M = 1)."""
        if not 0 <= m < self.num_objects:
            raise ValueError(f"object index {m} out of range [0, {self.num_objects})")
        start = int(self.offset[m - 1]) if m else 0
        end = int(self.offset[m])
        return OctreeCode(
            tokens=self.tokens[start:end],
            token_height=self.token_height[start:end],
            offset=torch.tensor([end - start], dtype=torch.int64, device=self.offset.device),
            depth=self.depth[m : m + 1],
            origin=self.origin[m : m + 1],
            voxel_size=self.voxel_size[m : m + 1],
            levels_per_token=self.levels_per_token,
        )

    def to(self, device) -> "OctreeCode":
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor)}
        )


class DecodedVoxels(NamedTuple):
    """Voxels of M objects: ``voxels [V, 3]`` int64 (per object sorted by Morton key), ``obj [V]`` int64,
    ``offset [M]`` cumulative voxel counts."""

    voxels: torch.Tensor
    obj: torch.Tensor
    offset: torch.Tensor


class DecodedPoints(NamedTuple):
    """World-space voxel centres ``points [V, 3]`` float and their object index ``obj [V]``."""

    points: torch.Tensor
    obj: torch.Tensor


class TokenNodes(NamedTuple):
    """The octree node of every token, in stream order: ``key [T]`` Morton key of the node at its height
    (relative to its object), ``height [T]``, ``obj [T]``; plus the decoded leaves."""

    key: torch.Tensor
    height: torch.Tensor
    obj: torch.Tensor
    leaves: DecodedVoxels


class VoxelGrid(NamedTuple):
    """Result of :func:`voxelize_points` (one point set).

    ``voxels [V, 3]`` int64 unique, Morton-sorted · ``inverse [N]`` voxel row of each point ·
    ``origin [3]`` float min corner · ``depth`` int · ``voxel_size`` float (larger than asked when coarsened).
    """

    voxels: torch.Tensor
    inverse: torch.Tensor
    origin: torch.Tensor
    depth: int
    voxel_size: float


class ObjectVoxels(NamedTuple):
    """Result of :func:`voxelize_objects` (M objects at once).

    ``voxels [V, 3]`` int64 unique per object, sorted by (object, Morton key) · ``obj [V]`` ·
    ``inverse [N]`` voxel row of each point · ``origin [M, 3]`` per-object min corner ·
    ``depth [M]`` int64 · ``voxel_size [M]`` float.
    """

    voxels: torch.Tensor
    obj: torch.Tensor
    inverse: torch.Tensor
    origin: torch.Tensor
    depth: torch.Tensor
    voxel_size: torch.Tensor


# ----------------------------------------------------------------------------------------------- helpers
def token_width(levels_per_token: int) -> int:
    """Bytes per token ``W = 8**(k-1)``."""
    return 8 ** (levels_per_token - 1)


def depth_for_extent(max_coord: torch.Tensor) -> torch.Tensor:
    """Smallest depth ``d`` with ``max_coord < 2**d`` (elementwise, int64; 0 for max_coord 0)."""
    mc = max_coord.long().clamp_min(0)
    d = torch.zeros_like(mc)
    # bit length of mc, by repeated doubling (<= MAX_DEPTH+1 iterations, vectorised over elements)
    for _ in range(MAX_DEPTH + 2):
        more = (mc >> d) > 0
        if not more.any():
            break
        d = d + more.long()
    return d


def _check_points(points: torch.Tensor, name: str) -> None:
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"{name} must be [N, 3], got {tuple(points.shape)}")
    if not torch.is_floating_point(points):
        raise ValueError(f"{name} must be floating point, got {points.dtype}")
    if not torch.isfinite(points).all():
        raise ValueError(f"{name} holds NaN or infinite coordinates")


def _check_voxel_size(voxel_size: float) -> float:
    v = float(voxel_size)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"voxel_size must be a positive finite number, got {voxel_size!r}")
    return v


# ----------------------------------------------------------------------------------------------- voxelize
def voxelize_points(
    points: torch.Tensor,
    voxel_size: float,
    origin: Optional[torch.Tensor] = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    on_overflow: Literal["raise", "coarsen"] = "raise",
) -> VoxelGrid:
    """Voxelize one point set ``[N, 3]`` for the octree; the inverse map walks voxels back to points.

    ``origin`` defaults to the points' min corner. The depth is ``ceil(log2(extent / voxel_size))`` where
    the extent is counted in whole voxels (``max voxel coordinate + 1``). When that exceeds ``max_depth``,
    ``on_overflow="raise"`` raises ``ValueError``; ``"coarsen"`` doubles the voxel size as often as needed
    (the returned ``voxel_size`` says which was used), so the code stays lossless at that coarser grid.
    Points below ``origin`` raise ``ValueError``.
    """
    _check_points(points, "points")
    obj = torch.zeros(points.shape[0], dtype=torch.int64, device=points.device)
    origins = None if origin is None else torch.as_tensor(origin, dtype=points.dtype, device=points.device).view(1, 3)
    res = voxelize_objects(points, obj, voxel_size, num_objects=1, origin=origins, max_depth=max_depth,
                           on_overflow=on_overflow)
    return VoxelGrid(res.voxels, res.inverse, res.origin[0], int(res.depth[0]), float(res.voxel_size[0]))


def voxelize_objects(
    points: torch.Tensor,
    obj_index: torch.Tensor,
    voxel_size: float,
    num_objects: Optional[int] = None,
    origin: Optional[torch.Tensor] = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    on_overflow: Literal["raise", "coarsen"] = "raise",
) -> ObjectVoxels:
    """Voxelize the points of M objects at once, each in its own frame (origin = its min corner by default).

    ``points [N, 3]`` float, ``obj_index [N]`` int in ``[0, M)``. Depth per object and the overflow policy
    as in :func:`voxelize_points`. Objects without points get depth 0, origin 0 and no voxels.
    """
    _check_points(points, "points")
    voxel_size = _check_voxel_size(voxel_size)
    if on_overflow not in ("raise", "coarsen"):
        raise ValueError(f"on_overflow must be 'raise' or 'coarsen', got {on_overflow!r}")
    if not 0 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"max_depth must lie in [0, {MAX_DEPTH}], got {max_depth}")
    obj = _check_obj_index(obj_index, points.shape[0], num_objects)
    m = _num_objects(obj, num_objects)
    dev, dt = points.device, points.dtype
    if origin is None:
        origin = torch.full((m, 3), float("inf"), dtype=dt, device=dev)
        origin = origin.scatter_reduce(0, obj[:, None].expand(-1, 3), points, "amin", include_self=True)
        origin = torch.where(torch.isfinite(origin), origin, torch.zeros_like(origin))
    else:
        origin = torch.as_tensor(origin, dtype=dt, device=dev)
        if origin.shape != (m, 3) or not torch.isfinite(origin).all():
            raise ValueError(f"origin must be finite [{m}, 3], got {tuple(origin.shape)}")
    rel = points - origin[obj]
    # small negative rounding of points at the min corner is clamped; points really below origin are errors
    if (rel < -1e-6 * max(1.0, float(rel.abs().max()) if rel.numel() else 1.0)).any():
        raise ValueError("points lie below the given origin")
    rel = rel.clamp_min(0)
    vs = torch.full((m,), voxel_size, dtype=torch.float64, device=dev)
    coords = torch.floor(rel.double() / vs[obj, None]).long()
    maxc = torch.zeros(m, dtype=torch.int64, device=dev).scatter_reduce(
        0, obj, coords.max(1).values if coords.numel() else coords.new_zeros(0), "amax", include_self=True)
    depth = depth_for_extent(maxc)
    over = depth > max_depth
    if over.any():
        if on_overflow == "raise":
            bad = over.nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"objects {bad} need depth {depth[over].max().item()} > max_depth={max_depth} at voxel_size="
                f"{voxel_size}; raise max_depth, enlarge voxel_size or pass on_overflow='coarsen'")
        shift = (depth - max_depth).clamp_min(0)  # coarsen by 2**shift per object
        # scaling by a power of two is exact in floating point, so the new coordinates are the old ones
        # >> shift and the depth drops by exactly ``shift``
        vs = vs * (2.0 ** shift.double())
        coords = torch.floor(rel.double() / vs[obj, None]).long()
        depth = depth - shift
    key = _composite_key(obj, morton_encode(coords, int(depth.max()) if m else 0), int(depth.max()) if m else 0, m)
    ukey, inverse = torch.unique(key, sorted=True, return_inverse=True)
    dmax = int(depth.max()) if m else 0
    vobj = ukey >> (3 * dmax)
    vox = morton_decode(ukey & ((1 << (3 * dmax)) - 1), dmax)
    return ObjectVoxels(vox, vobj, inverse, origin, depth, vs.to(dt))


# ----------------------------------------------------------------------------------------------- encode
def _check_obj_index(obj_index: torch.Tensor, n: int, num_objects: Optional[int]) -> torch.Tensor:
    obj_index = torch.as_tensor(obj_index)
    if obj_index.shape != (n,):
        raise ValueError(f"obj_index must be [{n}] (one per row), got {tuple(obj_index.shape)}")
    if obj_index.dtype.is_floating_point or obj_index.dtype == torch.bool:
        raise ValueError(f"obj_index must be an integer tensor, got {obj_index.dtype}")
    obj = obj_index.long()
    if n and int(obj.min()) < 0:
        raise ValueError("obj_index holds negative object indices")
    if num_objects is not None and n and int(obj.max()) >= num_objects:
        raise ValueError(f"obj_index holds {int(obj.max())} >= num_objects={num_objects}")
    return obj


def _num_objects(obj: torch.Tensor, num_objects: Optional[int]) -> int:
    if num_objects is not None:
        if num_objects < 0:
            raise ValueError(f"num_objects must be >= 0, got {num_objects}")
        return int(num_objects)
    return int(obj.max()) + 1 if obj.numel() else 0


def _composite_key(obj: torch.Tensor, morton: torch.Tensor, dmax: int, m: int) -> torch.Tensor:
    """``obj << 3*dmax | morton``: one int64 that sorts by object, then Morton key."""
    if m > 1 and (m - 1).bit_length() + 3 * dmax > 62:
        raise ValueError(f"{m} objects at depth {dmax} do not fit a 63-bit key (lower the depth or split the batch)")
    return (obj << (3 * dmax)) | morton


def encode_objects(
    voxel_coords: torch.Tensor,
    obj_index: torch.Tensor,
    depth: Union[int, torch.Tensor],
    num_objects: Optional[int] = None,
    levels_per_token: int = DEFAULT_LEVELS_PER_TOKEN,
    origin: Optional[torch.Tensor] = None,
    voxel_size: Union[float, torch.Tensor] = 1.0,
) -> OctreeCode:
    """Encode the voxels of M objects into one ragged :class:`OctreeCode`.

    =================  ===============  ===================================================================
    argument           shape / dtype    meaning
    =================  ===============  ===================================================================
    ``voxel_coords``   [V, 3] int       voxel coordinates, object m's in ``[0, 2**depth[m])``; duplicates ok
    ``obj_index``      [V] int          object of each voxel, in ``[0, M)``
    ``depth``          int or [M] int   octree depth (common or per object), ``0 <= depth <= 21``
    ``num_objects``    int              M (default ``max(obj_index)+1``); objects without voxels -> 0 tokens
    ``origin``         [M, 3] float     carried to the code for point recovery (default zeros)
    ``voxel_size``     float or [M]     carried to the code (default 1)
    =================  ===============  ===================================================================

    Raises ``ValueError`` on coordinates out of range, bad shapes or dtypes.
    """
    k = int(levels_per_token)
    if k < 1 or k > 4:
        raise ValueError(f"levels_per_token must lie in [1, 4], got {levels_per_token}")
    vc = torch.as_tensor(voxel_coords)
    if vc.dim() != 2 or vc.shape[1] != 3:
        raise ValueError(f"voxel_coords must be [V, 3], got {tuple(vc.shape)}")
    if vc.dtype.is_floating_point or vc.dtype == torch.bool:
        raise ValueError(f"voxel_coords must be an integer tensor, got {vc.dtype}")
    vc = vc.long()
    dev = vc.device
    obj = _check_obj_index(obj_index, vc.shape[0], num_objects)
    m = _num_objects(obj, num_objects)
    if isinstance(depth, torch.Tensor) and depth.dim() > 0:
        depth_t = depth.to(device=dev, dtype=torch.int64)
        if depth_t.shape != (m,):
            raise ValueError(f"depth must be an int or [{m}] per object, got {tuple(depth_t.shape)}")
    else:
        depth_t = torch.full((m,), int(depth), dtype=torch.int64, device=dev)
    if m and (int(depth_t.min()) < 0 or int(depth_t.max()) > MAX_DEPTH):
        raise ValueError(f"depth must lie in [0, {MAX_DEPTH}], got {depth_t.tolist()[:8]}")
    if vc.numel():
        lim = (1 << depth_t[obj])[:, None]
        if (vc < 0).any() or (vc >= lim).any():
            raise ValueError("voxel_coords out of range [0, 2**depth) for their object's depth")
    origin_t = torch.zeros(m, 3, device=dev) if origin is None else torch.as_tensor(origin, device=dev)
    vs_t = torch.as_tensor(voxel_size, dtype=origin_t.dtype if origin_t.is_floating_point() else torch.float32,
                           device=dev)
    vs_t = vs_t.expand(m).clone() if vs_t.dim() == 0 else vs_t
    w = token_width(k)
    dmax = int(depth_t.max()) if m else 0
    s = 3 * dmax
    ngroups = torch.clamp((depth_t + k - 1) // k, min=1)  # G_o (meaningless for empty objects)

    # unique leaves, sorted by (object, Morton key)
    nodes = torch.unique(_composite_key(obj, morton_encode(vc, dmax), dmax, m), sorted=True)
    group_tokens, group_heights, group_obj = [], [], []
    gmax = int(ngroups.max()) if m else 0
    low_mask = (1 << s) - 1
    for g in range(gmax):
        if nodes.numel() == 0:
            break
        n_obj = nodes >> s
        n_m = nodes & low_mask
        d_o = depth_t[n_obj]
        b = k * g
        top = torch.minimum(d_o, torch.full_like(d_o, k * (g + 1)))  # H per node's object
        span = top - b  # levels in this group (0 only for a depth-0 object)
        parent_m = n_m >> (3 * span)
        slot = n_m - (parent_m << (3 * span))
        parents, inv = torch.unique((n_obj << s) | parent_m, sorted=True, return_inverse=True)
        flat = torch.zeros(parents.numel() * w, dtype=torch.int64, device=dev)
        flat.scatter_add_(0, inv * w + (slot >> 3), _BIT_VALUES.to(dev)[slot & 7])  # distinct bits: sum == OR
        group_tokens.append(flat.view(-1, w).to(torch.uint8))
        p_obj = parents >> s
        p_height = torch.minimum(depth_t[p_obj], torch.full_like(p_obj, k * (g + 1)))
        group_heights.append(p_height)
        group_obj.append(p_obj)
        # objects whose root this group reached are done; the others continue with these parents
        nodes = parents[p_height < depth_t[p_obj]]

    if group_tokens:
        tokens = torch.cat(group_tokens[::-1])  # top groups first, then a stable sort by object
        heights = torch.cat(group_heights[::-1])
        tobj = torch.cat(group_obj[::-1])
        order = torch.sort(tobj, stable=True).indices
        tokens, heights, tobj = tokens[order], heights[order], tobj[order]
    else:
        tokens = torch.zeros(0, w, dtype=torch.uint8, device=dev)
        heights = torch.zeros(0, dtype=torch.int64, device=dev)
        tobj = heights
    offset = offset_from_counts(torch.bincount(tobj, minlength=m)).to(dev)
    return OctreeCode(tokens, heights, offset, depth_t, origin_t, vs_t, k)


def encode_points(
    points: torch.Tensor,
    obj_index: torch.Tensor,
    voxel_size: float,
    num_objects: Optional[int] = None,
    levels_per_token: int = DEFAULT_LEVELS_PER_TOKEN,
    max_depth: int = DEFAULT_MAX_DEPTH,
    on_overflow: Literal["raise", "coarsen"] = "raise",
) -> OctreeCode:
    """Voxelize each object's points in its own frame (:func:`voxelize_objects`) and encode them."""
    vox = voxelize_objects(points, obj_index, voxel_size, num_objects, max_depth=max_depth, on_overflow=on_overflow)
    return encode_objects(vox.voxels, vox.obj, vox.depth, num_objects=vox.depth.numel(),
                          levels_per_token=levels_per_token, origin=vox.origin, voxel_size=vox.voxel_size)


# ----------------------------------------------------------------------------------------------- decode
def token_nodes(code: OctreeCode) -> TokenNodes:
    """Walk the token stream top-down: the node of every token and the leaves (validates the stream).

    Raises ``ValueError`` when the stream is inconsistent (an all-zero token, bits outside a truncated
    bitmap, more or fewer tokens than the bits announce, heights that disagree with the walk).
    """
    k, w = code.levels_per_token, code.token_width
    dev = code.tokens.device
    m = code.num_objects
    depth = code.depth
    counts = code.counts
    starts = code.offset - counts
    nonempty = counts > 0
    dmax = int(depth.max()) if m else 0
    s = 3 * dmax
    low_mask = (1 << s) - 1
    ngroups = torch.clamp((depth + k - 1) // k, min=1)
    gmax = int(ngroups[nonempty].max()) if bool(nonempty.any()) else 0
    bits_all = _BIT_VALUES.to(dev)
    cursor = starts.clone()  # next unread token per object
    t = code.num_tokens
    node_key = torch.full((t,), -1, dtype=torch.int64, device=dev)
    node_height = torch.full((t,), -1, dtype=torch.int64, device=dev)
    nodes = torch.zeros(0, dtype=torch.int64, device=dev)  # composite keys of the nodes whose tokens come next
    for g in range(gmax - 1, -1, -1):
        roots = (nonempty & (ngroups - 1 == g)).nonzero().flatten()
        if roots.numel():
            nodes = torch.sort(torch.cat([nodes, roots << s])).values  # root key 0 of starting objects
        n_obj = nodes >> s
        n_m = nodes & low_mask
        # rank of each node inside its object -> stream position
        per_obj = torch.bincount(n_obj, minlength=m)
        first = torch.cumsum(per_obj, 0) - per_obj
        rank = torch.arange(nodes.numel(), device=dev) - first[n_obj]
        pos = cursor[n_obj] + rank
        if (pos >= code.offset[n_obj]).any():
            raise ValueError("octree token stream is too short for the occupancy bits it holds")
        cursor = cursor + per_obj
        d_o = depth[n_obj]
        top = torch.minimum(d_o, torch.full_like(d_o, k * (g + 1)))
        b = k * g
        span = top - b
        node_key[pos] = n_m
        node_height[pos] = top
        tok = code.tokens[pos].long()  # (n, W)
        bits = (tok[:, :, None] & bits_all) != 0  # (n, W, 8)
        bits = bits.reshape(tok.shape[0], w * 8)
        if not bits.any(1).all():
            raise ValueError("octree token stream holds an all-zero token")
        node_i, slot = bits.nonzero(as_tuple=True)
        if (slot >= (1 << (3 * span[node_i]))).any():
            raise ValueError("octree token sets bits outside its (truncated) bitmap")
        child = (n_m[node_i] << (3 * span[node_i])) | slot
        nodes = (n_obj[node_i] << s) | child  # sorted: parents sorted, slots ascending
    if bool((cursor != code.offset).any()):
        raise ValueError("octree token stream holds more tokens than its occupancy bits announce")
    if bool((node_height != code.token_height).any()):
        raise ValueError("token_height disagrees with the octree walk")
    v_obj = nodes >> s
    voxels = morton_decode(nodes & low_mask, dmax)
    leaves = DecodedVoxels(voxels, v_obj, offset_from_counts(torch.bincount(v_obj, minlength=m)).to(dev))
    return TokenNodes(node_key, node_height, code.token_obj, leaves)


def decode_objects(code: OctreeCode) -> DecodedVoxels:
    """Voxels of every object (exactly the encoded set, deduplicated, Morton-sorted per object)."""
    return token_nodes(code).leaves


def decode_points(code: OctreeCode) -> DecodedPoints:
    """World-space voxel centres ``[V, 3]`` and their object index ``[V]``."""
    dec = decode_objects(code)
    vs = code.voxel_size[dec.obj].to(code.origin.dtype if code.origin.is_floating_point() else torch.float32)
    pts = code.origin[dec.obj] + (dec.voxels.to(vs.dtype) + 0.5) * vs[:, None]
    return DecodedPoints(pts, dec.obj)


def token_positions(code: OctreeCode, nodes: Optional[TokenNodes] = None) -> torch.Tensor:
    """Centre of each token's node in its object's unit cube ``[T, 3]`` float32 (in ``[0, 1]``)."""
    nodes = token_nodes(code) if nodes is None else nodes
    if code.num_tokens == 0:
        return torch.zeros(0, 3, device=code.tokens.device)
    dmax = int(code.depth.max())
    xyz = morton_decode(nodes.key, dmax).float()
    cell = torch.exp2(nodes.height.float())
    extent = torch.exp2(code.depth[nodes.obj].float())
    return (xyz + 0.5) * cell[:, None] / extent[:, None]


def plain_token_count(voxel_coords: torch.Tensor, obj_index: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Per-object count of plain octree codes (internal nodes; 1 for a non-empty depth-0 object) ``[M]``."""
    code = encode_objects(voxel_coords, obj_index, depth, num_objects=depth.numel(), levels_per_token=1)
    return code.counts


# ----------------------------------------------------------------------------------------------- statistics
class OctreeFigures(NamedTuple):
    """Figures of one encoding run (whole scene, or all objects summed)."""

    num_points: int
    num_objects: int
    occupied_voxels: int
    plain_tokens: int
    compressed_tokens: int
    reduction_ratio: float  # occupied_voxels / compressed_tokens
    reduction_vs_plain: float  # plain_tokens / compressed_tokens
    bits_per_point: float  # 8 * plain_tokens / num_points: the occupancy-byte payload (all k carry it)
    fixed_bits_per_point: float  # compressed_tokens * 8**k / num_points: the fixed-width bitmaps
    points_per_s: float  # voxelize + encode + decode, points per second
    lossless: bool  # decode gave back exactly the voxels


class OctreeStats(NamedTuple):
    """``scene``: the whole scene as one octree; ``objects``: each annotated instance in its own frame."""

    scene: OctreeFigures
    objects: OctreeFigures
    levels_per_token: int
    voxel_size: float


def _figures(points: torch.Tensor, obj: torch.Tensor, m: int, voxel_size: float, max_depth: int,
             k: int, on_overflow: str) -> OctreeFigures:
    t0 = time.perf_counter()
    vox = voxelize_objects(points, obj, voxel_size, num_objects=m, max_depth=max_depth, on_overflow=on_overflow)
    code = encode_objects(vox.voxels, vox.obj, vox.depth, num_objects=m, levels_per_token=k,
                          origin=vox.origin, voxel_size=vox.voxel_size)
    dec = decode_objects(code)
    dt = time.perf_counter() - t0
    lossless = bool(dec.voxels.shape == vox.voxels.shape and torch.equal(dec.voxels, vox.voxels)
                    and torch.equal(dec.obj, vox.obj))
    plain = int(plain_token_count(vox.voxels, vox.obj, vox.depth).sum()) if k != 1 else code.num_tokens
    n = int(points.shape[0])
    t = code.num_tokens
    return OctreeFigures(
        num_points=n, num_objects=m, occupied_voxels=int(vox.voxels.shape[0]), plain_tokens=plain,
        compressed_tokens=t, reduction_ratio=vox.voxels.shape[0] / max(t, 1), reduction_vs_plain=plain / max(t, 1),
        bits_per_point=8.0 * plain / max(n, 1), fixed_bits_per_point=t * 8.0 ** k / max(n, 1),
        points_per_s=n / max(dt, 1e-9), lossless=lossless)


def octree_stats(
    coord: torch.Tensor,
    instance: torch.Tensor,
    voxel_size: float = 0.02,
    max_depth: int = DEFAULT_MAX_DEPTH,
    levels_per_token: int = DEFAULT_LEVELS_PER_TOKEN,
    ignore_label: int = -1,
    on_overflow: Literal["raise", "coarsen"] = "raise",
) -> OctreeStats:
    """Octree figures of one scene: ``coord [N, 3]`` float, ``instance [N]`` int (``ignore_label`` = none).

    The scene figures encode every point as one object (its min corner as origin); the object figures
    encode each instance (points with ``instance != ignore_label``) in its own frame, summed over objects.
    Accepts numpy arrays too. For the mmdet3d ScanNet exports pass ``instance = ins_label.astype(int) - 1``.
    """
    coord = torch.as_tensor(coord)
    instance = torch.as_tensor(instance)
    if coord.dim() != 2 or coord.shape[1] != 3:
        raise ValueError(f"coord must be [N, 3], got {tuple(coord.shape)}")
    if instance.shape != (coord.shape[0],):
        raise ValueError(f"instance must be [{coord.shape[0]}] to match coord, got {tuple(instance.shape)}")
    if coord.shape[0] == 0:
        raise ValueError("coord is empty: no points to encode")
    coord = coord.float() if not torch.is_floating_point(coord) else coord
    _check_points(coord, "coord")
    scene = _figures(coord, torch.zeros(coord.shape[0], dtype=torch.int64), 1, voxel_size, max_depth,
                     levels_per_token, on_overflow)
    keep = instance.long() != ignore_label
    ids, obj = torch.unique(instance.long()[keep], return_inverse=True)
    objects = _figures(coord[keep], obj, int(ids.numel()), voxel_size, max_depth, levels_per_token, on_overflow)
    return OctreeStats(scene, objects, int(levels_per_token), float(voxel_size))
