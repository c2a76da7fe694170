"""Ragged-batch index conversions, in one place.

A ragged batch stores B variable-length items concatenated along dim 0 plus ``offset``: the *cumulative*
end index of each item (Pointcept convention), so item ``b`` spans ``[offset[b-1], offset[b])`` with
``offset[-1] == N``. Everything else (``batch`` index per row, counts) is derived here and only here.
"""

from __future__ import annotations

import torch


def _check_offset(offset: torch.Tensor, name: str = "offset") -> None:
    if offset.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(offset.shape)}")
    if offset.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor, got {offset.dtype}")
    if offset.numel() and (offset[0] < 0 or (offset[1:] < offset[:-1]).any()):
        raise ValueError(f"{name} must be non-negative and non-decreasing (cumulative counts), got {offset.tolist()}")


def counts_from_offset(offset: torch.Tensor) -> torch.Tensor:
    """Per-item lengths ``[B]`` from cumulative ``offset [B]``."""
    _check_offset(offset)
    return torch.diff(offset.long(), prepend=offset.new_zeros(1, dtype=torch.long))


def offset_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Cumulative ``offset [B]`` (int64) from per-item lengths ``[B]``."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    if (counts < 0).any():
        raise ValueError(f"counts must be non-negative, got {counts.tolist()}")
    return torch.cumsum(counts, 0)


def batch_from_offset(offset: torch.Tensor) -> torch.Tensor:
    """Item index of every row ``[N]`` (int64) from ``offset [B]``; empty items are allowed."""
    counts = counts_from_offset(offset)
    return torch.repeat_interleave(torch.arange(len(counts), device=offset.device), counts)


def offset_from_batch(batch: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Inverse of :func:`batch_from_offset`; ``batch`` must be sorted (rows grouped by item)."""
    if batch.numel() and (batch[1:] < batch[:-1]).any():
        raise ValueError("batch index must be sorted (rows grouped by item)")
    if batch_size is None:
        batch_size = int(batch.max()) + 1 if batch.numel() else 0
    counts = torch.bincount(batch.long(), minlength=batch_size)
    if len(counts) > batch_size:
        raise ValueError(f"batch index holds {len(counts)} items but batch_size={batch_size}")
    return torch.cumsum(counts, 0)
