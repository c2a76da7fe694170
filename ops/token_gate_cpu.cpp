// CPU kernels of scene3d::token_gate and its backward (rule: see token_gate.h).
//
// Forward, in two parallel passes:
//   1. over scenes (at::parallel_for): count scores >= threshold, get the keep count f, pick the f best
//      rows with std::nth_element (O(n)) and sort just those f row indices back into original order;
//   2. over kept rows: gated[r] = tokens[kept[r]] * scores[kept[r]] (one fused read-scale-write pass).
// Backward, one pass over all M rows: kept rows get grad*score and a dot product, the others zeros.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "token_gate.h"

namespace scene3d {
namespace {

// Rows per parallel task in the row passes: about 64 KiB of payload each.
int64_t row_grain(int64_t C, int64_t elem_size) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, C * elem_size));
}

template <typename scalar_t>
void select_scenes(const scalar_t* sp, const int64_t* off, int64_t B, double keep_ratio, int64_t min_keep,
                   double threshold, int64_t* sel, int64_t* counts) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b ? off[b - 1] : 0;
      const int64_t n = off[b] - start;
      const scalar_t* s = sp + start;
      int64_t num_ge = 0;
      for (int64_t i = 0; i < n; ++i) num_ge += static_cast<double>(s[i]) >= threshold;
      const int64_t f = token_gate_keep_count(n, keep_ratio, min_keep, num_ge);
      counts[b] = f;
      int64_t* out = sel + start;
      if (f == n) {
        std::iota(out, out + n, int64_t{0});
      } else if (f > 0) {
        order.resize(n);
        std::iota(order.begin(), order.end(), int64_t{0});
        // Strict total order: higher score first, NaN last, ties by lower index.
        auto better = [s](int64_t a, int64_t c) {
          const opmath_t x = static_cast<opmath_t>(s[a]), y = static_cast<opmath_t>(s[c]);
          if (x > y) return true;
          if (x < y) return false;
          const bool nx = std::isnan(x), ny = std::isnan(y);
          if (nx != ny) return ny;
          return a < c;
        };
        std::nth_element(order.begin(), order.begin() + f, order.end(), better);
        std::sort(order.begin(), order.begin() + f);
        std::copy(order.begin(), order.begin() + f, out);
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

  at::Tensor counts = at::empty({B}, off.options());
  at::Tensor new_offset = at::empty({B}, off.options());
  at::Tensor sel = at::empty({M}, off.options());  // scene-local kept indices, written at the scene's start
  at::Tensor kept_index, gated;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "token_gate_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    int64_t* counts_p = counts.data_ptr<int64_t>();
    select_scenes<scalar_t>(sp, off_p, B, keep_ratio, min_keep, threshold, sel.data_ptr<int64_t>(), counts_p);

    int64_t* new_off_p = new_offset.data_ptr<int64_t>();
    int64_t K = 0;
    for (int64_t b = 0; b < B; ++b) new_off_p[b] = (K += counts_p[b]);
    kept_index = at::empty({K}, off.options());
    gated = at::empty({K, C}, tok.options());
    if (K == 0) return;

    const int64_t* sel_p = sel.data_ptr<int64_t>();
    int64_t* kept_p = kept_index.data_ptr<int64_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b ? off_p[b - 1] : 0, out = b ? new_off_p[b - 1] : 0;
        for (int64_t j = 0; j < counts_p[b]; ++j) kept_p[out + j] = start + sel_p[start + j];
      }
    });

    const scalar_t* tp = tok.data_ptr<scalar_t>();
    scalar_t* gp = gated.data_ptr<scalar_t>();
    at::parallel_for(0, K, row_grain(C, sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = kept_p[r];
        const opmath_t w = static_cast<opmath_t>(sp[i]);
        const scalar_t* src = tp + i * C;
        scalar_t* dst = gp + r * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(static_cast<opmath_t>(src[c]) * w);
      }
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
  at::Tensor grad_tokens = at::empty_like(tok);
  at::Tensor grad_scores = at::empty_like(sc);

  // Row -> position in the kept list (-1 where dropped).
  std::vector<int64_t> pos(M, -1);
  const int64_t* kept_p = kept.data_ptr<int64_t>();
  for (int64_t r = 0; r < K; ++r) {
    TORCH_CHECK(kept_p[r] >= 0 && kept_p[r] < M, "token_gate_backward: kept_index out of range");
    pos[kept_p[r]] = r;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tok.scalar_type(), "token_gate_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
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
        const scalar_t* gr = gp + r * C;
        const scalar_t* t = tp + i * C;
        const opmath_t w = static_cast<opmath_t>(sp[i]);
        acc_t acc = 0;
        for (int64_t c = 0; c < C; ++c) {
          const opmath_t gc = static_cast<opmath_t>(gr[c]);
          dst[c] = static_cast<scalar_t>(gc * w);
          acc += static_cast<acc_t>(gc) * static_cast<acc_t>(t[c]);
        }
        gsp[i] = static_cast<scalar_t>(acc);
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
