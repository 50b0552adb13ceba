// Causal attention over the paged KV cache, read in place (no gather into a contiguous buffer), for a flat varlen
// batch: decode rows (one query), chunked-prefill chunks and whole prompts in one call. float32 or bfloat16 caches and
// queries; scores, softmax and the weighted sum in float32 (as torch's CPU flash attention), output in q's dtype.
//
// Layout (attention/base.py): q / out [T, H, D] (last dim contiguous), k_cache / v_cache [num_blocks, block_size,
// Hkv, D] contiguous, block_tables [B, max_blocks] int32, query_start_loc [B+1] int32, seq_lens [B] int32. Query j
// of sequence b sits at position seq_len - q_len + j and sees keys 0..position (and only the last `sliding_window`
// of them when it is > 0). Sequences with no query rows (padding) are skipped. D must be a multiple of 16.
//
// Keys are processed in fixed chunks of kKeyChunk positions (chunk c = positions [c * kKeyChunk, (c + 1) *
// kKeyChunk)). For every (query, head) row each chunk gives a partial softmax state (max, sum of exponentials,
// weighted sum of values), and the states are merged in chunk order. Every row is therefore the same sequence of
// operations whatever else is in the batch and however the work is split: a decode row equals the same position
// computed inside a prefill chunk, alone or batched (the engine's greedy output must not depend on batching or on
// preemption by recompute). Decode rows run one work item per (sequence, chunk) over all heads, streaming each
// token's rows for every head (contiguous in the cache) in order; prefill tiles run one item per (tile, head group)
// and merge their chunks as they go.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "paged_attention_plan.h"

namespace {

using namespace xgenmm_paged;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

inline float max_of(const float* s, int64_t n) {
  __m512 vmax = _mm512_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + i));
  float mx = _mm512_reduce_max_ps(vmax);
  for (; i < n; i++) mx = std::max(mx, s[i]);
  return mx;
}

// exp(x - max) in place over n floats, returns the sum.
inline float exp_and_sum(float* s, int64_t n, float max) {
  using Vec = at::vec::Vectorized<float>;
  const Vec vmax(max);
  Vec vsum(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(s + i) - vmax).exp_u20();
    e.store(s + i);
    vsum = vsum + e;
  }
  float sum = _mm512_reduce_add_ps(__m512(vsum));
  for (; i < n; i++) {
    s[i] = std::exp(s[i] - max);
    sum += s[i];
  }
  return sum;
}

struct Scratch {
  std::vector<float> scores, qf;
};

// Scaled float32 queries of heads [h0, h0 + group) of a tile: qf[g][j][D].
template <typename T, int D16>
void load_queries(const Args& a, const TileView& tv, int64_t h0, int64_t group, const T* q, float* qf) {
  constexpr int D = D16 * 16;
  const __m512 vscale = _mm512_set1_ps(a.scale);
  for (int64_t g = 0; g < group; g++)
    for (int64_t j = 0; j < tv.n_q; j++) {
      const T* qr = q + (tv.q_start + j) * a.q_stride_t + (h0 + g) * a.q_stride_h;
      for (int d = 0; d < D16; d++)
        _mm512_storeu_ps(qf + (g * tv.n_q + j) * D + 16 * d, _mm512_mul_ps(load16(qr + 16 * d), vscale));
    }
}

// q . k over D values: bf16 with VDPBF16PS on the raw (unscaled) query, float32 with FMAs on the scaled query.
template <int D16>
inline float dot_row(const at::BFloat16* qraw, const float* /*qf*/, const at::BFloat16* k, float scale) {
  __m512 acc = _mm512_setzero_ps();
  const auto* qp = reinterpret_cast<const uint16_t*>(qraw);
  const auto* kp = reinterpret_cast<const uint16_t*>(k);
  int d = 0;
  for (; d + 32 <= 16 * D16; d += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qp + d), (__m512bh)_mm512_loadu_si512(kp + d));
  if (d < 16 * D16)  // a last 16 values
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(0xffff, qp + d),
                           (__m512bh)_mm512_maskz_loadu_epi16(0xffff, kp + d));
  return _mm512_reduce_add_ps(acc) * scale;
}
template <int D16>
inline float dot_row(const float* /*qraw*/, const float* qf, const float* k, float /*scale*/) {
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(k), _mm512_loadu_ps(qf));
  for (int d = 1; d < D16; d++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * d), _mm512_loadu_ps(qf + 16 * d), acc);
  return _mm512_reduce_add_ps(acc);
}

