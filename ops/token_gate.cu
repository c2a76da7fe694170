// CUDA kernels of scene3d::token_gate and its backward (rule: see token_gate.h).
//
// Forward, on the current stream:
//   1. count_kernel   (one block per scene): block-reduce #{score >= threshold} -> keep count f per scene;
//      new_offset = cumsum(f) on device, K = new_offset[-1] read back once (the output size is data dependent);
//   2. select_kernel  (one block per scene): in-block radix select of the f-th best score key (8 bits per pass
//      over order-preserving unsigned keys, histogram in shared memory), then one sweep in row order with two
//      block prefix sums (ties at the f-th key taken lowest index first; kept rows compacted in order);
//   3. gather_kernel  (grid-stride over kept rows): gated[r] = tokens[kept[r]] * scores[kept[r]].
// Backward: one block per kept row writes grad*score and block-reduces the dot product; other rows are zero.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>

#include "token_gate.h"

namespace scene3d {
namespace {

constexpr int kThreads = 256;

// float64 scores: the same order as token_gate_float_key (token_gate.h) on 64-bit keys.
__device__ __forceinline__ uint64_t double_key(double x) {
  if (isnan(x)) return 0ull;
  if (x == 0.0) x = 0.0;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(x));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}

template <typename scalar_t>
struct ScoreKey {
  using type = uint32_t;
  __device__ static type get(scalar_t v) { return token_gate_float_key(static_cast<float>(v)); }
};
template <>
struct ScoreKey<double> {
  using type = uint64_t;
  __device__ static type get(double v) { return double_key(v); }
};

template <typename scalar_t>
__global__ void count_kernel(const scalar_t* __restrict__ scores, const int64_t* __restrict__ offset,
                             double keep_ratio, int64_t min_keep, double threshold, int64_t* __restrict__ counts) {
  const int64_t b = blockIdx.x;
  const int64_t start = b ? offset[b - 1] : 0, end = offset[b];
  int64_t local = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x)
    local += static_cast<double>(static_cast<at::opmath_type<scalar_t>>(scores[i])) >= threshold;
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t total = Reduce(tmp).Sum(local);
  if (threadIdx.x == 0) counts[b] = token_gate_keep_count(end - start, keep_ratio, min_keep, total);
}

template <typename scalar_t>
__global__ void select_kernel(const scalar_t* __restrict__ scores, const int64_t* __restrict__ offset,
                              const int64_t* __restrict__ new_offset, int64_t* __restrict__ kept_index) {
  using key_t = typename ScoreKey<scalar_t>::type;
  constexpr int kBits = sizeof(key_t) * 8;
  const int64_t b = blockIdx.x;
  const int64_t start = b ? offset[b - 1] : 0, n = offset[b] - start;
  const int64_t out = b ? new_offset[b - 1] : 0, f = new_offset[b] - out;
  if (f == 0) return;
  if (f == n) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) kept_index[out + i] = start + i;
    return;
  }
  const scalar_t* s = scores + start;

  // Radix select: after the passes, `prefix` is the key of the f-th best row and `remaining` is how many rows
  // with exactly that key are kept (the others kept rows have larger keys).
  __shared__ int hist[256];
  __shared__ key_t s_prefix;
  __shared__ int64_t s_remaining;
  key_t prefix = 0, mask = 0;
  int64_t remaining = f;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const key_t key = ScoreKey<scalar_t>::get(s[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFF], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t rem = remaining;
      int d = 255;
      for (; d > 0; --d) {
        if (hist[d] >= rem) break;
        rem -= hist[d];
      }
      s_prefix = prefix | (static_cast<key_t>(d) << shift);
      s_remaining = rem;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= static_cast<key_t>(0xFF) << shift;
    __syncthreads();
  }

  // Sweep in row order: keep key > kth, and the first `remaining` rows with key == kth; compact by prefix sum.
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  int64_t eq_base = 0, keep_base = 0;
  for (int64_t chunk = 0; chunk < n; chunk += kThreads) {
    const int64_t i = chunk + threadIdx.x;
    int gt = 0, eq = 0;
    if (i < n) {
      const key_t key = ScoreKey<scalar_t>::get(s[i]);
      gt = key > prefix;
      eq = key == prefix;
    }
    int eq_rank, eq_total;
    Scan(scan_tmp).ExclusiveSum(eq, eq_rank, eq_total);
    __syncthreads();
    const int keep = gt || (eq && eq_base + eq_rank < remaining);
    int pos, keep_total;
    Scan(scan_tmp).ExclusiveSum(keep, pos, keep_total);
    __syncthreads();
    if (keep) kept_index[out + keep_base + pos] = start + i;
    eq_base += eq_total;
    keep_base += keep_total;
  }
}

