// CPU kernels of scene3d::token_gate and its backward (rule: see token_gate.h).
//
// Forward:
//   1. over scenes (at::parallel_for once the batch is large enough to pay for a fork/join): count scores >=
//      threshold, get the keep count f, pick the f best rows with std::nth_element (O(n)) over integer keys
//      that encode the whole rank order, and read the kept rows back in row order from a flag array (O(n));
//   2. serially: the prefix sum of the counts and the global kept indices (K int64 writes, microseconds);
//   3. over kept rows: gated[r] = tokens[kept[r]] * scores[kept[r]] (one fused read-scale-write pass).
// Backward, one pass over all M rows: kept rows get grad*score and a dot product, the others zeros.
//
// What the profile (perf, 2 cores, 8x300x1024 and 8x4096x1024 fp32) showed and what answers it here:
//   - most of the large forward/backward was the kernel faulting fresh output pages in 4 KiB at a time
//     (exc_page_fault, clear_page_erms, the page-table lock shared by both threads): outputs of several MiB
//     come straight from mmap. `empty_rows` advises transparent huge pages on them before the first write,
//     512x fewer faults (torch's THP_MEM_ALLOC_ENABLE does the same, but process-wide and opt-in);
//   - the backward's dot product was a scalar float64 dependency chain (a float reduction is not vectorised
//     without -ffast-math): it now runs in kLanes independent float64 accumulators, which the compiler
//     vectorises, and the row functions are built for AVX-512, AVX2 and baseline x86-64 with one picked at
//     load time (target_clones), since setup.py compiles for the baseline ISA;
//   - the two small serial passes (kept indices, and the selection of batches under 16k tokens) no longer
//     fork/join threads: with 2 busy cores a parallel region costs more than the work (libgomp's spin-wait
//     was a third of the profile of a 8x300x1024 forward+backward).
// Tried and left out: non-temporal stores for outputs far beyond the caches (no gain measurable under load).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "token_gate.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define SCENE3D_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SCENE3D_CLONES
#endif

namespace scene3d {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr int kLanes = 16;

// Rows per parallel task in the row passes: about 64 KiB of payload each.
int64_t row_grain(int64_t C, int64_t elem_size) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, C * elem_size));
}

// at::empty({R, C}) with transparent huge pages advised on its whole 2 MiB pages (see the header comment).
at::Tensor empty_rows(int64_t R, int64_t C, const at::TensorOptions& options) {
  at::Tensor t = at::empty({R, C}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = t.nbytes();
  if (nbytes >= 2 * kHugePage) {
    const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t a = (p + kHugePage - 1) & ~(kHugePage - 1), e = (p + nbytes) & ~(kHugePage - 1);
    if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advice: failure is harmless
  }
#endif
  return t;
}

// --- row kernels ------------------------------------------------------------------------------------------------

// dst[c] = src[c] * w. Plain stores (the result stays in cache for the next op).
SCENE3D_CLONES void scale_row_f32(const float* __restrict src, float* __restrict dst, float w, int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] = src[c] * w;
}

// dst[c] = g[c] * w and returns sum_c g[c] * t[c] in float64, accumulated in kLanes independent lanes.
SCENE3D_CLONES double scale_dot_row_f32(const float* __restrict g, const float* __restrict t,
                                        float* __restrict dst, float w, int64_t C) {
  double acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      dst[c + j] = g[c + j] * w;
      acc[j] += static_cast<double>(g[c + j]) * static_cast<double>(t[c + j]);
    }
  }
  double sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  for (; c < C; ++c) {
    dst[c] = g[c] * w;
    sum += static_cast<double>(g[c]) * static_cast<double>(t[c]);
  }
  return sum;
}

SCENE3D_CLONES void scale_row_f64(const double* __restrict src, double* __restrict dst, double w, int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] = src[c] * w;
}

SCENE3D_CLONES double scale_dot_row_f64(const double* __restrict g, const double* __restrict t,
                                        double* __restrict dst, double w, int64_t C) {
  double acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      dst[c + j] = g[c + j] * w;
      acc[j] += g[c + j] * t[c + j];
    }
  }
  double sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  for (; c < C; ++c) {
    dst[c] = g[c] * w;
    sum += g[c] * t[c];
  }
  return sum;
}

// Half and bfloat16: the product is formed in float and rounded once (as torch's own mul does), the dot
// product accumulated in float (acc_type), in lanes as above.
template <typename scalar_t>
void scale_row(const scalar_t* src, scalar_t* dst, scalar_t w_s, int64_t C) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t w = static_cast<opmath_t>(w_s);
  for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(static_cast<opmath_t>(src[c]) * w);
}
template <>
void scale_row<float>(const float* src, float* dst, float w, int64_t C) { scale_row_f32(src, dst, w, C); }
template <>
void scale_row<double>(const double* src, double* dst, double w, int64_t C) { scale_row_f64(src, dst, w, C); }