// 16 keys' lane accumulators -> their 16 sums in key order, each key's lanes summed in _mm512_reduce_add_ps's order
// (lane i + 8 onto i, then i + 4, i + 2, i + 1), with a quarter of the shuffles of 16 separate reductions.
inline __m512 reduce16(const __m512 (&a)[16]) {
  __m512 x[8], y[4], z[2];
#pragma GCC unroll 8
  for (int p = 0; p < 8; p++)  // [key 2p: lanes 0-7 | key 2p+1: lanes 0-7], lane i = a[i] + a[i + 8]
    x[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                         _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)));
#pragma GCC unroll 4
  for (int q = 0; q < 4; q++)  // 128-bit lane l: key 4q + l, partial i = (i + 4) + i
    y[q] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * q], x[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                         _mm512_shuffle_f32x4(x[2 * q], x[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)));
#pragma GCC unroll 2
  for (int r = 0; r < 2; r++)  // lane l: [key 8r + l: p0 + p2, p1 + p3 | key 8r + 4 + l: same]
    z[r] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * r], y[2 * r + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(y[2 * r], y[2 * r + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane l: keys l, 4 + l, 8 + l, 12 + l, each (p0 + p2) + (p1 + p3)
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i key_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(key_order, w);
}

// q . k for one query and keys[0..n) (n <= 16; missing keys give 0): bf16 with VDPBF16PS on the raw query (times
// the scale after the sum), float32 with FMAs on the scaled query; each key's D values accumulate in 16 lanes.
template <int D16>
inline __m512 dot_rows16(const at::BFloat16* qraw, const float* /*qf*/, const at::BFloat16* const* keys, int64_t n,
                         float scale) {
  constexpr int D = 16 * D16;
  const auto* qp = reinterpret_cast<const uint16_t*>(qraw);
  __m512bh qv[(D + 31) / 32];
#pragma GCC unroll 8
  for (int d = 0; d + 32 <= D; d += 32) qv[d / 32] = (__m512bh)_mm512_loadu_si512(qp + d);
  if (D % 32) qv[D / 32] = (__m512bh)_mm512_maskz_loadu_epi16(0xffff, qp + D - 16);
  __m512 acc[16];
#pragma GCC unroll 16
  for (int k = 0; k < 16; k++) {
    acc[k] = _mm512_setzero_ps();
    if (k >= n) continue;
    const auto* kp = reinterpret_cast<const uint16_t*>(keys[k]);
#pragma GCC unroll 8
    for (int d = 0; d + 32 <= D; d += 32)
      acc[k] = _mm512_dpbf16_ps(acc[k], qv[d / 32], (__m512bh)_mm512_loadu_si512(kp + d));
    if (D % 32)
      acc[k] = _mm512_dpbf16_ps(acc[k], qv[D / 32], (__m512bh)_mm512_maskz_loadu_epi16(0xffff, kp + D - 16));
  }
  return _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
}
template <int D16>
inline __m512 dot_rows16(const float* /*qraw*/, const float* qf, const float* const* keys, int64_t n,
                         float /*scale*/) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int k = 0; k < 16; k++) {
    acc[k] = _mm512_setzero_ps();
    if (k >= n) continue;
    acc[k] = _mm512_mul_ps(_mm512_loadu_ps(keys[k]), _mm512_loadu_ps(qf));
#pragma GCC unroll 8
    for (int d = 1; d < D16; d++)
      acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(keys[k] + 16 * d), _mm512_loadu_ps(qf + 16 * d), acc[k]);
  }
  return reduce16(acc);
}

// acc[jj][D] = sum over the chunk's keys t (ascending) of p[jj][t] * v[t] for NJ query rows, in registers; p is 0
// where a row does not see t (fma(0, v, acc) == acc: the same bits as skipping the key).
template <typename T, int D16, int NJ>
inline void weighted_values(const T* const* vrows, int64_t n_keys, const float* const* p, const int64_t* first,
                            const int64_t* last, float* const* out) {
  __m512 acc[NJ][D16];
#pragma GCC unroll 4
  for (int jj = 0; jj < NJ; jj++)
#pragma GCC unroll 8
    for (int d = 0; d < D16; d++) acc[jj][d] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n_keys; t++) {
    __m512 vv[D16];
#pragma GCC unroll 8
    for (int d = 0; d < D16; d++) vv[d] = load16(vrows[t] + 16 * d);
#pragma GCC unroll 4
    for (int jj = 0; jj < NJ; jj++) {
      const __m512 pv = _mm512_set1_ps(t >= first[jj] && t <= last[jj] ? p[jj][t] : 0.f);
#pragma GCC unroll 8
      for (int d = 0; d < D16; d++) acc[jj][d] = _mm512_fmadd_ps(pv, vv[d], acc[jj][d]);
    }
  }
