// Causal attention over the paged KV cache, read in place, for CPUs with AVX2 + FMA (and no AVX-512 BF16): the
// AVX2 half of `paged_attention.cpp`, the same op and contract (`torch.ops.xgenmm_avx2.paged_attention` /
// `store_kv`, see `paged_attention_plan.h` for the layout and the checks). float32 or bfloat16 caches and queries;
// scores, softmax and the weighted sum in float32, output in q's dtype (bf16 rounded to nearest even, as torch).
//
// Why: without it an AVX2 machine runs the reference backend, which gathers each sequence's KV blocks into a
// buffer before SDPA (a full-size float32 decode step spent ~9% in that copy and SDPA), and torch's bf16 SDPA has
// no native bf16 arithmetic to use here (5-6x its float32 time at one decode row).
//
// Every (query, head) row is the same sequence of operations whatever else is in the batch: keys in fixed chunks
// of kKeyChunk positions, each chunk's scores 8 keys at a time (per key, D / 8 FMAs in d order into 8 lanes, the
// lanes summed as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))), a partial softmax per chunk (max, exp, sum),
// the values accumulated over the keys it sees in order from a zero accumulator,
// and the chunk states merged in chunk order. So a decode row equals the same position inside a prefill chunk,
// alone or batched (the engine's greedy output must not depend on batching or on preemption by recompute). Decode
// rows run one work item per (sequence, chunk) over all heads and stream each token's rows for every head
// (contiguous in the cache) in order; prefill tiles run one item per (tile, head group).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "paged_attention_plan.h"

namespace {

using namespace xgenmm_paged;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// float32 -> bf16, round to nearest even; NaN -> 0x7fc0 (c10::BFloat16's rounding).
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);  // 8 x u16 in the low half
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

inline float max_of(const float* s, int64_t n) {
  __m256 vmax = _mm256_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = *std::max_element(lanes, lanes + 8);
  for (; i < n; i++) mx = std::max(mx, s[i]);
  return mx;
}

// exp(x - max) in place over n floats, returns the sum (8 lane sums added in lane order, then the tail).
inline float exp_and_sum(float* s, int64_t n, float max) {
  using Vec = at::vec::Vectorized<float>;
  static_assert(Vec::size() == 8, "built with CPU_CAPABILITY_AVX2");
  const Vec vmax(max);
  Vec vsum(0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Vec e = (Vec::loadu(s + i) - vmax).exp_u20();
    e.store(s + i);
    vsum = vsum + e;
  }
  alignas(32) float lanes[8];
  vsum.store(lanes);
  float sum = 0.f;
  for (float l : lanes) sum += l;
  for (; i < n; i++) {
    s[i] = std::exp(s[i] - max);
    sum += s[i];
  }
  return sum;
}

