// int8 weight-only linear layers on AVX2 + FMA CPUs (any x86-64 since Haswell / Zen): y = (x @ q^T) * scale (+ bias),
// q int8 [N, K] with one float32 scale per output, x bf16 or float32, accumulated in float32.
//
// Why: a decode step reads every weight once, so its speed is the rate the weights stream from memory. ATen's int8
// kernel (`_weight_int8pack_mm`) read them at 3-14 GB/s on the AVX2 EPYC the project tests on (its read bandwidth:
// 24-29 GB/s) and slows sharply with a few rows. Here the weight is packed once at load into 64-output panels,
// [ceil(N/64)][K][64] int8, so a thread streams one contiguous region; each 8 weights are widened to float32 in
// registers (vpmovsxbd + vcvtdq2ps, exact) and that conversion is shared by every row of a register tile (up to 6
// rows), so a few rows cost little more than one.
//
// Batch invariance: output (m, n) is always acc = 0; acc = fma(x[m,k], q[n,k], acc) for k = 0, 1, ..., K-1 in one
// float32 lane (K blocks store and reload acc exactly), then acc * scale[n], then + bias[n], then the one rounding to
// the output dtype. Tiles of any shape (1x64, 2x32, 3x32, 4..6x16) run that same chain, so a row's result never
// depends on M, on the other rows or on where the row falls: the engine's tokens do not depend on batching.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "avx2_hugepage.h"

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

using xgenmm_avx2::empty_hugepage;

constexpr int64_t kPanel = 64;    // outputs per packed panel: one 64-byte line per input k
constexpr int64_t kKBlock = 256;  // inputs per K block: a 16 KiB weight tile stays in L1 while the rows pass over it
constexpr int64_t kMBlock = 96;   // rows per M block
constexpr int kMaxTileRows = 6;   // 6 rows x 16 outputs = 12 accumulators + 2 weight vectors + 1 broadcast

// int8 [N, K] -> [ceil(N/64)][K][64], the missing outputs of the last panel zero.
at::Tensor pack_int8_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.device().is_cpu(),
              "pack_int8_weight takes a CPU int8 [N, K] weight");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), NB = (N + kPanel - 1) / kPanel;
  at::Tensor packed = empty_hugepage({NB, K, kPanel}, at::kChar);
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; nb++) {
      int8_t* panel = dst + nb * K * kPanel;
      const int64_t rows = std::min(kPanel, N - nb * kPanel);
      for (int64_t k0 = 0; k0 < K; k0 += kPanel) {  // 64 x 64 tiles: both sides stay in cache
        const int64_t k1 = std::min(K, k0 + kPanel);
        for (int64_t j = 0; j < kPanel; j++) {
          const int8_t* row = src + (nb * kPanel + j) * K;
          for (int64_t k = k0; k < k1; k++) panel[k * kPanel + j] = j < rows ? row[k] : int8_t(0);
        }
      }
    }
  });
  return packed;
}

at::Tensor unpack_int8_weight(const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 && packed.size(2) == kPanel,
              "not a weight packed by pack_int8_weight");
  TORCH_CHECK(N > (packed.size(0) - 1) * kPanel && N <= packed.size(0) * kPanel, "N=", N, " does not fit ",
              packed.size(0), " panels");
  return packed.permute({0, 2, 1}).reshape({-1, packed.size(1)}).narrow(0, 0, N).contiguous();
}

inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 float32, exact
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// c[i][0 .. 8*NV) (+)= sum over k in [k0, k1) of x[i][k] * w[k][0 .. 8*NV), rows i < MR; w: a panel (row stride 64)
// offset to the tile's first output.
template <int MR, int NV>
inline void tile(const float* x, int64_t ldx, const int8_t* w, int64_t k0, int64_t k1, float* c, int64_t ldc,
                 bool first) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
    for (int j = 0; j < NV; j++) acc[i][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + 8 * j);
  for (int64_t k = k0; k < k1; k++) {
    const int8_t* wk = w + k * kPanel;
    __m256 wv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; j++) wv[j] = widen8(wk + 8 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
      const __m256 xb = _mm256_broadcast_ss(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NV; j++) acc[i][j] = _mm256_fmadd_ps(xb, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
    for (int j = 0; j < NV; j++) _mm256_storeu_ps(c + i * ldc + 8 * j, acc[i][j]);
}

// A whole 64-output panel for `rows` (1..6) rows: the widest tile whose accumulators fit the 16 registers, so
// every weight vector is widened once per row tile and enough independent FMA chains hide their latency.
template <int MR, int NV>
inline void panel_tiles(const float* x, int64_t ldx, const int8_t* w, int64_t k0, int64_t k1, float* c, int64_t ldc,
                        bool first) {
  for (int64_t col = 0; col < kPanel; col += 8 * NV) tile<MR, NV>(x, ldx, w + col, k0, k1, c + col, ldc, first);
}

void panel_rows(int rows, const float* x, int64_t ldx, const int8_t* w, int64_t k0, int64_t k1, float* c,
                int64_t ldc, bool first) {
  switch (rows) {
    case 1: return panel_tiles<1, 4>(x, ldx, w, k0, k1, c, ldc, first);
    case 2: return panel_tiles<2, 4>(x, ldx, w, k0, k1, c, ldc, first);
    case 3: return panel_tiles<3, 2>(x, ldx, w, k0, k1, c, ldc, first);
    case 4: return panel_tiles<4, 2>(x, ldx, w, k0, k1, c, ldc, first);
    case 5: return panel_tiles<5, 2>(x, ldx, w, k0, k1, c, ldc, first);
    default: return panel_tiles<6, 2>(x, ldx, w, k0, k1, c, ldc, first);
  }
}

inline void store_bf16(uint16_t* dst, __m256 v, int n) {  // round to nearest even (NaN stays a quiet NaN)
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m128i packed = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
  if (n == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), packed);
    std::copy(tmp, tmp + n, dst);
  }
}

