// float32 linear layers on AVX2 + FMA CPUs (any x86-64 since Haswell / Zen): y = x @ w^T (+ bias), all float32.
//
// Why: a float32 language model is what `dtype="auto"` runs on CPUs without native bf16, and its decode steps read
// every weight once. oneDNN reads a plain [N, K] weight well for one row but at 1.5-2.5x the time for 4-16 rows (the
// rows of a few streams decoding together), and computes a single row with another kernel than a batch. Here the
// weight is packed once at load into 64-output panels, [ceil(N/64)][K][64] float32 (a thread streams one contiguous
// region, on 2 MiB pages), and a register tile of up to 6 rows x 16 outputs shares each weight vector, so a few
// rows cost little more than one.
//
// Batch invariance (as the int8 kernel in int8_linear_avx2.cpp): output (m, n) is always acc = 0; acc = fma(x[m,k],
// w[n,k], acc) for k = 0, 1, ..., K-1 in one float32 lane (K blocks store and reload acc exactly), then + bias[n].
// Tiles of any shape run that same chain, so a row's result never depends on M, on the other rows or on where the
// row falls: the engine's tokens do not depend on batching.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "avx2_hugepage.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using xgenmm_avx2::empty_hugepage;

constexpr int64_t kPanel = 64;    // outputs per packed panel: 256 bytes per input k
constexpr int64_t kKBlock = 64;   // inputs per K block: a 16 KiB weight tile stays in L1 while the rows pass over it
constexpr int64_t kMBlock = 192;  // rows per M block: the weight is streamed from memory once per M block
constexpr int kMaxTileRows = 6;   // 6 rows x 16 outputs = 12 accumulators + 2 weight vectors + 1 broadcast

// Panel layout: panel nb holds outputs [64 nb, 64 nb + 64) for every input, [K][64] floats as a whole, stored K block
// by K block; inside a K block of L inputs, column group by column group: group g (outputs 16 g .. 16 g + 15) is
// [L][16] contiguous. A 16-output tile then reads one contiguous 4 KiB stream per pass instead of every fourth line.
inline int64_t packed_offset(int64_t K, int64_t k, int64_t j) {  // element (input k, output j of the panel)
  const int64_t k0 = k / kKBlock * kKBlock, len = std::min(kKBlock, K - k0);
  return k0 * kPanel + (j / 16) * len * 16 + (k - k0) * 16 + j % 16;
}

// float32 [N, K] -> [ceil(N/64)][K][64] in the layout above, the missing outputs of the last panel zero.
at::Tensor pack_f32_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.device().is_cpu(),
              "pack_f32_weight takes a CPU float32 [N, K] weight");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), NB = (N + kPanel - 1) / kPanel;
  at::Tensor packed = empty_hugepage({NB, K, kPanel}, at::kFloat);
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; nb++) {
      float* panel = dst + nb * K * kPanel;
      const int64_t rows = std::min(kPanel, N - nb * kPanel);
      for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {  // one K block (a 16 KiB tile) at a time: both sides in cache
        const int64_t len = std::min(kKBlock, K - k0);
        float* block = panel + k0 * kPanel;
        for (int64_t g = 0; g < kPanel / 16; g++) {  // a column group: [len][16], written in order
          float* out = block + g * len * 16;
          const float* rows16[16];
          for (int64_t c = 0; c < 16; c++) {
            const int64_t j = g * 16 + c;
            rows16[c] = j < rows ? src + (nb * kPanel + j) * K + k0 : nullptr;
          }
          for (int64_t k = 0; k < len; k++)
            for (int64_t c = 0; c < 16; c++) out[k * 16 + c] = rows16[c] ? rows16[c][k] : 0.0f;
        }
      }
    }
  });
  return packed;
}

// The same layout, written over `weight` itself (float32 [N, K], contiguous, N a multiple of 64) and returned as a
// [N/64][K][64] view of its memory: panel nb occupies exactly the bytes of rows 64 nb .. 64 nb + 63, so each panel is
// copied to a scratch buffer and rewritten in place. For loading: no second copy of the weight, and none of the page
// faults of a fresh allocation (which cost more than the rewrite itself). The caller gives up `weight`.
at::Tensor pack_f32_weight_(at::Tensor weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.device().is_cpu() &&
                  weight.is_contiguous() && weight.size(0) % kPanel == 0,
              "pack_f32_weight_ takes a contiguous CPU float32 [N, K] weight with N a multiple of 64");
  const int64_t N = weight.size(0), K = weight.size(1), NB = N / kPanel;
  float* base = weight.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(static_cast<size_t>(kPanel * K));
    for (int64_t nb = b0; nb < b1; nb++) {
      float* panel = base + nb * K * kPanel;
      std::copy(panel, panel + kPanel * K, scratch.data());
      for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
        const int64_t len = std::min(kKBlock, K - k0);
        for (int64_t g = 0; g < kPanel / 16; g++) {
          float* out = panel + k0 * kPanel + g * len * 16;
          const float* rows16 = scratch.data() + g * 16 * K + k0;
          for (int64_t k = 0; k < len; k++)
            for (int64_t c = 0; c < 16; c++) out[k * 16 + c] = rows16[c * K + k];
        }
      }
    }
  });
  return weight.view({NB, K, kPanel});
}

