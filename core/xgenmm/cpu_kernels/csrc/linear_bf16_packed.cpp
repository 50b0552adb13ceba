// bf16 linear layers of the language model on AVX512-BF16 CPUs, on weights packed once at load into the layout the
// VDPBF16PS instruction wants: [ceil(N/16)][ceil(K/2)][16][2] (16 outputs x one pair of inputs per 64-byte vector).
// fp32 accumulation, one rounding of each output to bf16 (nearest even).
//
// Why: a decode step is one pass over the weights, and this layout streams them sequentially (~85-90% of the read
// bandwidth at 1-8 rows; oneDNN's bf16 path reads a plain weight at ~40-60%); at prefill sizes the same kernel,
// blocked over K so a 64-output x 256-input weight panel stays in L1 while the rows pass over it, runs close to
// oneDNN. Batch invariance: output n of row m is always acc_n += x[m,k]w[n,k] + x[m,k+1]w[n,k+1] over the pairs in
// increasing k, in one fp32 lane, then bias and one rounding: the same operations whatever M, the tile or the block
// the row falls in, so a row's result never depends on the rest of the batch (the engine's greedy output must not
// depend on batching or on preemption by recompute).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "linear_io.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kMR = 6;          // activation rows per register tile
constexpr int kNR = 4;          // 16-output blocks per register tile (64 outputs)
constexpr int64_t kKPairs = 128;  // input pairs per K block (256 inputs: the tile's weight panel is 32 KiB)
constexpr int64_t kMBlock = 60;   // rows per M block (their K block stays in L1/L2)

// An uninitialized CPU tensor whose memory the kernel backs with 2 MiB pages where it can (Linux transparent huge
// pages, asked for with madvise: the default "madvise" mode grants them). Why: a decode step streams ~7 GB of weights,
// and with 4 KiB pages the TLB misses cap the read bandwidth here at ~32-42 GB/s; with 2 MiB pages the same reads
// reach ~67 GB/s. torch's allocator asks for huge pages only under THP_MEM_ALLOC_ENABLE=1, read once when the process
// first allocates, so the engine allocates its weights and KV cache here instead. Small tensors (< 2 MiB) and
// kernels without THP get ordinary memory; the contents are the same either way.
at::Tensor empty_hugepage(at::IntArrayRef sizes, at::ScalarType dtype) {
  constexpr size_t kHuge = size_t(2) << 20;
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  size_t bytes = c10::elementSize(dtype);
  for (const int64_t d : sizes) {
    TORCH_CHECK(d >= 0, "empty_hugepage: negative size");
    bytes *= static_cast<size_t>(d);
  }
  if (bytes < kHuge) return at::empty(sizes, options);
  const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
  void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "empty_hugepage: could not map ", len, " bytes");
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHuge - 1) & ~uintptr_t(kHuge - 1);
  if (aligned > start) munmap(raw, aligned - start);  // keep the 2 MiB-aligned [aligned, aligned + len)
  const uintptr_t tail = start + len + kHuge - (aligned + len);
  if (tail) munmap(reinterpret_cast<void*>(aligned + len), tail);
  madvise(reinterpret_cast<void*>(aligned), len, MADV_HUGEPAGE);  // advice: a kernel without THP just ignores it
  return at::from_blob(reinterpret_cast<void*>(aligned), sizes, [len](void* p) { munmap(p, len); }, options);
}

at::Tensor pack_bf16_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2, "pack_bf16_weight takes a bf16 [N, K] weight");
  const int64_t N = weight.size(0), K = weight.size(1), NB = (N + 15) / 16, KP = (K + 1) / 2;
  at::Tensor w = weight.contiguous();
  if (N != 16 * NB || K != 2 * KP) w = at::constant_pad_nd(w, {0, 2 * KP - K, 0, 16 * NB - N});
  at::Tensor packed = empty_hugepage({NB, KP, 16, 2}, at::kBFloat16);
  packed.copy_(w.view({NB, 16, KP, 2}).permute({0, 2, 1, 3}));
  return packed;
}

at::Tensor unpack_bf16_weight(const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2, "not a packed bf16 weight");
  const at::Tensor p = packed.contiguous();
  const int64_t KP = p.size(1);
  return p.permute({0, 2, 1, 3}).reshape({-1, 2 * KP}).narrow(0, 0, N).narrow(1, 0, K).contiguous();
}

