"""Spatial token gating op ``scene3d::token_gate``: public wrapper, pure-PyTorch reference, fake and autograd.

The op keeps the most useful object tokens of each scene of a ragged batch, scales each kept token by its score
(so the scorer receives a gradient) and compacts the batch.

Selection rule (the reference below is the spec; the C++/CUDA kernels in ``ops/`` follow it exactly). For
scene ``b`` with ``n`` tokens (rows ``offset[b-1]:offset[b]``):

1. rank the scene's tokens by score descending, ties by lower row index (deterministic);
2. ``k = min(n, max(min_keep, ceil(keep_ratio * n)))`` candidates are the ``k`` best-ranked tokens
   (``ceil`` of the float64 product, so e.g. ``0.1 * 30 = 3.0000000000000004`` gives 4);
3. candidates with ``float64(score) < threshold`` are dropped, but never below ``min(min_keep, n)`` tokens
   (the best-ranked ones stay);
4. kept tokens stay in their original order.

Shapes (``M`` tokens in ``B`` scenes, ``K`` kept):

=================  ==========  ======  =============================================================
name               shape       dtype   meaning
=================  ==========  ======  =============================================================
tokens             [M, C]      float   object tokens of all scenes, concatenated
scores             [M]         float   gate of each token (same dtype as tokens), e.g. in (0, 1)
offset             [B]         int     cumulative token counts, ``offset[-1] == M``; empty scenes ok
gated              [K, C]      float   ``tokens[kept_index] * scores[kept_index, None]``
kept_index         [K]         int64   global row of each kept token, increasing
new_offset         [B]         int64   cumulative kept counts
=================  ==========  ======  =============================================================

Gradients: ``grad_tokens[kept] = grad_gated * scores[kept, None]`` (zero elsewhere) and
``grad_scores[kept] = (grad_gated * tokens[kept]).sum(-1)`` (zero elsewhere); ``kept_index`` and
``new_offset`` are integer outputs without gradient. Supported dtypes: float32, float64, float16, bfloat16.

The compiled op is loaded from ``scene3d._C`` (built by ``pip install --no-build-isolation -e .``); where it is
not importable, :func:`token_gate` falls back to :func:`token_gate_reference` and warns once.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

__all__ = ["TokenGateResult", "token_gate", "token_gate_reference", "has_native_op", "validate_token_gate_inputs"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class TokenGateResult(NamedTuple):
    """Output of :func:`token_gate` (shapes in the module docstring)."""

    gated: torch.Tensor  # (K, C)
    kept_index: torch.Tensor  # (K,) int64, global rows
    new_offset: torch.Tensor  # (B,) int64, cumulative


# --- native op: load, fake, autograd ---------------------------------------------------------------------------

def _load_native() -> bool:
    try:
        import scene3d._C  # noqa: F401  (registers torch.ops.scene3d.*)
    except ImportError:
        return False
    return hasattr(torch.ops.scene3d, "token_gate")


_HAS_NATIVE = _load_native()
_warned_fallback = False


def has_native_op() -> bool:
    """True when the compiled ``scene3d._C`` extension is loaded (``torch.ops.scene3d.token_gate`` exists)."""
    return _HAS_NATIVE


if _HAS_NATIVE:

    @torch.library.register_fake("scene3d::token_gate")
    def _token_gate_fake(tokens, scores, offset, keep_ratio, min_keep, threshold):
        k = torch.library.get_ctx().new_dynamic_size()
        return (
            tokens.new_empty((k, tokens.shape[1])),
            offset.new_empty((k,), dtype=torch.int64),
            offset.new_empty(offset.shape, dtype=torch.int64),
        )

    @torch.library.register_fake("scene3d::token_gate_backward")
    def _token_gate_backward_fake(grad_gated, tokens, scores, kept_index):
        return torch.empty_like(tokens), torch.empty_like(scores)

    def _setup_context(ctx, inputs, output):
        tokens, scores, *_ = inputs
        ctx.save_for_backward(tokens, scores, output[1])

    def _backward(ctx, grad_gated, _grad_kept, _grad_offset):
        tokens, scores, kept_index = ctx.saved_tensors
        if grad_gated is None:
            return None, None, None, None, None, None
        if torch.is_grad_enabled():
            # Double backward (create_graph=True): build the gradient from differentiable torch ops.
            grad_tokens, grad_scores = _backward_torch(grad_gated, tokens, scores, kept_index)
        else:
            grad_tokens, grad_scores = torch.ops.scene3d.token_gate_backward(
                grad_gated.contiguous(), tokens, scores, kept_index)
        return grad_tokens, grad_scores, None, None, None, None

    torch.library.register_autograd("scene3d::token_gate", _backward, setup_context=_setup_context)


def _backward_torch(grad_gated, tokens, scores, kept_index):
    grad_tokens = torch.zeros_like(tokens).index_copy(0, kept_index, grad_gated * scores[kept_index, None])
    grad_scores = torch.zeros_like(scores).index_copy(0, kept_index, (grad_gated * tokens[kept_index]).sum(-1))
    return grad_tokens, grad_scores


# --- validation -------------------------------------------------------------------------------------------------

def validate_token_gate_inputs(tokens, scores, offset, keep_ratio, min_keep, threshold) -> torch.Tensor:
    """Raise ``ValueError`` naming the argument on bad input; return ``offset`` as int64.

    One host sync (reads ``offset`` and checks ``scores`` for NaN).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a [M, C] tensor, got {_describe(tokens)}")
    if tokens.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"tokens must be float32/float64/float16/bfloat16, got {tokens.dtype}")
    m = tokens.shape[0]
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D [M] tensor, got {_describe(scores)}")
    if scores.shape[0] != m:
        raise ValueError(f"scores has {scores.shape[0]} entries but tokens has M={m} rows")
    if scores.dtype != tokens.dtype:
        raise ValueError(f"scores dtype {scores.dtype} must match tokens dtype {tokens.dtype}")
    if not isinstance(offset, torch.Tensor) or offset.dim() != 1:
        raise ValueError(f"offset must be a 1-D [B] tensor of cumulative counts, got {_describe(offset)}")
    if offset.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offset must be int32 or int64, got {offset.dtype}")
    if scores.device != tokens.device or offset.device != tokens.device:
        raise ValueError(f"tokens ({tokens.device}), scores ({scores.device}) and offset ({offset.device}) "
                         "must be on one device")
    if not isinstance(keep_ratio, (int, float)) or not (0.0 <= float(keep_ratio) <= 1.0):
        raise ValueError(f"keep_ratio must be a number in [0, 1], got {keep_ratio!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep must be a non-negative int, got {min_keep!r}")
    if not isinstance(threshold, (int, float)) or math.isnan(float(threshold)):
        raise ValueError(f"threshold must be a number (use -inf to disable), got {threshold!r}")
    offset = offset.long()
    if offset.numel():
        off = offset.cpu()
        if off[0] < 0 or bool((off[1:] < off[:-1]).any()):
            raise ValueError(f"offset must be non-negative and non-decreasing (cumulative counts), "
                             f"got {_head(off)}")
        if int(off[-1]) != m:
            raise ValueError(f"offset[-1] must equal M={m} (number of tokens), got {int(off[-1])}")
    elif m != 0:
        raise ValueError(f"offset is empty (B=0) but tokens has M={m} rows")
    if bool(torch.isnan(scores.detach()).any()):
        raise ValueError(f"scores contains NaN at rows {_head(torch.isnan(scores.detach()).nonzero().flatten())}")
    return offset


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _head(t: torch.Tensor, n: int = 10) -> str:
    vals = t.flatten()[:n].tolist()
    return str(vals)[:-1] + (", ...]" if t.numel() > n else "]")