// 8 keys' lane accumulators -> their 8 sums in key order, each ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline __m256 reduce8(const __m256 (&a)[8]) {
  __m256 x[4], y[2];
  for (int p = 0; p < 4; p++)  // [key 2p: l_i + l_{i+4}, i < 4 | key 2p + 1: same]
    x[p] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * p], a[2 * p + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * p], a[2 * p + 1], 0x31));
  for (int q = 0; q < 2; q++)  // half h: [key 4q + h: e0 + e2, e1 + e3 | key 4q + 2 + h: same]
    y[q] = _mm256_add_ps(_mm256_shuffle_ps(x[2 * q], x[2 * q + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(x[2 * q], x[2 * q + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // half h: keys h, 2 + h, 4 + h, 6 + h, each (e0 + e2) + (e1 + e3)
  const __m256 w = _mm256_add_ps(_mm256_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Scaled query (float32, D values) . 8 keys (missing keys repeat a present one; their sums are discarded).
template <typename T, int D8>
inline __m256 dot_rows8(const float* qf, const T* const* keys) {
  __m256 acc[8];
  for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int d = 0; d < D8; d++) {
    const __m256 qd = _mm256_loadu_ps(qf + 8 * d);
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) acc[k] = _mm256_fmadd_ps(load8(keys[k] + 8 * d), qd, acc[k]);
  }
  return reduce8(acc);
}

// The same sums for two query rows at once (each key's values loaded once for both): 4 keys at a time in
// registers, the same per-lane FMA order and the same reduce8, so the same bits as dot_rows8 row by row.
template <typename T, int D8>
inline void dot_rows8_x2(const float* q0, const float* q1, const T* const* keys, __m256& s0, __m256& s1) {
  __m256 a0[8], a1[8];
  for (int half = 0; half < 2; half++) {
    __m256 c0[4], c1[4];
    for (int k = 0; k < 4; k++) c0[k] = _mm256_setzero_ps(), c1[k] = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int d = 0; d < D8; d++) {
      const __m256 qa = _mm256_loadu_ps(q0 + 8 * d), qb = _mm256_loadu_ps(q1 + 8 * d);
#pragma GCC unroll 4
      for (int k = 0; k < 4; k++) {
        const __m256 kv = load8(keys[4 * half + k] + 8 * d);
        c0[k] = _mm256_fmadd_ps(kv, qa, c0[k]);
        c1[k] = _mm256_fmadd_ps(kv, qb, c1[k]);
      }
    }
    for (int k = 0; k < 4; k++) a0[4 * half + k] = c0[k], a1[4 * half + k] = c1[k];
  }
  s0 = reduce8(a0);
  s1 = reduce8(a1);
}

// Scaled float32 queries of heads [h0, h0 + group) of a tile: qf[g][j][D].
template <typename T, int D8>
void load_queries(const Args& a, const TileView& tv, int64_t h0, int64_t group, const T* q, float* qf) {
  constexpr int D = D8 * 8;
  const __m256 vscale = _mm256_set1_ps(a.scale);
  for (int64_t g = 0; g < group; g++)
    for (int64_t j = 0; j < tv.n_q; j++) {
      const T* qr = q + (tv.q_start + j) * a.q_stride_t + (h0 + g) * a.q_stride_h;
      for (int d = 0; d < D8; d++)
        _mm256_storeu_ps(qf + (g * tv.n_q + j) * D + 8 * d, _mm256_mul_ps(load8(qr + 8 * d), vscale));
    }
}

// acc[D] = sum over the keys t of [first, last] in order of p[t] * v[t], in registers.
template <typename T, int D8>
inline void weighted_values_row(const T* const* values, const float* p, int64_t first, int64_t last, float* out) {
  __m256 acc[D8];
  for (int d = 0; d < D8; d++) acc[d] = _mm256_setzero_ps();
  for (int64_t t = first; t <= last; t++) {
    const __m256 pv = _mm256_set1_ps(p[t]);
#pragma GCC unroll 16
    for (int d = 0; d < D8; d++) acc[d] = _mm256_fmadd_ps(pv, load8(values[t] + 8 * d), acc[d]);
  }
  for (int d = 0; d < D8; d++) _mm256_storeu_ps(out + 8 * d, acc[d]);
}

// weighted_values_row for two rows at once, half a head at a time (6 + 6 accumulators for D = 96): each value is
// loaded once for both rows; a key outside a row's [first, last] adds p = 0 (fma(0, v, acc) == acc), so each row
// gets the bits weighted_values_row gives it.
template <typename T, int D8>
inline void weighted_values_x2(const T* const* values, const float* p0, int64_t first0, int64_t last0, const float* p1,
                               int64_t first1, int64_t last1, float* out0, float* out1) {
  static_assert(D8 % 2 == 0, "head_dim / 8 is even for every supported head size");
  constexpr int H8 = D8 / 2;
  const int64_t lo = std::min(first0, first1), hi = std::max(last0, last1);
  for (int d0 = 0; d0 < D8; d0 += H8) {
    __m256 acc0[H8], acc1[H8];
    for (int d = 0; d < H8; d++) acc0[d] = _mm256_setzero_ps(), acc1[d] = _mm256_setzero_ps();
    for (int64_t t = lo; t <= hi; t++) {
      const __m256 pa = _mm256_set1_ps(t >= first0 && t <= last0 ? p0[t] : 0.f);
      const __m256 pb = _mm256_set1_ps(t >= first1 && t <= last1 ? p1[t] : 0.f);
#pragma GCC unroll 8
      for (int d = 0; d < H8; d++) {
        const __m256 v = load8(values[t] + 8 * (d0 + d));
        acc0[d] = _mm256_fmadd_ps(pa, v, acc0[d]);
        acc1[d] = _mm256_fmadd_ps(pb, v, acc1[d]);
      }
    }
    for (int d = 0; d < H8; d++)
      _mm256_storeu_ps(out0 + 8 * (d0 + d), acc0[d]), _mm256_storeu_ps(out1 + 8 * (d0 + d), acc1[d]);
  }
}

// The partial softmax state of rows (g, j) over the keys of chunk `c` they can see: ml[g][j] = (max, sum of exp),
// acc[g][j][D] = sum of exp * value; a row that sees no key of the chunk gets (-inf, 0) and a zero acc.
template <typename T, int D8>
void chunk_partial(const Args& a, const TileView& tv, int64_t h0, int64_t group, int64_t c, const float* qf,
                   const T* k_cache, const T* v_cache, std::vector<float>& scores_buf, float* ml, float* acc) {
  constexpr int D = D8 * 8;
  const int64_t n_q = tv.n_q;
  const int64_t c0 = std::max(c * kKeyChunk, tv.lo[0]);
  const int64_t c1 = std::min((c + 1) * kKeyChunk, tv.pos[n_q - 1] + 1);
  const int64_t n_keys = c1 - c0;
  scores_buf.resize(static_cast<size_t>(group) * n_q * n_keys);
  float* scores = scores_buf.data();
  const int64_t row_stride = a.kv_heads * D;
  const int64_t q_per_kv = a.heads / a.kv_heads;
  const int64_t bs = a.block_size;
  int64_t first[kQueryTile], last[kQueryTile];  // the keys row j sees, relative to c0
  for (int64_t j = 0; j < n_q; j++)
    first[j] = std::max(c0, tv.lo[j]) - c0, last[j] = std::min(c1 - 1, tv.pos[j]) - c0;

  const T* krows[kKeyChunk];
  const T* vrows[kKeyChunk];
  for (int64_t t = c0, blk = c0 / bs, off = c0 % bs; t < c1; t++) {
    const int64_t row = ((int64_t)tv.table[blk] * bs + off) * row_stride;
    krows[t - c0] = k_cache + row, vrows[t - c0] = v_cache + row;
    if (++off == bs) off = 0, blk++;
  }
  // Scores, 8 keys at a time; within a block of keys every head, so a decode row streams whole token rows.
  for (int64_t t0 = 0; t0 < n_keys; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, n_keys - t0);
    for (int64_t g = 0; g < group; g++) {
      const int64_t head_off = ((h0 + g) / q_per_kv) * D;
      const T* keys[8];
      for (int64_t i = 0; i < 8; i++) keys[i] = krows[t0 + std::min(i, n - 1)] + head_off;
      for (int64_t j = 0; j < n_q; j++) {
        const bool visible = !(t0 + n - 1 < first[j] || t0 > last[j]);
        const bool pair = visible && j + 1 < n_q && !(t0 + n - 1 < first[j + 1] || t0 > last[j + 1]);
        alignas(32) float block[2][8];
        if (pair) {
          __m256 s0, s1;
          dot_rows8_x2<T, D8>(qf + (g * n_q + j) * D, qf + (g * n_q + j + 1) * D, keys, s0, s1);
          _mm256_store_ps(block[0], s0), _mm256_store_ps(block[1], s1);
        } else if (visible) {
          _mm256_store_ps(block[0], dot_rows8<T, D8>(qf + (g * n_q + j) * D, keys));
        } else {
          std::fill(block[0], block[0] + 8, kNegInf);
        }
        for (int64_t r = 0; r < (pair ? 2 : 1); r++) {
          const int64_t jr = j + r;
          for (int64_t i = 0; i < n; i++)
            if (t0 + i < first[jr] || t0 + i > last[jr]) block[r][i] = kNegInf;
          std::copy(block[r], block[r] + n, scores + (g * n_q + jr) * n_keys + t0);
        }
        if (pair) j++;
      }
    }
  }
  for (int64_t r = 0; r < group * n_q; r++) {
    const int64_t j = r % n_q;
    const int64_t n = last[j] - first[j] + 1;
    float* s = scores + r * n_keys + first[j];
    if (n <= 0) {
      ml[2 * r] = kNegInf, ml[2 * r + 1] = 0.f;
    } else {
      const float m = max_of(s, n);
      ml[2 * r] = m, ml[2 * r + 1] = exp_and_sum(s, n, m);
    }
  }
  if (n_q == 1) {
    // Values, token by token for every head (the same per-row FMA sequence as weighted_values_row).
    std::fill(acc, acc + group * D, 0.f);
    for (int64_t t = first[0]; t <= last[0]; t++) {
      for (int64_t g = 0; g < group; g++) {
        const T* vh = vrows[t] + ((h0 + g) / q_per_kv) * D;
        const __m256 p = _mm256_set1_ps(scores[g * n_keys + t]);
        float* ag = acc + g * D;
#pragma GCC unroll 16
        for (int d = 0; d < D8; d++)
          _mm256_storeu_ps(ag + 8 * d, _mm256_fmadd_ps(p, load8(vh + 8 * d), _mm256_loadu_ps(ag + 8 * d)));
      }
    }
  } else {
    for (int64_t g = 0; g < group; g++) {
      const int64_t head_off = ((h0 + g) / q_per_kv) * D;
      const T* values[kKeyChunk];
      for (int64_t t = 0; t < n_keys; t++) values[t] = vrows[t] + head_off;
      int64_t j = 0;
      for (; j + 1 < n_q; j += 2) {
        const int64_t r = g * n_q + j;
        weighted_values_x2<T, D8>(values, scores + r * n_keys, first[j], last[j], scores + (r + 1) * n_keys,
                                  first[j + 1], last[j + 1], acc + r * D, acc + (r + 1) * D);
      }
      for (; j < n_q; j++) {
        const int64_t r = g * n_q + j;
        weighted_values_row<T, D8>(values, scores + r * n_keys, first[j], last[j], acc + r * D);
      }
    }
  }
}

// Running state (M, L, A) <- merge with a chunk's (m, l, a); chunks are merged in increasing order.
template <int D8>
inline void merge(float& M, float& L, float* A, float m, float l, const float* a) {
  if (l == 0.f) return;
  if (L == 0.f) {
    M = m, L = l;
    std::copy(a, a + 8 * D8, A);
    return;
  }
  const float mx = std::max(M, m);
  const float sa = std::exp(M - mx), sb = std::exp(m - mx);
  L = L * sa + l * sb;
  const __m256 va = _mm256_set1_ps(sa), vb = _mm256_set1_ps(sb);
  for (int d = 0; d < D8; d++)
    _mm256_storeu_ps(A + 8 * d, _mm256_fmadd_ps(_mm256_loadu_ps(A + 8 * d), va, _mm256_mul_ps(_mm256_loadu_ps(a + 8 * d), vb)));
  M = mx;
}

template <typename T, int D8>
inline void write_row(T* orow, float L, const float* A) {
  const __m256 inv = _mm256_set1_ps(1.f / L);
  for (int d = 0; d < D8; d++) store8(orow + 8 * d, _mm256_mul_ps(_mm256_loadu_ps(A + 8 * d), inv));
}

template <typename T, int D8>
void run(const Args& a, const std::vector<Tile>& decode, const std::vector<Tile>& prefill, const T* q, const T* k,
         const T* v, T* out) {
  constexpr int D = D8 * 8;
  const int64_t H = a.heads;
  // Decode rows: one item per (sequence, chunk) over all heads, partial states stored, then merged per row.
  std::vector<TileView> views(decode.size());
  std::vector<int64_t> chunk_base(decode.size() + 1, 0);
  for (size_t i = 0; i < decode.size(); i++) {
    views[i] = view_of(a, decode[i]);
    chunk_base[i + 1] = chunk_base[i] + (views[i].end_chunk - views[i].first_chunk);
  }
  const int64_t n_items = chunk_base.back();
  if (n_items > 0) {
    std::vector<float> ml(n_items * H * 2), acc(n_items * H * D), qf(decode.size() * H * D);
    at::parallel_for(0, static_cast<int64_t>(decode.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; i++) load_queries<T, D8>(a, views[i], 0, H, q, qf.data() + i * H * D);
    });
    at::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores;
      for (int64_t item = i0; item < i1; item++) {
        const int64_t i = std::upper_bound(chunk_base.begin(), chunk_base.end(), item) - chunk_base.begin() - 1;
        const int64_t c = views[i].first_chunk + (item - chunk_base[i]);
        chunk_partial<T, D8>(a, views[i], 0, H, c, qf.data() + i * H * D, k, v, scores, ml.data() + item * H * 2,
                             acc.data() + item * H * D);
      }
    });
    at::parallel_for(0, static_cast<int64_t>(decode.size()) * H, 1, [&](int64_t r0, int64_t r1) {
      alignas(32) float A[D];
      for (int64_t r = r0; r < r1; r++) {
        const int64_t i = r / H, h = r % H;
        float M = kNegInf, L = 0.f;
        for (int64_t item = chunk_base[i]; item < chunk_base[i + 1]; item++)
          merge<D8>(M, L, A, ml[(item * H + h) * 2], ml[(item * H + h) * 2 + 1], acc.data() + (item * H + h) * D);
        write_row<T, D8>(out + views[i].q_start * a.o_stride_t + h * a.o_stride_h, L, A);
      }
    });
  }
  // Prefill tiles: one item per (tile, head group), chunks merged as they are computed.
  if (!prefill.empty()) {
    const int64_t group = std::max<int64_t>(1, std::min<int64_t>(H, (64 * 1024 / 4) / (kQueryTile * D)));
    const int64_t groups = (H + group - 1) / group;
    at::parallel_for(0, static_cast<int64_t>(prefill.size()) * groups, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores, qf(group * kQueryTile * D), ml(group * kQueryTile * 2), acc(group * kQueryTile * D),
          state_ml(group * kQueryTile * 2), state(group * kQueryTile * D);
      for (int64_t item = i0; item < i1; item++) {
        const TileView tv = view_of(a, prefill[item / groups]);
        const int64_t h0 = (item % groups) * group, g_n = std::min(group, H - h0);
        load_queries<T, D8>(a, tv, h0, g_n, q, qf.data());
        for (int64_t r = 0; r < g_n * tv.n_q; r++) state_ml[2 * r] = kNegInf, state_ml[2 * r + 1] = 0.f;
        for (int64_t c = tv.first_chunk; c < tv.end_chunk; c++) {
          chunk_partial<T, D8>(a, tv, h0, g_n, c, qf.data(), k, v, scores, ml.data(), acc.data());
          for (int64_t r = 0; r < g_n * tv.n_q; r++)
            merge<D8>(state_ml[2 * r], state_ml[2 * r + 1], state.data() + r * D, ml[2 * r], ml[2 * r + 1],
                      acc.data() + r * D);
        }
        for (int64_t r = 0; r < g_n * tv.n_q; r++) {
          const int64_t g = r / tv.n_q, j = r % tv.n_q;
          write_row<T, D8>(out + (tv.q_start + j) * a.o_stride_t + (h0 + g) * a.o_stride_h, state_ml[2 * r + 1],
                           state.data() + r * D);
        }
      }
    });
  }
}

