// Spatial token gating (scene3d::token_gate): shared declarations and the selection rule.
//
// The pure-PyTorch reference `scene3d.gating.op.token_gate_reference` is the spec; the rule below must stay
// identical to it. Per scene b with n tokens (rows [offset[b-1], offset[b]) of the ragged batch):
//   k     = min(n, max(min_keep, ceil(keep_ratio * n)))        (ceil of the IEEE float64 product)
//   t     = number of the k best-ranked tokens with float64(score) >= threshold
//   f     = max(t, min(min_keep, n))                           (tokens kept; f <= k)
// Ranking: score descending, ties by lower row index (a strict total order; NaN ranks last). The f best
// tokens are kept in their original order. Since tokens passing the threshold form a prefix of the ranking,
// t = min(k, #{tokens with score >= threshold}), so a kernel only needs one count and one top-f selection.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#if defined(__CUDACC__)
#define SCENE3D_HD __host__ __device__
#else
#define SCENE3D_HD
#endif

namespace scene3d {

// Number of tokens kept in a scene of n tokens of which `num_ge_threshold` pass the threshold.
SCENE3D_HD inline int64_t token_gate_keep_count(int64_t n, double keep_ratio, int64_t min_keep,
                                                int64_t num_ge_threshold) {
  int64_t by_ratio = static_cast<int64_t>(ceil(keep_ratio * static_cast<double>(n)));
  int64_t k = by_ratio > min_keep ? by_ratio : min_keep;
  k = k < n ? k : n;
  int64_t t = num_ge_threshold < k ? num_ge_threshold : k;
  int64_t floor_keep = min_keep < n ? min_keep : n;
  return t > floor_keep ? t : floor_keep;
}

// Order-preserving unsigned key of a score, the ranking of both kernels' selections: a larger score gets a
// larger key; -0.0 and +0.0 get one key; NaN gets 0, below every number (ranks last). float / half / bfloat16
// scores are ranked by their float value (exact for the two 16-bit types).
SCENE3D_HD inline uint32_t token_gate_float_key(float x) {
  if (x != x) return 0u;  // NaN (isnan is not callable from both host and device code alike)
  if (x == 0.0f) x = 0.0f;
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Checks shared by the CPU and CUDA kernels (the Python wrapper raises ValueError before reaching these).
inline void token_gate_check_args(const at::Tensor& tokens, const at::Tensor& scores, const at::Tensor& offset,
                                  double keep_ratio, int64_t min_keep) {
  TORCH_CHECK(tokens.dim() == 2, "token_gate: tokens must be [M, C], got ", tokens.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == tokens.size(0),
              "token_gate: scores must be [M] with M = tokens.size(0) = ", tokens.size(0), ", got ", scores.sizes());
  TORCH_CHECK(offset.dim() == 1, "token_gate: offset must be 1-D, got ", offset.sizes());
  TORCH_CHECK(offset.scalar_type() == at::kLong, "token_gate: offset must be int64, got ", offset.scalar_type());
  TORCH_CHECK(at::isFloatingType(tokens.scalar_type()), "token_gate: tokens must be floating point, got ",
              tokens.scalar_type());
  TORCH_CHECK(scores.scalar_type() == tokens.scalar_type(), "token_gate: scores dtype ", scores.scalar_type(),
              " differs from tokens dtype ", tokens.scalar_type());
  TORCH_CHECK(scores.device() == tokens.device() && offset.device() == tokens.device(),
              "token_gate: tokens, scores and offset must be on one device");
  TORCH_CHECK(keep_ratio >= 0.0 && keep_ratio <= 1.0, "token_gate: keep_ratio must be in [0, 1], got ", keep_ratio);
  TORCH_CHECK(min_keep >= 0, "token_gate: min_keep must be >= 0, got ", min_keep);
}

// offset (host, int64, B values) must be non-decreasing, >= 0 and end at M.
inline void token_gate_check_offset(const int64_t* off, int64_t B, int64_t M) {
  int64_t prev = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(off[b] >= prev, "token_gate: offset must be non-negative and non-decreasing; offset[", b, "] = ",
                off[b], " < ", prev);
    prev = off[b];
  }
  TORCH_CHECK(prev == M, "token_gate: offset[-1] must equal M = ", M, ", got ", prev);
}

inline void token_gate_check_backward_args(const at::Tensor& grad_gated, const at::Tensor& tokens,
                                           const at::Tensor& scores, const at::Tensor& kept_index) {
  TORCH_CHECK(tokens.dim() == 2 && scores.dim() == 1 && scores.size(0) == tokens.size(0),
              "token_gate_backward: tokens [M, C] and scores [M] expected");
  TORCH_CHECK(kept_index.dim() == 1 && kept_index.scalar_type() == at::kLong,
              "token_gate_backward: kept_index must be a 1-D int64 tensor");
  TORCH_CHECK(grad_gated.dim() == 2 && grad_gated.size(0) == kept_index.size(0) &&
                  grad_gated.size(1) == tokens.size(1),
              "token_gate_backward: grad_gated must be [K, C] = [", kept_index.size(0), ", ", tokens.size(1),
              "], got ", grad_gated.sizes());
  TORCH_CHECK(grad_gated.scalar_type() == tokens.scalar_type() && scores.scalar_type() == tokens.scalar_type(),
              "token_gate_backward: grad_gated, tokens and scores must share a dtype");
  TORCH_CHECK(grad_gated.device() == tokens.device() && scores.device() == tokens.device() &&
                  kept_index.device() == tokens.device(),
              "token_gate_backward: all inputs must be on one device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_gate_cpu(const at::Tensor& tokens, const at::Tensor& scores,
                                                              const at::Tensor& offset, double keep_ratio,
                                                              int64_t min_keep, double threshold);
std::tuple<at::Tensor, at::Tensor> token_gate_backward_cpu(const at::Tensor& grad_gated, const at::Tensor& tokens,
                                                           const at::Tensor& scores, const at::Tensor& kept_index);

#if defined(SCENE3D_WITH_CUDA) || defined(__CUDACC__)
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_gate_cuda(const at::Tensor& tokens, const at::Tensor& scores,
                                                               const at::Tensor& offset, double keep_ratio,
                                                               int64_t min_keep, double threshold);
std::tuple<at::Tensor, at::Tensor> token_gate_backward_cuda(const at::Tensor& grad_gated, const at::Tensor& tokens,
                                                            const at::Tensor& scores, const at::Tensor& kept_index);
#endif

}  // namespace scene3d