# --- reference (the spec) ---------------------------------------------------------------------------------------

def token_gate_reference(tokens: torch.Tensor, scores: torch.Tensor, offset: torch.Tensor, keep_ratio: float,
                         min_keep: int = 1, threshold: float = -math.inf, *, validate: bool = True
                         ) -> TokenGateResult:
    """Pure-PyTorch token gating: the spec of the op and its test oracle (rule in the module docstring).

    Vectorised over the whole ragged batch (two stable sorts give every token its rank inside its scene); fully
    differentiable through ordinary autograd. Validates its input like :func:`token_gate` unless
    ``validate=False``.
    """
    if validate:
        offset = validate_token_gate_inputs(tokens, scores, offset, keep_ratio, min_keep, threshold)
    else:
        offset = offset.long()
    device = tokens.device
    b = offset.numel()
    counts = torch.diff(offset, prepend=offset.new_zeros(1))  # (B,)
    batch = torch.repeat_interleave(torch.arange(b, device=device), counts)  # (M,)
    starts = offset - counts  # (B,)
    s = scores.detach()
    # Rank inside each scene: score descending with ties by lower index (stable sort), then group by scene
    # (stable again, so the score order survives inside each scene).
    by_score = torch.sort(s, descending=True, stable=True).indices
    order = by_score[torch.sort(batch[by_score], stable=True).indices]  # (M,) rows grouped by scene, ranked
    rank_sorted = torch.arange(order.numel(), device=device) - starts[batch[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (M,) rank of each row in its scene
    k = torch.minimum(counts, torch.clamp(torch.ceil(keep_ratio * counts.double()).long(), min=min_keep))
    floor_keep = torch.clamp(counts, max=min_keep)
    keep = (rank < k[batch]) & ((s.double() >= threshold) | (rank < floor_keep[batch]))
    kept_index = keep.nonzero().flatten()  # (K,) increasing
    new_offset = torch.cumsum(torch.bincount(batch[kept_index], minlength=b), 0)
    gated = tokens.index_select(0, kept_index) * scores.index_select(0, kept_index).unsqueeze(1)  # (K, C)
    return TokenGateResult(gated, kept_index, new_offset)


# --- public wrapper ---------------------------------------------------------------------------------------------

def token_gate(tokens: torch.Tensor, scores: torch.Tensor, offset: torch.Tensor, keep_ratio: float = 1.0,
               min_keep: int = 1, threshold: float = -math.inf, *, validate: bool = True) -> TokenGateResult:
    """Keep the best-scored tokens of each scene, scale them by their score and compact the ragged batch.

    Args:
        tokens: ``[M, C]`` float tokens; scores: ``[M]`` same dtype; offset: ``[B]`` cumulative counts.
        keep_ratio: in ``[0, 1]``; at most ``ceil(keep_ratio * n)`` (but at least ``min_keep``) tokens per scene.
        min_keep: every scene keeps ``min(min_keep, n)`` tokens, whatever the ratio and threshold.
        threshold: candidates with score below it are dropped (``-inf`` disables).
        validate: check the input (one host sync); set False only for input already validated.

    Returns:
        :class:`TokenGateResult` ``(gated [K, C], kept_index [K] int64, new_offset [B] int64)``.

    Raises:
        ValueError: wrong dtypes or shapes, mismatched lengths, offsets not non-decreasing or not ending at M,
            NaN scores, keep_ratio outside [0, 1], negative min_keep.
    """
    if validate:
        offset = validate_token_gate_inputs(tokens, scores, offset, keep_ratio, min_keep, threshold)
    else:
        offset = offset.long()
    if not _HAS_NATIVE:
        global _warned_fallback
        if not _warned_fallback:
            warnings.warn("scene3d._C is not importable (extension not built): token_gate uses the pure-PyTorch "
                          "reference; build it with `pip install --no-build-isolation -e .`", RuntimeWarning,
                          stacklevel=2)
            _warned_fallback = True
        return token_gate_reference(tokens, scores, offset, keep_ratio, min_keep, threshold, validate=False)
    gated, kept_index, new_offset = torch.ops.scene3d.token_gate(
        tokens, scores, offset, float(keep_ratio), int(min_keep), float(threshold))
    return TokenGateResult(gated, kept_index, new_offset)