// C[i][j*16..] (+)= sum over pairs [kp0, kp1) for rows i < MR and output blocks j < NR.
template <int MR, int NR>
inline void tile(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* wp, int64_t KP, int64_t kp0, int64_t kp1,
                 float* c, int64_t ldc, bool first) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * j);
  const int64_t full = std::min(kp1, K / 2);  // pairs with both inputs in range
  for (int64_t kp = kp0; kp < full; kp++) {
    __m512bh wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_loadu_si512(wp + (j * KP + kp) * 32);
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + i * ldx + 2 * kp));
#pragma GCC unroll 8
      for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, wv[j]);
    }
  }
  if (full < kp1) {  // odd K: the last pair is (x[K-1], 0)
    __m512bh wv[NR];
    for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_loadu_si512(wp + (j * KP + full) * 32);
    for (int i = 0; i < MR; i++) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[i * ldx + K - 1]));
      for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

template <int NR>
void tile_rows(int mr, const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* wp, int64_t KP, int64_t kp0,
               int64_t kp1, float* c, int64_t ldc, bool first) {
  switch (mr) {
    case 1: return tile<1, NR>(x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
    case 2: return tile<2, NR>(x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
    case 3: return tile<3, NR>(x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
    case 4: return tile<4, NR>(x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
    case 5: return tile<5, NR>(x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
    default: return tile<6, NR>(x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
  }
}

void tile_any(int mr, int nr, const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* wp, int64_t KP, int64_t kp0,
              int64_t kp1, float* c, int64_t ldc, bool first) {
  switch (nr) {
    case 1: return tile_rows<1>(mr, x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
    case 2: return tile_rows<2>(mr, x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
    case 3: return tile_rows<3>(mr, x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
    default: return tile_rows<4>(mr, x, ldx, K, wp, KP, kp0, kp1, c, ldc, first);
  }
}

at::Tensor linear_bf16_packed(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                              int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "xgenmm_cpu::linear_bf16_packed takes bfloat16 input and weight");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 && packed.is_contiguous(),
              "weight must come from xgenmm_cpu::pack_bf16_weight");
  const int64_t NB = packed.size(0), KP = packed.size(1), K = x.size(-1);
  TORCH_CHECK((K + 1) / 2 == KP && (N + 15) / 16 == NB, "input has ", K, " features / ", N,
              " outputs; the packed weight holds ", 2 * KP, " x ", 16 * NB);
  const LinearIO io = linear_io(x, K, N, bias);
  const int64_t M = io.M;
  const float* bp = io.bias();
  const auto* xp = io.x();
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(io.y.data_ptr<at::BFloat16>());
  const int64_t groups = (NB + kNR - 1) / kNR;
  constexpr int64_t ldc = kNR * 16;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    alignas(64) float c[kMBlock * ldc];
    for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
      const int64_t m1 = std::min(M, m0 + kMBlock);
      for (int64_t g = g0; g < g1; g++) {
        const int64_t nb = g * kNR;
        const int nr = static_cast<int>(std::min<int64_t>(kNR, NB - nb));
        const uint16_t* panel = wp + nb * KP * 32;
        // Row tiles of balanced height (8 rows = 4 + 4, not 6 + 2): a short tile wastes the weight loads it shares.
        const int64_t rows = m1 - m0, n_tiles = (rows + kMR - 1) / kMR;
        for (int64_t kp0 = 0; kp0 < KP; kp0 += kKPairs) {
          const int64_t kp1 = std::min(KP, kp0 + kKPairs);
          for (int64_t t = 0, m = m0; t < n_tiles; t++) {
            const int mr = static_cast<int>(rows / n_tiles + (t < rows % n_tiles ? 1 : 0));
            tile_any(mr, nr, xp + m * K, K, K, panel, KP, kp0, kp1, c + (m - m0) * ldc, ldc, kp0 == 0);
            m += mr;
          }
        }
        // bias, one rounding to bf16, store the valid columns
        const int64_t cols = std::min<int64_t>(nr * 16, N - nb * 16);
        for (int64_t m = m0; m < m1; m++)
          for (int64_t j = 0; j < cols; j += 16) {
            const int64_t n = std::min<int64_t>(16, cols - j);
            const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
            __m512 v = _mm512_loadu_ps(c + (m - m0) * ldc + j);
            if (bp) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bp + nb * 16 + j));
            _mm256_mask_storeu_epi16(yp + m * N + nb * 16 + j, mask, (__m256i)_mm512_cvtneps_pbh(v));
          }
      }
    }
  });
  return io.result();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xgenmm_cpu, m) {
  m.def("empty_hugepage(int[] size, ScalarType dtype) -> Tensor", &empty_hugepage);
  m.def("pack_bf16_weight(Tensor weight) -> Tensor", &pack_bf16_weight);
  m.def("unpack_bf16_weight(Tensor packed, int N, int K) -> Tensor", &unpack_bf16_weight);
  m.def("linear_bf16_packed(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor", &linear_bf16_packed);
}