// y [M, N] in x's dtype (bf16 or float32) = (x @ q^T) * scales + bias; `packed` from pack_int8_weight.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "xgenmm_avx2::int8_linear takes a CPU bfloat16 or float32 input");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 && packed.size(2) == kPanel &&
                  packed.is_contiguous(), "weight must come from xgenmm_avx2::pack_int8_weight");
  const int64_t NB = packed.size(0), K = packed.size(1);
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features; the weight takes ", K);
  TORCH_CHECK((N + kPanel - 1) / kPanel == NB, "N=", N, " does not match the packed weight's ", NB, " panels");
  TORCH_CHECK(scales.numel() == N, "scales has ", scales.numel(), " values, expected ", N);
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " values, expected ", N);
    bf = bias->to(at::kFloat).contiguous();
  }
  const int64_t M = xf.size(0);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);
  const bool to_bf16 = x.scalar_type() == at::kBFloat16;
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  void* yp = y.data_ptr();
  at::parallel_for(0, NB, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float c[kMBlock * kPanel];
    for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
      const int64_t m1 = std::min(M, m0 + kMBlock), rows = m1 - m0;
      const int64_t n_tiles = (rows + kMaxTileRows - 1) / kMaxTileRows;
      for (int64_t nb = p0; nb < p1; nb++) {
        const int8_t* panel = wp + nb * K * kPanel;
        for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
          const int64_t k1 = std::min(K, k0 + kKBlock);
          // row tiles of balanced height (8 rows = 4 + 4, not 6 + 2): a short tile wastes the widening it repeats
          for (int64_t t = 0, m = m0; t < n_tiles; t++) {
            const int mr = static_cast<int>(rows / n_tiles + (t < rows % n_tiles ? 1 : 0));
            panel_rows(mr, xp + m * K, K, panel, k0, k1, c + (m - m0) * kPanel, kPanel, k0 == 0);
            m += mr;
          }
        }
        // scale, bias, one rounding to the output dtype, the valid outputs only
        const int64_t n0 = nb * kPanel, cols = std::min(kPanel, N - n0);
        for (int64_t m = m0; m < m1; m++) {
          const float* cm = c + (m - m0) * kPanel;
          for (int64_t j = 0; j < cols; j += 8) {
            const int n = static_cast<int>(std::min<int64_t>(8, cols - j));
            alignas(32) float s[8] = {0}, b[8] = {0};
            std::copy(sp + n0 + j, sp + n0 + j + n, s);
            if (bp) std::copy(bp + n0 + j, bp + n0 + j + n, b);
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(cm + j), _mm256_load_ps(s));
            if (bp) v = _mm256_add_ps(v, _mm256_load_ps(b));
            if (to_bf16) {
              store_bf16(static_cast<uint16_t*>(yp) + m * N + n0 + j, v, n);
            } else if (n == 8) {
              _mm256_storeu_ps(static_cast<float*>(yp) + m * N + n0 + j, v);
            } else {
              alignas(32) float tmp[8];
              _mm256_store_ps(tmp, v);
              std::copy(tmp, tmp + n, static_cast<float*>(yp) + m * N + n0 + j);
            }
          }
        }
      }
    }
  });
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY(xgenmm_avx2, m) {
  m.def("pack_int8_weight(Tensor weight) -> Tensor", &pack_int8_weight);
  m.def("unpack_int8_weight(Tensor packed, int N) -> Tensor", &unpack_int8_weight);
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int N) -> Tensor", &int8_linear);
}
