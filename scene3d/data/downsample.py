"""Voxel downsampling of large scenes, with the map back to every input point.

The model quantises a scene to its ``voxel_size`` and its backbone gives every point of a voxel the same
feature, so a scan of millions of points loses little when it is reduced to one representative point per
occupied voxel first — per (voxel, instance) when the scene has instance ids, so object masks stay exact.
``inverse`` maps every input point to its representative: a mask computed on the representatives becomes a
mask on every input point as ``mask[inverse]``.

When one representative per voxel is still more than ``max_points`` the voxel grows (by
``max(1.25, sqrt(V / max_points))`` a round: surfaces scale with the square of the voxel) until it fits;
``Downsampled.coarsened`` then says the model sees the scene coarser than its own resolution.

=====================  ===============  =================================================================
field of Downsampled   shape / dtype    meaning
=====================  ===============  =================================================================
``coord``              [V, 3] float32   mean position of each representative's points
``color``              [V, 3] uint8     mean colour (rounded); None when the input has none
``normal``             [V, 3] float32   mean normal, re-normalised; None when the input has none
``instance``           [V] int64        instance id (exact: points of two instances never share a row)
``superpoint``         [V] int64        superpoint id of the representative's first point
``inverse``            [N] int64        representative row of every input point
``counts``             [V] int64        input points per representative
``voxel_size``         float            voxel edge used, metres
``model_voxel``        float            voxel edge asked for (the model's resolution)
=====================  ===============  =================================================================

Memory: besides the inputs, about 60 bytes per input point at the peak (int64 keys, the sort and
``inverse``), then ``V`` representatives.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

#: the growth of the voxel per round when ``max_points`` is exceeded is at least this factor
MIN_GROWTH = 1.25
MAX_ROUNDS = 40


class Downsampled(NamedTuple):
    coord: np.ndarray
    color: Optional[np.ndarray]
    normal: Optional[np.ndarray]
    instance: Optional[np.ndarray]
    superpoint: Optional[np.ndarray]
    inverse: np.ndarray
    counts: np.ndarray
    voxel_size: float
    model_voxel: float

    @property
    def num_points(self) -> int:
        """Representatives ``V``."""
        return int(self.coord.shape[0])

    @property
    def num_input_points(self) -> int:
        return int(self.inverse.shape[0])

    @property
    def coarsened(self) -> bool:
        """The voxel had to grow beyond the model's resolution to fit ``max_points``."""
        return self.voxel_size > self.model_voxel * (1 + 1e-9)


def _dense(a: np.ndarray) -> np.ndarray:
    """Ranks ``0..U-1`` of the values of ``a`` (int64)."""
    return np.unique(a, return_inverse=True)[1].reshape(-1).astype(np.int64, copy=False)


def _combine(key: Optional[np.ndarray], col: np.ndarray) -> np.ndarray:
    """One int64 key per row for (key, col), ``col >= 0``; compresses to ranks before it could overflow."""
    if key is None:
        return col
    span = int(col.max()) + 1
    if (int(key.max()) + 1) * span >= 2**62:
        key = _dense(key)
        if (int(key.max()) + 1) * span >= 2**62:
            col = _dense(col)
            span = int(col.max()) + 1
    key *= span
    key += col
    return key


def _group(coord: np.ndarray, voxel: float, instance: Optional[np.ndarray]):
    """``(first row, inverse, V)`` of the (voxel, instance) groups of the points."""
    origin = coord.min(0)
    key = None
    for a in range(3):  # one axis at a time: at most a few [N] int64 temporaries
        g = np.floor((coord[:, a].astype(np.float64) - float(origin[a])) / voxel).astype(np.int64)
        key = _combine(key, g)
        del g
    if instance is not None:
        key = _combine(key, instance.astype(np.int64) + 1)  # -1 (none) -> 0
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1).astype(np.int64, copy=False), int(first.shape[0])


def _mean(values: np.ndarray, inverse: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-group mean ``[V, C]`` (float64) of ``values [N, C]`` (bincount per column: no [N, C] copies)."""
    v = counts.shape[0]
    cols = [np.bincount(inverse, weights=values[:, c], minlength=v) for c in range(values.shape[1])]
    return np.stack(cols, 1) / counts[:, None]


def voxel_downsample(coord: np.ndarray, voxel_size: float, *, color: Optional[np.ndarray] = None,
                     normal: Optional[np.ndarray] = None, instance: Optional[np.ndarray] = None,
                     superpoint: Optional[np.ndarray] = None, max_points: Optional[int] = None) -> Downsampled:
    """One representative per occupied voxel of ``voxel_size`` metres (per voxel and instance when
    ``instance`` is given); see the module docstring. ``max_points``: grow the voxel until at most this many
    representatives remain (it cannot go below one row per instance present).

    Raises ``ValueError`` for a non-positive voxel size or ``max_points``, arrays of the wrong shape, or
    an empty or non-finite ``coord``.
    """
    coord = np.asarray(coord)
    if coord.ndim != 2 or coord.shape[1] != 3 or coord.shape[0] == 0:
        raise ValueError(f"coord must be a non-empty [N, 3] array, got shape {coord.shape}")
    if not np.isfinite(coord).all():
        raise ValueError("coord holds NaN or inf values")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points must be >= 1 (or None), got {max_points}")
    n = coord.shape[0]
    for name, a in (("color", color), ("normal", normal), ("instance", instance), ("superpoint", superpoint)):
        if a is not None and np.asarray(a).shape[0] != n:
            raise ValueError(f"{name} has {np.asarray(a).shape[0]} rows but coord has {n}")

    extent = float((coord.max(0) - coord.min(0)).max())
    voxel = float(voxel_size)
    for _ in range(MAX_ROUNDS):
        first, inverse, v = _group(coord, voxel, instance)
        if max_points is None or v <= max_points or voxel > 2 * extent:  # one voxel holds the scene
            break
        voxel *= max(MIN_GROWTH, math.sqrt(v / max_points))
        del first, inverse
    counts = np.bincount(inverse, minlength=v)
    out_coord = _mean(coord, inverse, counts).astype(np.float32)
    out_color = out_normal = None
    if color is not None:
        out_color = np.clip(np.round(_mean(np.asarray(color), inverse, counts)), 0, 255).astype(np.uint8)
    if normal is not None:
        m = _mean(np.asarray(normal), inverse, counts)
        length = np.linalg.norm(m, axis=1, keepdims=True)
        fallback = np.asarray(normal)[first].astype(np.float64)  # opposite normals cancel: keep the first one
        out_normal = np.where(length > 1e-6, m / np.maximum(length, 1e-12), fallback).astype(np.float32)
    out_instance = None if instance is None else np.asarray(instance)[first].astype(np.int64)
    out_superpoint = None if superpoint is None else np.asarray(superpoint)[first].astype(np.int64)
    return Downsampled(out_coord, out_color, out_normal, out_instance, out_superpoint, inverse, counts, voxel,
                       float(voxel_size))


__all__ = ["Downsampled", "voxel_downsample"]
