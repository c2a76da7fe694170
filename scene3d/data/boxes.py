"""Axis-aligned boxes of the instances of a point cloud (read by the scene loaders, written by data_prep)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ObjectBoxes(NamedTuple):
    """Axis-aligned boxes of the instances of a point cloud.

    ==========  ===========  ==========================================
    field       shape        meaning
    ==========  ===========  ==========================================
    ``ids``     [K] int64    instance ids present (ascending, >= 0)
    ``min``     [K, 3] f8    per-instance minimum corner
    ``max``     [K, 3] f8    per-instance maximum corner
    ``count``   [K] int64    points per instance
    ==========  ===========  ==========================================
    """

    ids: np.ndarray
    min: np.ndarray
    max: np.ndarray
    count: np.ndarray

    @property
    def center(self) -> np.ndarray:
        return (self.min + self.max) / 2

    @property
    def size(self) -> np.ndarray:
        return self.max - self.min


def compute_object_boxes(coord: np.ndarray, instance: np.ndarray) -> ObjectBoxes:
    """Boxes over the points of each instance id ``>= 0`` (one sort + ``reduceat``; no per-object mask)."""
    if coord.shape[0] != instance.shape[0]:
        raise ValueError(f"coord has {coord.shape[0]} rows but instance has {instance.shape[0]}")
    sel = np.flatnonzero(instance >= 0)
    if sel.size == 0:
        z = np.zeros((0, 3))
        return ObjectBoxes(np.zeros(0, np.int64), z, z.copy(), np.zeros(0, np.int64))
    inst = instance[sel]
    order = np.argsort(inst, kind="stable")
    inst_sorted = inst[order]
    pts = coord[sel[order]].astype(np.float64)
    ids, starts, counts = np.unique(inst_sorted, return_index=True, return_counts=True)
    return ObjectBoxes(ids.astype(np.int64), np.minimum.reduceat(pts, starts, axis=0),
                       np.maximum.reduceat(pts, starts, axis=0), counts.astype(np.int64))