#pragma GCC unroll 4
  for (int jj = 0; jj < NJ; jj++)
#pragma GCC unroll 8
    for (int d = 0; d < D16; d++) _mm512_storeu_ps(out[jj] + 16 * d, acc[jj][d]);
}

// The partial softmax state of rows (g, j) over the keys of chunk `c` they can see: ml[g][j] = (max, sum of exp),
// acc[g][j][D] = sum of exp * value; a row that sees no key of the chunk gets (-inf, 0) and a zero acc.
template <typename T, int D16>
void chunk_partial(const Args& a, const TileView& tv, int64_t h0, int64_t group, int64_t c, const float* qf,
                   const T* q, const T* k_cache, const T* v_cache, std::vector<float>& scores_buf, float* ml,
                   float* acc) {
  constexpr int D = D16 * 16;
  const int64_t n_q = tv.n_q;
  const int64_t c0 = std::max(c * kKeyChunk, tv.lo[0]);
  const int64_t c1 = std::min((c + 1) * kKeyChunk, tv.pos[n_q - 1] + 1);
  const int64_t n_keys = c1 - c0;
  scores_buf.resize(static_cast<size_t>(group) * n_q * n_keys);
  float* scores = scores_buf.data();
  const int64_t row_stride = a.kv_heads * D;
  const int64_t q_per_kv = a.heads / a.kv_heads;
  const int64_t bs = a.block_size;

  // Every key / value row of the chunk (a token's rows for all heads are contiguous). A decode row streams them
  // token by token for every head in order; a query tile goes head by head, 16 keys at a time for the scores and
  // register blocks of query rows for the values (~2x faster at prefill). Both give the same bits for a row.
  const T* krows[kKeyChunk];
  const T* vrows[kKeyChunk];
  for (int64_t t = c0, blk = c0 / bs, off = c0 % bs; t < c1; t++) {
    const int64_t row = ((int64_t)tv.table[blk] * bs + off) * row_stride;
    krows[t - c0] = k_cache + row, vrows[t - c0] = v_cache + row;
    if (++off == bs) off = 0, blk++;
  }
  if (n_q == 1) {
    for (int64_t t = c0; t < c1; t++) {  // scores, token by token
      const T* kr = krows[t - c0];
      for (int64_t g = 0; g < group; g++) {
        const T* kh = kr + ((h0 + g) / q_per_kv) * D;
        for (int64_t j = 0; j < n_q; j++) {
          float s = kNegInf;
          if (t >= tv.lo[j] && t <= tv.pos[j]) {
            const T* qraw = q + (tv.q_start + j) * a.q_stride_t + (h0 + g) * a.q_stride_h;
            s = dot_row<D16>(qraw, qf + (g * n_q + j) * D, kh, a.scale);
          }
          scores[(g * n_q + j) * n_keys + (t - c0)] = s;
        }
      }
    }
  } else {
    // Scores, 16 keys at a time per (head, query) row; keys a row cannot see get -inf.
    for (int64_t g = 0; g < group; g++) {
      const int64_t head_off = ((h0 + g) / q_per_kv) * D;
      const T* keys[kKeyChunk];
      for (int64_t t = 0; t < n_keys; t++) keys[t] = krows[t] + head_off;
      for (int64_t j = 0; j < n_q; j++) {
        const T* qraw = q + (tv.q_start + j) * a.q_stride_t + (h0 + g) * a.q_stride_h;
        const float* qrow = qf + (g * n_q + j) * D;
        float* srow = scores + (g * n_q + j) * n_keys;
        const int64_t first = std::max(c0, tv.lo[j]) - c0, last = std::min(c1 - 1, tv.pos[j]) - c0;
        for (int64_t t0 = 0; t0 < n_keys; t0 += 16) {
          const int64_t n = std::min<int64_t>(16, n_keys - t0);
          alignas(64) float block[16];
          if (t0 + n - 1 < first || t0 > last) {
            std::fill(block, block + 16, kNegInf);
          } else {
            _mm512_store_ps(block, dot_rows16<D16>(qraw, qrow, keys + t0, n, a.scale));
            for (int64_t i = 0; i < n; i++)
              if (t0 + i < first || t0 + i > last) block[i] = kNegInf;
          }
          std::copy(block, block + n, srow + t0);
        }
      }
    }
  }
  for (int64_t r = 0; r < group * n_q; r++) {
    const int64_t j = r % n_q;
    const int64_t first = std::max(c0, tv.lo[j]), last = std::min(c1 - 1, tv.pos[j]);
    float* s = scores + r * n_keys + (first - c0);
    const int64_t n = last - first + 1;
    if (n <= 0) {
      ml[2 * r] = kNegInf, ml[2 * r + 1] = 0.f;
    } else {
      const float m = max_of(s, n);
      ml[2 * r] = m, ml[2 * r + 1] = exp_and_sum(s, n, m);
    }
    if (n_q == 1) std::fill(acc + r * D, acc + (r + 1) * D, 0.f);  // decode rows accumulate in place
  }
  if (n_q == 1) {
    for (int64_t t = c0; t < c1; t++) {  // values, token by token
      const T* vr = vrows[t - c0];
      for (int64_t g = 0; g < group; g++) {
        const T* vh = vr + ((h0 + g) / q_per_kv) * D;
        __m512 vv[D16];
        for (int d = 0; d < D16; d++) vv[d] = load16(vh + 16 * d);
        for (int64_t j = 0; j < n_q; j++) {
          if (t < tv.lo[j] || t > tv.pos[j]) continue;
          const __m512 p = _mm512_set1_ps(scores[(g * n_q + j) * n_keys + (t - c0)]);
          float* aj = acc + (g * n_q + j) * D;
          for (int d = 0; d < D16; d++)
            _mm512_storeu_ps(aj + 16 * d, _mm512_fmadd_ps(p, vv[d], _mm512_loadu_ps(aj + 16 * d)));
        }
      }
    }
  } else {
    // Values: up to 4 query rows of a head at a time, accumulated in registers over the chunk's keys in order.
    constexpr int kRows = D16 <= 6 ? 4 : 2;
    for (int64_t g = 0; g < group; g++) {
      const int64_t head_off = ((h0 + g) / q_per_kv) * D;
      const T* values[kKeyChunk];
      for (int64_t t = 0; t < n_keys; t++) values[t] = vrows[t] + head_off;
      for (int64_t j0 = 0; j0 < n_q; j0 += kRows) {
        const int nj = static_cast<int>(std::min<int64_t>(kRows, n_q - j0));
        const float* p[kRows];
        int64_t first[kRows], last[kRows];
        float* out[kRows];
        for (int jj = 0; jj < nj; jj++) {
          const int64_t j = j0 + jj, r = g * n_q + j;
          p[jj] = scores + r * n_keys;
          first[jj] = std::max(c0, tv.lo[j]) - c0, last[jj] = std::min(c1 - 1, tv.pos[j]) - c0;
          out[jj] = acc + r * D;
        }
        switch (nj) {
          case 1: weighted_values<T, D16, 1>(values, n_keys, p, first, last, out); break;
          case 2: weighted_values<T, D16, 2>(values, n_keys, p, first, last, out); break;
          case 3: weighted_values<T, D16, (kRows >= 3 ? 3 : 1)>(values, n_keys, p, first, last, out); break;
          default: weighted_values<T, D16, kRows>(values, n_keys, p, first, last, out); break;
        }
      }
    }
  }
}

