"""Sparse convolution support: the spconv compatibility wrapper (import spconv only through it)."""

from scene3d.sparse.spconv_compat import (
    ConvAlgo,
    SparseConv3d,
    SparseConvTensor,
    SparseInverseConv3d,
    SparseModule,
    SparseSequential,
    SubMConv3d,
    global_pool,
    patch_report,
    single_thread,
    sparse_tensor,
    spconv,
)

__all__ = [
    "ConvAlgo", "SparseConv3d", "SparseConvTensor", "SparseInverseConv3d", "SparseModule", "SparseSequential",
    "SubMConv3d", "global_pool", "patch_report", "single_thread", "sparse_tensor", "spconv",
]