template <typename scalar_t>
scalar_t scale_dot_row(const scalar_t* g, const scalar_t* t, scalar_t* dst, scalar_t w_s, int64_t C) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const opmath_t w = static_cast<opmath_t>(w_s);
  acc_t acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const opmath_t gc = static_cast<opmath_t>(g[c + j]);
      dst[c + j] = static_cast<scalar_t>(gc * w);
      acc[j] += static_cast<acc_t>(gc) * static_cast<acc_t>(t[c + j]);
    }
  }
  acc_t sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  for (; c < C; ++c) {
    const opmath_t gc = static_cast<opmath_t>(g[c]);
    dst[c] = static_cast<scalar_t>(gc * w);
    sum += static_cast<acc_t>(gc) * static_cast<acc_t>(t[c]);
  }
  return static_cast<scalar_t>(sum);
}
template <>
float scale_dot_row<float>(const float* g, const float* t, float* dst, float w, int64_t C) {
  return static_cast<float>(scale_dot_row_f32(g, t, dst, w, C));
}
template <>
double scale_dot_row<double>(const double* g, const double* t, double* dst, double w, int64_t C) {
  return scale_dot_row_f64(g, t, dst, w, C);
}

// The rows i < n with flag[i] set, in increasing order, written to `out`.
inline void flagged_rows(const std::vector<uint8_t>& flag, int64_t n, int64_t* out) {
  for (int64_t i = 0, r = 0; i < n; ++i)
    if (flag[i]) out[r++] = i;
}

// Scene-local indices of the f best rows of one scene, in row order, written to `out`.
// float / half / bfloat16 scores: one uint64 per row, (score key << 32) | (2^32 - 1 - row), so the strict
// total order of the rule (score descending, ties by lower row, NaN last) is a plain integer comparison, and
// nth_element runs on integers instead of a comparator with NaN branches (the selection was about half of a
// 8x300x1024 forward). The kept rows are then flagged and read back in row order (O(n), no sort).
template <typename scalar_t>
void select_top_rows(const scalar_t* s, int64_t n, int64_t f, int64_t* out, std::vector<uint64_t>& keys,
                     std::vector<uint8_t>& flag) {
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i)
    keys[i] = (static_cast<uint64_t>(token_gate_float_key(static_cast<float>(s[i]))) << 32) | (0xFFFFFFFFull - i);
  std::nth_element(keys.begin(), keys.begin() + (f - 1), keys.end(), std::greater<uint64_t>());
  flag.assign(n, 0);
  for (int64_t j = 0; j < f; ++j) flag[0xFFFFFFFFull - (keys[j] & 0xFFFFFFFFull)] = 1;
  flagged_rows(flag, n, out);
}

// float64 scores: the same order with a comparator (a float64 key and the row do not fit one integer).
template <>
void select_top_rows<double>(const double* s, int64_t n, int64_t f, int64_t* out, std::vector<uint64_t>& keys,
                             std::vector<uint8_t>& flag) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  auto better = [s](int64_t a, int64_t c) {
    const double x = s[a], y = s[c];
    if (x > y) return true;
    if (x < y) return false;
    const bool nx = std::isnan(x), ny = std::isnan(y);
    if (nx != ny) return ny;
    return a < c;
  };
  std::nth_element(order.begin(), order.begin() + (f - 1), order.end(), better);
  flag.assign(n, 0);
  for (int64_t j = 0; j < f; ++j) flag[order[j]] = 1;
  flagged_rows(flag, n, out);
}