// Running state (M, L, A) <- merge with a chunk's (m, l, a); chunks are merged in increasing order.
template <int D16>
inline void merge(float& M, float& L, float* A, float m, float l, const float* a) {
  if (l == 0.f) return;
  if (L == 0.f) {
    M = m, L = l;
    std::copy(a, a + 16 * D16, A);
    return;
  }
  const float mx = std::max(M, m);
  const float sa = std::exp(M - mx), sb = std::exp(m - mx);
  L = L * sa + l * sb;
  const __m512 va = _mm512_set1_ps(sa), vb = _mm512_set1_ps(sb);
  for (int d = 0; d < D16; d++)
    _mm512_storeu_ps(A + 16 * d, _mm512_fmadd_ps(_mm512_loadu_ps(A + 16 * d), va, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * d), vb)));
  M = mx;
}

template <typename T, int D16>
inline void write_row(T* orow, float L, const float* A) {
  const __m512 inv = _mm512_set1_ps(1.f / L);
  for (int d = 0; d < D16; d++) store16(orow + 16 * d, _mm512_mul_ps(_mm512_loadu_ps(A + 16 * d), inv));
}

template <typename T, int D16>
void run(const Args& a, const std::vector<Tile>& decode, const std::vector<Tile>& prefill, const T* q, const T* k,
         const T* v, T* out) {
  constexpr int D = D16 * 16;
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
      for (int64_t i = i0; i < i1; i++) load_queries<T, D16>(a, views[i], 0, H, q, qf.data() + i * H * D);
    });
    at::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores;
      for (int64_t item = i0; item < i1; item++) {
        const int64_t i = std::upper_bound(chunk_base.begin(), chunk_base.end(), item) - chunk_base.begin() - 1;
        const int64_t c = views[i].first_chunk + (item - chunk_base[i]);
        chunk_partial<T, D16>(a, views[i], 0, H, c, qf.data() + i * H * D, q, k, v, scores, ml.data() + item * H * 2,
                              acc.data() + item * H * D);
      }
    });
    at::parallel_for(0, static_cast<int64_t>(decode.size()) * H, 1, [&](int64_t r0, int64_t r1) {
      alignas(64) float A[D];
      for (int64_t r = r0; r < r1; r++) {
        const int64_t i = r / H, h = r % H;
        float M = kNegInf, L = 0.f;
        for (int64_t item = chunk_base[i]; item < chunk_base[i + 1]; item++)
          merge<D16>(M, L, A, ml[(item * H + h) * 2], ml[(item * H + h) * 2 + 1], acc.data() + (item * H + h) * D);
        write_row<T, D16>(out + views[i].q_start * a.o_stride_t + h * a.o_stride_h, L, A);
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
        load_queries<T, D16>(a, tv, h0, g_n, q, qf.data());
        for (int64_t r = 0; r < g_n * tv.n_q; r++) state_ml[2 * r] = kNegInf, state_ml[2 * r + 1] = 0.f;
        for (int64_t c = tv.first_chunk; c < tv.end_chunk; c++) {
          chunk_partial<T, D16>(a, tv, h0, g_n, c, qf.data(), q, k, v, scores, ml.data(), acc.data());
          for (int64_t r = 0; r < g_n * tv.n_q; r++)
            merge<D16>(state_ml[2 * r], state_ml[2 * r + 1], state.data() + r * D, ml[2 * r], ml[2 * r + 1],
                       acc.data() + r * D);
        }
        for (int64_t r = 0; r < g_n * tv.n_q; r++) {
          const int64_t g = r / tv.n_q, j = r % tv.n_q;
          write_row<T, D16>(out + (tv.q_start + j) * a.o_stride_t + (h0 + g) * a.o_stride_h, state_ml[2 * r + 1],
                            state.data() + r * D);
        }
      }
    });
  }
}

