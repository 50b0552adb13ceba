// bf16 linear layers on AVX512-BF16 CPUs, reading the weight in its
// natural [N, K] row-major layout (the checkpoint's), fp32 accumulation, bf16 output rounded to nearest even.
//
// Why: at decode sizes a linear layer is a pass over the weight; oneDNN's bf16 path reaches ~13-21 GB/s of the
// ~33 GB/s the CPUs here can read, this reaches ~27-30 GB/s; at prefill sizes it runs at ~75-80% of oneDNN.
// Each output is a row-by-row dot product with VDPBF16PS (32 bf16 pairs per instruction); a register tile of
// MR activation rows x NR weight rows reuses every weight load MR times and every activation load NR times.
//
// Batch invariance: every output element is the same sequence of operations (16 lanes accumulating the K pairs in
// order, one fixed reduction tree, one rounding) whatever M, the tile it falls in and the blocking are, so a row's
// result never depends on the other rows of the batch. The engine relies on this for identical greedy output alone,
// batched, preempted (recomputed by prefill) and prefix-cached in bf16; oneDNN's bf16 GEMM computes a single row with
// another kernel than a batch (1-2 outputs in 10^4 differ by one bf16 step).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "linear_io.h"

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kMaxMR = 4;
constexpr int kNR = 6;

inline __m512bh load_tail(const uint16_t* p, int64_t remaining) {
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << remaining) - 1), p);
}

template <int MR, int NR>
inline void step(__m512 (&acc)[MR][NR], const __m512bh (&wv)[NR], const uint16_t* x, int64_t ldx, int64_t k,
                 int64_t tail) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++) {
    const __m512bh xv = tail ? load_tail(x + i * ldx + k, tail) : (__m512bh)_mm512_loadu_si512(x + i * ldx + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
  }
}

// out[i][j] = dot(x[i, :K], w[j, :K]) for i < MR, j < NR.
template <int MR, int NR>
inline void dot_tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t K, float out[MR][NR]) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
  const int64_t k_full = K & ~int64_t(31);
  for (int64_t k = 0; k < k_full; k += 32) {
    __m512bh wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * ldw + k);
    step<MR, NR>(acc, wv, x, ldx, k, 0);
  }
  if (k_full < K) {
    const int64_t tail = K - k_full;
    __m512bh wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) wv[j] = load_tail(w + j * ldw + k_full, tail);
    step<MR, NR>(acc, wv, x, ldx, k_full, tail);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int MR, int NR>
void rows_tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, const float* bias, at::BFloat16* y,
               int64_t ldy) {
  float out[MR][NR];
  dot_tile<MR, NR>(x, ldx, w, K, K, out);
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) y[i * ldy + j] = at::BFloat16(out[i][j] + (bias ? bias[j] : 0.f));
}

template <int NR>
void rows_any_m(int mr, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, const float* bias,
                at::BFloat16* y, int64_t ldy) {
  switch (mr) {
    case 1: return rows_tile<1, NR>(x, ldx, w, K, bias, y, ldy);
    case 2: return rows_tile<2, NR>(x, ldx, w, K, bias, y, ldy);
    case 3: return rows_tile<3, NR>(x, ldx, w, K, bias, y, ldy);
    default: return rows_tile<4, NR>(x, ldx, w, K, bias, y, ldy);
  }
}

void rows(int mr, int nr, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, const float* bias,
          at::BFloat16* y, int64_t ldy) {
  switch (nr) {
    case 1: return rows_any_m<1>(mr, x, ldx, w, K, bias, y, ldy);
    case 2: return rows_any_m<2>(mr, x, ldx, w, K, bias, y, ldy);
    case 3: return rows_any_m<3>(mr, x, ldx, w, K, bias, y, ldy);
    case 4: return rows_any_m<4>(mr, x, ldx, w, K, bias, y, ldy);
    case 5: return rows_any_m<5>(mr, x, ldx, w, K, bias, y, ldy);
    default: return rows_any_m<6>(mr, x, ldx, w, K, bias, y, ldy);
  }
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "xgenmm_cpu::linear_bf16 takes bfloat16 input and weight");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous [N, K] matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, the weight expects ", K);
  const LinearIO io = linear_io(x, K, N, bias);
  const int64_t M = io.M;
  const float* bp = io.bias();
  const auto* xp = io.x();
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  at::BFloat16* yp = io.y.data_ptr<at::BFloat16>();
  const int64_t n_tiles = (N + kNR - 1) / kNR;
  // Rows of x per block: the block (<= ~512 KiB) stays in L2 while the thread's weight tiles pass over it.
  const int64_t m_block = std::max<int64_t>(kMaxMR, (512 * 1024 / (2 * K)) / kMaxMR * kMaxMR);
  // Each thread owns a contiguous run of weight rows; at decode sizes (one block) the weight is read from memory
  // once and each tile of NR rows stays in L1 while every group of MR activation rows passes over it. Every output
  // is the same sequence of operations whatever M and the blocking are, so a row's result never depends on the
  // batch it is computed in.
  at::parallel_for(0, n_tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += m_block) {
      const int64_t m1 = std::min(M, m0 + m_block);
      for (int64_t t = t0; t < t1; t++) {
        const int64_t n = t * kNR;
        const int nr = static_cast<int>(std::min<int64_t>(kNR, N - n));
        for (int64_t m = m0; m < m1; m += kMaxMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMaxMR, m1 - m));
          rows(mr, nr, xp + m * K, K, wp + n * K, K, bp ? bp + n : nullptr, yp + m * N + n, N);
        }
      }
    }
  });
  return io.result();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xgenmm_cpu, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &linear_bf16);
}