template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* __restrict__ tokens, const scalar_t* __restrict__ scores,
                              const int64_t* __restrict__ kept, int64_t K, int64_t C, scalar_t* __restrict__ gated) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < K; r += gridDim.x) {
    const int64_t i = kept[r];
    const opmath_t w = static_cast<opmath_t>(scores[i]);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      gated[r * C + c] = static_cast<scalar_t>(static_cast<opmath_t>(tokens[i * C + c]) * w);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ tokens,
                                const scalar_t* __restrict__ scores, const int64_t* __restrict__ kept, int64_t K,
                                int64_t C, scalar_t* __restrict__ grad_tokens, scalar_t* __restrict__ grad_scores) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  for (int64_t r = blockIdx.x; r < K; r += gridDim.x) {
    const int64_t i = kept[r];
    const opmath_t w = static_cast<opmath_t>(scores[i]);
    acc_t acc = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const opmath_t g = static_cast<opmath_t>(grad[r * C + c]);
      grad_tokens[i * C + c] = static_cast<scalar_t>(g * w);
      acc += static_cast<acc_t>(g) * static_cast<acc_t>(tokens[i * C + c]);
    }
    const acc_t total = Reduce(tmp).Sum(acc);
    if (threadIdx.x == 0) grad_scores[i] = static_cast<scalar_t>(total);
    __syncthreads();  // tmp is reused by the next row
  }
}

int64_t row_blocks(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, 65535)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_gate_cuda(const at::Tensor& tokens, const at::Tensor& scores,
                                                               const at::Tensor& offset, double keep_ratio,
                                                               int64_t min_keep, double threshold) {
  token_gate_check_args(tokens, scores, offset, keep_ratio, min_keep);
  TORCH_CHECK(tokens.is_cuda(), "token_gate_cuda: expected CUDA tensors");
  c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor tok = tokens.contiguous(), sc = scores.contiguous(), off = offset.contiguous();
  const int64_t M = tok.size(0), C = tok.size(1), B = off.numel();
  {
    const at::Tensor off_host = off.cpu();  // B values; validated on the host (one small copy)
    const int64_t* p = off_host.data_ptr<int64_t>();
    token_gate_check_offset(p, B, M);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(p[b] - (b ? p[b - 1] : 0) <= INT_MAX, "token_gate_cuda: a scene holds more than INT_MAX tokens");
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::empty({B}, off.options());
  at::Tensor kept_index, gated, new_offset;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "token_gate_cuda", [&] {
    if (B > 0) {
      count_kernel<scalar_t><<<B, kThreads, 0, stream>>>(sc.data_ptr<scalar_t>(), off.data_ptr<int64_t>(),
                                                         keep_ratio, min_keep, threshold,
                                                         counts.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    new_offset = at::cumsum(counts, 0);
    const int64_t K = B > 0 ? new_offset[B - 1].item<int64_t>() : 0;
    kept_index = at::empty({K}, off.options());
    gated = at::empty({K, C}, tok.options());
    if (K == 0) return;
    select_kernel<scalar_t><<<B, kThreads, 0, stream>>>(sc.data_ptr<scalar_t>(), off.data_ptr<int64_t>(),
                                                        new_offset.data_ptr<int64_t>(),
                                                        kept_index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (C > 0) {
      gather_kernel<scalar_t><<<row_blocks(K), kThreads, 0, stream>>>(
          tok.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), kept_index.data_ptr<int64_t>(), K, C,
          gated.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gated, kept_index, new_offset};
}

std::tuple<at::Tensor, at::Tensor> token_gate_backward_cuda(const at::Tensor& grad_gated, const at::Tensor& tokens,
                                                            const at::Tensor& scores, const at::Tensor& kept_index) {
  token_gate_check_backward_args(grad_gated, tokens, scores, kept_index);
  TORCH_CHECK(tokens.is_cuda(), "token_gate_backward_cuda: expected CUDA tensors");
  c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor g = grad_gated.contiguous(), tok = tokens.contiguous(), sc = scores.contiguous(),
                   kept = kept_index.contiguous();
  const int64_t C = tok.size(1), K = kept.numel();
  at::Tensor grad_tokens = at::zeros_like(tok);
  at::Tensor grad_scores = at::zeros_like(sc);
  if (K == 0) return {grad_tokens, grad_scores};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "token_gate_backward_cuda", [&] {
    backward_kernel<scalar_t><<<row_blocks(K), kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), tok.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), kept.data_ptr<int64_t>(), K, C,
        grad_tokens.data_ptr<scalar_t>(), grad_scores.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_tokens, grad_scores};
}

TORCH_LIBRARY_IMPL(scene3d, CUDA, m) {
  m.impl("token_gate", &token_gate_cuda);
  m.impl("token_gate_backward", &token_gate_backward_cuda);
}

}  // namespace scene3d