template <typename T>
void dispatch_head_dim(int64_t d8, const Plan& p, const T* q, const T* k, const T* v, T* out) {
  switch (d8) {
    case 2: return run<T, 2>(p.a, p.decode, p.prefill, q, k, v, out);
    case 4: return run<T, 4>(p.a, p.decode, p.prefill, q, k, v, out);
    case 8: return run<T, 8>(p.a, p.decode, p.prefill, q, k, v, out);
    case 12: return run<T, 12>(p.a, p.decode, p.prefill, q, k, v, out);
    case 16: return run<T, 16>(p.a, p.decode, p.prefill, q, k, v, out);
    default: TORCH_CHECK(false, "xgenmm_avx2::paged_attention: head_dim ", d8 * 8, " is not supported");
  }
}

void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     double scale, int64_t sliding_window) {
  const Plan p = make_plan(out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window);
  const int64_t D = q.size(2);
  TORCH_CHECK(D % 8 == 0, "xgenmm_avx2::paged_attention: head_dim must be a multiple of 8, got ", D);
  if (q.scalar_type() == at::kFloat) {
    dispatch_head_dim<float>(D / 8, p, q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                             out.data_ptr<float>());
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_head_dim<at::BFloat16>(D / 8, p, q.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(),
                                    v_cache.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(false, "xgenmm_avx2::paged_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xgenmm_avx2, m) {
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
        &xgenmm_paged::store_kv);
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor query_start_loc, Tensor seq_lens, float scale, int sliding_window) -> ()",
      &paged_attention);
}
