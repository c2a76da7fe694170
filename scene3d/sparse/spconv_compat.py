"""The one door to spconv: every spconv use in scene3d imports from here, never ``spconv`` directly.

spconv 2.3.8's CPU build has defects, measured on this machine (torch 2.13 CPU, 2 cores); this module
works around them once, at import, so the rest of the project can use spconv as documented:

====  =====================================================  ==============================================
#     defect (CPU build)                                     what this module does
====  =====================================================  ==============================================
1     backward calls ``torch.cuda.current_stream()`` even    replaces ``get_current_stream`` (defined in
      for CPU tensors -> ``AssertionError: Torch not          ``spconv.pytorch.cppcore`` and imported *by name*
      compiled with CUDA enabled``                            into ``ops``, ``hash``, quantization modules)
                                                             with one returning stream 0 when CUDA is absent
2     with more than one torch thread, CPU conv outputs     runs the forward *and* backward of every spconv
      and gradients are wrong and change run to run (races   autograd ``Function`` and every conv/pool module
      once a layer has a few thousand pairs; measured up to  forward (indice-pair building) on one thread
      ~0.8 off a dense ``conv3d``); one thread matches to    (:func:`single_thread`), restoring the previous
      ~1e-6                                                  count afterwards; CUDA inputs are left alone
3     indices are read as if row-major: ``Tensor.nonzero``   :class:`SparseConvTensor` construction makes the
      returns a column-major [N, 4] tensor in torch 2.13,    indices contiguous; :func:`sparse_tensor` also
      whose neighbour maps then come out silently wrong      validates them
====  =====================================================  ==============================================

Other limits of the CPU build, avoided rather than patched: only ``ConvAlgo.Native`` runs on CPU (spconv
picks it itself in a CPU-only build), and ``SparseGlobalMaxPool`` / ``SparseGlobalAvgPool`` are not
implemented on CPU (their ``global_pool_rearrange`` kernel is CUDA-only) -- use :func:`global_pool`, which
reduces per batch item with torch's native ``scatter_reduce``.

Noise: constructing a ``SparseConvTensor`` (its metaclass is torch.fx's ``ProxyableClassMeta``) makes torch
log a deprecation warning about ``is_fx_tracing``; that one message is filtered where torch logs it
(:class:`_DropFxTracingWarning`).

Re-exported: ``spconv`` (= ``spconv.pytorch``), ``SparseConvTensor``, ``SubMConv3d``, ``SparseConv3d``,
``SparseInverseConv3d``, ``SparseSequential``, ``SparseModule``, ``ConvAlgo``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

import spconv.pytorch as spconv  # noqa: E402  (the one direct import in the project)
import spconv.pytorch.conv as _sp_conv
import spconv.pytorch.cppcore as _sp_cppcore
import spconv.pytorch.functional as _sp_functional
import spconv.pytorch.pool as _sp_pool
from spconv.pytorch import (
    ConvAlgo,
    SparseConv3d,
    SparseConvTensor,
    SparseInverseConv3d,
    SparseModule,
    SparseSequential,
    SubMConv3d,
)

__all__ = [
    "ConvAlgo",
    "PatchReport",
    "SparseConv3d",
    "SparseConvTensor",
    "SparseInverseConv3d",
    "SparseModule",
    "SparseSequential",
    "SubMConv3d",
    "apply_patches",
    "global_pool",
    "patch_report",
    "single_thread",
    "sparse_tensor",
    "spconv",
]

_PATCH_FLAG = "_scene3d_compat_patched"


# ---- noise: torch.fx's is_fx_tracing deprecation warning ------------------------------------------------
class _DropFxTracingWarning(logging.Filter):
    """Drops torch's "is_fx_tracing will return true for both fx.symbolic_trace and torch.export ..." record.

    Source: ``SparseConvTensor``'s metaclass is ``torch.fx.ProxyableClassMeta``, whose ``__call__`` asks the
    deprecated ``torch.fx._symbolic_trace.is_fx_tracing()`` on every construction (ours in
    :func:`sparse_tensor`, and spconv's own in ``replace_feature`` inside every conv); torch logs the
    warning through the ``torch.fx._symbolic_trace`` logger the first time. The call is spconv's, not ours,
    and we never trace spconv with fx, so the record carries nothing to act on. Only this message is
    dropped; every other record of that logger passes.
    """

    MESSAGE_START = "is_fx_tracing will return true"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.MESSAGE_START)


def _install_fx_warning_filter() -> None:
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    if not any(isinstance(f, _DropFxTracingWarning) for f in fx_log.filters):
        fx_log.addFilter(_DropFxTracingWarning())


_install_fx_warning_filter()


class PatchReport(NamedTuple):
    """What :func:`apply_patches` changed (module / class names), for logs and tests."""

    stream_modules: tuple[str, ...]  # modules whose ``get_current_stream`` now tolerates CPU-only torch
    single_thread_targets: tuple[str, ...]  # ``Class.method`` now run on one thread for CPU tensors
    contiguous_indices: bool  # SparseConvTensor makes its indices contiguous


# ---- defect 2: one thread around spconv CPU work ------------------------------------------------------
@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``; restore the previous count afterwards."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _any_cpu_tensor(values: Sequence) -> bool:
    """True if the call handles CPU data: a CPU tensor (or SparseConvTensor on CPU) and no CUDA tensor."""
    cpu = False
    for v in values:
        if isinstance(v, SparseConvTensor):
            v = v.features
        if isinstance(v, torch.Tensor):
            if v.is_cuda:
                return False
            cpu = True
    return cpu


def _single_threaded(fn: Callable) -> Callable:
    """Wrap ``fn`` so calls on CPU data run on one thread (CUDA calls are passed through untouched)."""
    if getattr(fn, _PATCH_FLAG, False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _any_cpu_tensor(args) or _any_cpu_tensor(tuple(kwargs.values())):
            with single_thread():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    setattr(wrapper, _PATCH_FLAG, True)
    return wrapper


def _wrap_method(cls: type, name: str, static: bool) -> str | None:
    original = cls.__dict__.get(name)
    if original is None:
        return None
    fn = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(fn, _PATCH_FLAG, False):
        return f"{cls.__name__}.{name}"
    wrapped = _single_threaded(fn)
    setattr(cls, name, staticmethod(wrapped) if static else wrapped)
    return f"{cls.__name__}.{name}"


def _patch_single_thread() -> list[str]:
    done = []
    # autograd Functions: forward runs the CPU gather-gemm-scatter, backward runs inside autograd.
    for _, cls in inspect.getmembers(_sp_functional, inspect.isclass):
        if issubclass(cls, torch.autograd.Function) and cls.__module__ == _sp_functional.__name__:
            for name in ("forward", "backward"):
                if (tag := _wrap_method(cls, name, static=True)) is not None:
                    done.append(tag)
    # module forwards: neighbour-map (indice pair) building happens here, outside the Functions.
    for cls in (_sp_conv.SparseConvolution, _sp_pool.SparseMaxPool, _sp_pool.SparseAvgPool):
        if (tag := _wrap_method(cls, "forward", static=False)) is not None:
            done.append(tag)
    return done


# ---- defect 1: CUDA stream asked for CPU tensors ------------------------------------------------------
_ORIGINAL_GET_STREAM = getattr(_sp_cppcore.get_current_stream, "__wrapped__", _sp_cppcore.get_current_stream)


def _get_current_stream_cpu_safe() -> int:
    """spconv's ``get_current_stream`` that returns the null stream (0) when torch has no CUDA."""
    if not torch.cuda.is_available():
        return 0
    return _ORIGINAL_GET_STREAM()


_get_current_stream_cpu_safe.__wrapped__ = _ORIGINAL_GET_STREAM  # type: ignore[attr-defined]


def _patch_stream() -> list[str]:
    if torch.cuda.is_available():
        return []  # CUDA torch: spconv's own function is right
    done = []
    # ``from spconv.pytorch.cppcore import get_current_stream`` copies the name into each importer, so
    # every loaded spconv module holding the original must be patched, not only cppcore.
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("spconv") or mod is None:
            continue
        if getattr(mod, "get_current_stream", None) is _ORIGINAL_GET_STREAM:
            mod.get_current_stream = _get_current_stream_cpu_safe
            done.append(mod_name)
    return sorted(done)


# ---- defect 3: column-major indices ---------------------------------------------------------------------
def _patch_contiguous_indices() -> bool:
    init = SparseConvTensor.__init__
    if getattr(init, _PATCH_FLAG, False):
        return True

    @functools.wraps(init)
    def __init__(self, features, indices, *args, **kwargs):
        if isinstance(indices, torch.Tensor) and not indices.is_contiguous():
            indices = indices.contiguous()
        init(self, features, indices, *args, **kwargs)

    setattr(__init__, _PATCH_FLAG, True)
    SparseConvTensor.__init__ = __init__
    return True


_REPORT: PatchReport | None = None


def apply_patches() -> PatchReport:
    """Apply the workarounds (idempotent; done once at import of this module)."""
    global _REPORT
    stream = _patch_stream()
    if _REPORT is not None:  # later imports of spconv submodules may hold the original name
        stream = sorted(set(stream) | set(_REPORT.stream_modules))
    _REPORT = PatchReport(
        stream_modules=tuple(stream),
        single_thread_targets=tuple(_patch_single_thread()),
        contiguous_indices=_patch_contiguous_indices(),
    )
    return _REPORT


def patch_report() -> PatchReport:
    """What the import-time :func:`apply_patches` changed."""
    return _REPORT if _REPORT is not None else apply_patches()


apply_patches()


# ---- helpers --------------------------------------------------------------------------------------------
def sparse_tensor(
    features: torch.Tensor,
    indices: torch.Tensor,
    spatial_shape: Sequence[int],
    batch_size: int,
) -> SparseConvTensor:
    """Build a validated :class:`SparseConvTensor`.

    ==============  ==================  ==========================================================
    argument        shape / dtype       meaning
    ==============  ==================  ==========================================================
    features        [V, C] float        one row per active voxel
    indices         [V, 4] int          (batch, x, y, z) per voxel; cast to contiguous int32
    spatial_shape   3 ints              grid extent; every coordinate must lie in [0, extent)
    batch_size      int >= 1            number of batch items; batch ids must lie in [0, batch_size)
    ==============  ==================  ==========================================================
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [V, C], got {tuple(features.shape)}")
    if indices.dim() != 2 or indices.shape[1] != 4:
        raise ValueError(f"indices must be [V, 4] (batch, x, y, z), got {tuple(indices.shape)}")
    if indices.shape[0] != features.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} rows but features has {features.shape[0]}")
    if indices.is_floating_point():
        raise ValueError(f"indices must be integer, got {indices.dtype}")
    shape = [int(s) for s in spatial_shape]
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"spatial_shape must be 3 positive ints, got {list(spatial_shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if indices.numel():
        lo = indices.min(0).values
        hi = indices.max(0).values
        if int(lo.min()) < 0:
            raise ValueError("indices must be non-negative")
        if int(hi[0]) >= batch_size:
            raise ValueError(f"batch index {int(hi[0])} >= batch_size {batch_size}")
        for d in range(3):
            if int(hi[d + 1]) >= shape[d]:
                raise ValueError(f"coordinate {int(hi[d + 1])} on axis {d} outside spatial_shape {shape}")
    return SparseConvTensor(features.contiguous(), indices.to(torch.int32).contiguous(), shape, int(batch_size))


def global_pool(x: SparseConvTensor, reduce: str = "mean") -> torch.Tensor:
    """Per batch item reduction of the features ``[batch_size, C]``; CPU-safe replacement of spconv's
    ``SparseGlobalAvgPool`` / ``SparseGlobalMaxPool`` (``reduce`` in ``mean``, ``amax``, ``sum``).

    Items with no voxel get zeros.
    """
    if reduce not in ("mean", "amax", "sum"):
        raise ValueError(f"reduce must be 'mean', 'amax' or 'sum', got {reduce!r}")
    feats = x.features
    batch = x.indices[:, 0].long()
    out = feats.new_zeros(x.batch_size, feats.shape[1])
    index = batch[:, None].expand_as(feats)
    return out.scatter_reduce(0, index, feats, reduce=reduce, include_self=False)
