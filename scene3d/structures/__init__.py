"""Core data structures: ragged batches of points (and, later, object tokens)."""

from scene3d.structures.ragged import batch_from_offset, counts_from_offset, offset_from_batch, offset_from_counts
from scene3d.structures.objects import ObjectTokens
from scene3d.structures.points import PointBatch

__all__ = ["ObjectTokens", "PointBatch", "batch_from_offset", "counts_from_offset", "offset_from_batch", "offset_from_counts"]