template <typename scalar_t>
void select_scenes(const scalar_t* sp, const int64_t* off, int64_t B, int64_t M, double keep_ratio,
                   int64_t min_keep, double threshold, int64_t* sel, int64_t* counts) {
  // Scenes are few and a fork/join costs more than selecting a few thousand scores: only large batches
  // run in parallel (one scene per task).
  const int64_t grain = M >= (int64_t{1} << 14) ? 1 : std::max<int64_t>(B, 1);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys;
    std::vector<uint8_t> flag;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b ? off[b - 1] : 0;
      const int64_t n = off[b] - start;
      TORCH_CHECK(n <= int64_t{0xFFFFFFFF}, "token_gate: a scene holds ", n, " tokens, more than 2^32 - 1");
      const scalar_t* s = sp + start;
      int64_t num_ge = 0;
      for (int64_t i = 0; i < n; ++i) num_ge += static_cast<double>(s[i]) >= threshold;
      const int64_t f = token_gate_keep_count(n, keep_ratio, min_keep, num_ge);
      counts[b] = f;
      int64_t* out = sel + start;
      if (f == n) {
        std::iota(out, out + n, int64_t{0});
      } else if (f > 0) {
        select_top_rows<scalar_t>(s, n, f, out, keys, flag);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_gate_cpu(const at::Tensor& tokens, const at::Tensor& scores,
                                                              const at::Tensor& offset, double keep_ratio,
                                                              int64_t min_keep, double threshold) {
  token_gate_check_args(tokens, scores, offset, keep_ratio, min_keep);
  TORCH_CHECK(tokens.device().is_cpu(), "token_gate_cpu: expected CPU tensors");
  const at::Tensor tok = tokens.contiguous(), sc = scores.contiguous(), off = offset.contiguous();
  const int64_t M = tok.size(0), C = tok.size(1), B = off.numel();
  const int64_t* off_p = off.data_ptr<int64_t>();
  token_gate_check_offset(off_p, B, M);

  at::Tensor new_offset = at::empty({B}, off.options());
  std::vector<int64_t> counts(B), sel(M);  // sel: scene-local kept indices, written at the scene's start
  at::Tensor kept_index, gated;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "token_gate_cpu", [&] {
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    select_scenes<scalar_t>(sp, off_p, B, M, keep_ratio, min_keep, threshold, sel.data(), counts.data());

    int64_t* new_off_p = new_offset.data_ptr<int64_t>();
    int64_t K = 0;
    for (int64_t b = 0; b < B; ++b) new_off_p[b] = (K += counts[b]);
    kept_index = at::empty({K}, off.options());
    gated = empty_rows(K, C, tok.options());
    if (K == 0) return;

    int64_t* kept_p = kept_index.data_ptr<int64_t>();
    for (int64_t b = 0, r = 0; b < B; ++b) {
      const int64_t start = b ? off_p[b - 1] : 0;
      for (int64_t j = 0; j < counts[b]; ++j) kept_p[r++] = start + sel[start + j];
    }

    const scalar_t* tp = tok.data_ptr<scalar_t>();
    scalar_t* gp = gated.data_ptr<scalar_t>();
    at::parallel_for(0, K, row_grain(C, sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) scale_row<scalar_t>(tp + kept_p[r] * C, gp + r * C, sp[kept_p[r]], C);
    });
  });
  return {gated, kept_index, new_offset};
}

std::tuple<at::Tensor, at::Tensor> token_gate_backward_cpu(const at::Tensor& grad_gated, const at::Tensor& tokens,
                                                           const at::Tensor& scores, const at::Tensor& kept_index) {
  token_gate_check_backward_args(grad_gated, tokens, scores, kept_index);
  TORCH_CHECK(tokens.device().is_cpu(), "token_gate_backward_cpu: expected CPU tensors");
  const at::Tensor g = grad_gated.contiguous(), tok = tokens.contiguous(), sc = scores.contiguous(),
                   kept = kept_index.contiguous();
  const int64_t M = tok.size(0), C = tok.size(1), K = kept.numel();
  at::Tensor grad_tokens = empty_rows(M, C, tok.options());
  at::Tensor grad_scores = at::empty_like(sc);

  // Row -> position in the kept list (-1 where dropped).
  std::vector<int64_t> pos(M, -1);
  const int64_t* kept_p = kept.data_ptr<int64_t>();
  for (int64_t r = 0; r < K; ++r) {
    TORCH_CHECK(kept_p[r] >= 0 && kept_p[r] < M, "token_gate_backward: kept_index out of range");
    pos[kept_p[r]] = r;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "token_gate_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* tp = tok.data_ptr<scalar_t>();
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    scalar_t* gtp = grad_tokens.data_ptr<scalar_t>();
    scalar_t* gsp = grad_scores.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(C, sizeof(scalar_t)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* dst = gtp + i * C;
        const int64_t r = pos[i];
        if (r < 0) {
          std::fill(dst, dst + C, scalar_t(0));
          gsp[i] = scalar_t(0);
          continue;
        }
        gsp[i] = scale_dot_row<scalar_t>(gp + r * C, tp + i * C, dst, sp[i], C);
      }
    });
  });
  return {grad_tokens, grad_scores};
}

TORCH_LIBRARY_IMPL(scene3d, CPU, m) {
  m.impl("token_gate", &token_gate_cpu);
  m.impl("token_gate_backward", &token_gate_backward_cpu);
}

}  // namespace scene3d