at::Tensor unpack_f32_weight(const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(2) == kPanel &&
                  packed.is_contiguous(), "not a weight packed by pack_f32_weight");
  TORCH_CHECK(N > (packed.size(0) - 1) * kPanel && N <= packed.size(0) * kPanel, "N=", N, " does not fit ",
              packed.size(0), " panels");
  const int64_t K = packed.size(1);
  at::Tensor w = at::empty({N, K}, packed.options());
  const float* src = packed.data_ptr<float>();
  float* dst = w.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const float* panel = src + (n / kPanel) * K * kPanel;
      for (int64_t k = 0; k < K; k++) dst[n * K + k] = panel[packed_offset(K, k, n % kPanel)];
    }
  });
  return w;
}

// c[i][0 .. 8*NV) (+)= sum over k in [k0, k1) of x[i][k] * w(k, 0 .. 8*NV), rows i < MR; w: the K block's first
// column group of the tile (group stride `gs` = block length * 16 floats, 16 floats per input inside a group).
template <int MR, int NV>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t gs, int64_t k0, int64_t k1, float* c,
                 int64_t ldc, bool first) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
    for (int j = 0; j < NV; j++) acc[i][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + 8 * j);
  for (int64_t k = k0; k < k1; k++) {
    const float* wk = w + (k - k0) * 16;
    __m256 wv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; j++) wv[j] = _mm256_loadu_ps(wk + (j / 2) * gs + (j % 2) * 8);
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

// One K block of a 64-output panel (`wb`: the block's start) for `rows` (1..6) rows.
template <int MR, int NV>
inline void panel_tiles(const float* x, int64_t ldx, const float* wb, int64_t k0, int64_t k1, float* c, int64_t ldc,
                        bool first) {
  const int64_t gs = (k1 - k0) * 16;
  for (int64_t col = 0; col < kPanel; col += 8 * NV)
    tile<MR, NV>(x, ldx, wb + (col / 16) * gs, gs, k0, k1, c + col, ldc, first);
}

// One row streams all 64 outputs at once (8 independent FMA chains hide the FMA latency); more rows take the widest
// tile whose accumulators and weight vectors fit the 16 registers.
void panel_rows(int rows, const float* x, int64_t ldx, const float* wb, int64_t k0, int64_t k1, float* c,
                int64_t ldc, bool first) {
  switch (rows) {
    case 1: return panel_tiles<1, 8>(x, ldx, wb, k0, k1, c, ldc, first);
    case 2: return panel_tiles<2, 4>(x, ldx, wb, k0, k1, c, ldc, first);
    case 3: return panel_tiles<3, 2>(x, ldx, wb, k0, k1, c, ldc, first);
    case 4: return panel_tiles<4, 2>(x, ldx, wb, k0, k1, c, ldc, first);
    case 5: return panel_tiles<5, 2>(x, ldx, wb, k0, k1, c, ldc, first);
    default: return panel_tiles<6, 2>(x, ldx, wb, k0, k1, c, ldc, first);
  }
}

// y [..., N] float32 = x [..., K] float32 @ w^T + bias; `packed` from pack_f32_weight.
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                      int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "xgenmm_avx2::linear_f32 takes a CPU float32 input");
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(2) == kPanel &&
                  packed.is_contiguous(), "weight must come from xgenmm_avx2::pack_f32_weight");
  const int64_t NB = packed.size(0), K = packed.size(1);
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features; the weight takes ", K);
  TORCH_CHECK((N + kPanel - 1) / kPanel == NB, "N=", N, " does not match the packed weight's ", NB, " panels");
  const at::Tensor xf = x.reshape({-1, K}).contiguous();
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
  const float* xp = xf.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float c[kMBlock * kPanel];
    for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
      const int64_t m1 = std::min(M, m0 + kMBlock), rows = m1 - m0;
      const int64_t n_tiles = (rows + kMaxTileRows - 1) / kMaxTileRows;
      for (int64_t nb = p0; nb < p1; nb++) {
        const float* panel = wp + nb * K * kPanel;
        for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
          const int64_t k1 = std::min(K, k0 + kKBlock);
          // row tiles of balanced height (8 rows = 4 + 4, not 6 + 2)
          for (int64_t t = 0, m = m0; t < n_tiles; t++) {
            const int mr = static_cast<int>(rows / n_tiles + (t < rows % n_tiles ? 1 : 0));
            panel_rows(mr, xp + m * K, K, panel + k0 * kPanel, k0, k1, c + (m - m0) * kPanel, kPanel, k0 == 0);
            m += mr;
          }
        }
        // bias, the valid outputs only
        const int64_t n0 = nb * kPanel, cols = std::min(kPanel, N - n0);
        for (int64_t m = m0; m < m1; m++) {
          const float* cm = c + (m - m0) * kPanel;
          float* ym = yp + m * N + n0;
          if (bp) {
            for (int64_t j = 0; j < cols; j++) ym[j] = cm[j] + bp[n0 + j];
          } else {
            std::copy(cm, cm + cols, ym);
          }
        }
      }
    }
  });
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xgenmm_avx2, m) {
  m.def("pack_f32_weight(Tensor weight) -> Tensor", &pack_f32_weight);
  m.def("pack_f32_weight_(Tensor(a!) weight) -> Tensor(a!)", &pack_f32_weight_);
  m.def("unpack_f32_weight(Tensor packed, int N) -> Tensor", &unpack_f32_weight);
  m.def("linear_f32(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor", &linear_f32);
}