template <typename T>
void dispatch_head_dim(int64_t d16, const Args& a, const std::vector<Tile>& decode, const std::vector<Tile>& prefill,
                       const T* q, const T* k, const T* v, T* out) {
  switch (d16) {
    case 1: return run<T, 1>(a, decode, prefill, q, k, v, out);
    case 2: return run<T, 2>(a, decode, prefill, q, k, v, out);
    case 4: return run<T, 4>(a, decode, prefill, q, k, v, out);
    case 6: return run<T, 6>(a, decode, prefill, q, k, v, out);
    case 8: return run<T, 8>(a, decode, prefill, q, k, v, out);
    default: TORCH_CHECK(false, "xgenmm_cpu::paged_attention: head_dim ", d16 * 16, " is not supported");
  }
}

void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     double scale, int64_t sliding_window) {
  const Plan p = make_plan(out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window);
  const int64_t D = q.size(2);
  TORCH_CHECK(D % 16 == 0, "xgenmm_cpu::paged_attention: head_dim must be a multiple of 16, got ", D);
  if (q.scalar_type() == at::kFloat) {
    dispatch_head_dim<float>(D / 16, p.a, p.decode, p.prefill, q.data_ptr<float>(), k_cache.data_ptr<float>(),
                             v_cache.data_ptr<float>(), out.data_ptr<float>());
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_head_dim<at::BFloat16>(D / 16, p.a, p.decode, p.prefill, q.data_ptr<at::BFloat16>(),
                                    k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
                                    out.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(false, "xgenmm_cpu::paged_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xgenmm_cpu, m) {
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
        &xgenmm_paged::store_kv);
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor query_start_loc, Tensor seq_lens, float scale, int sliding_window) -> ()",
      &paged_attention);
}
