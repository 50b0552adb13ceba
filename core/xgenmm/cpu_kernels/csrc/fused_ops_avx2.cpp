// The small ops of a Phi-3 decoder layer fused for AVX2 CPUs, float32 and bf16: RMSNorm, residual add + RMSNorm,
// SiLU(gate) * up and rotate-half RoPE in place (`torch.ops.xgenmm_avx2.*`, see `model/cpu_fused_ops.py`). The
// AVX2 half of `fused_ops.cpp` (bf16 only, AVX-512 BF16), with the same interface.
//
// Why: at decode sizes a layer's work is its weight reads, but the plain torch path runs ~40 small ops per layer,
// each paying dispatch and an allocation (~4% of a full-size float32 one-stream decode step on an AVX2 CPU).
//
// Roundings follow the plain torch path (`model/phi3.py`) op by op: in float32 every product and sum is rounded
// once as torch rounds it (this file is built with -ffp-contract=off, so no multiply-add is fused behind our back):
// RoPE is bit-identical, SiLU differs only in exp's last ulp, the norms only in their reduction order. In bf16 each
// op computes in float32 and rounds to bf16 where transformers' bf16 ops round (as fused_ops.cpp). Every row is
// computed alone by the same instructions, so results never depend on the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// Lane masks for a tail of `remaining` (< 8) floats.
inline __m256i tail_mask(int64_t remaining) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(remaining, 8))), idx);
}

inline __m256 load8(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n));
}
inline __m256 load8(const at::BFloat16* p, int64_t n) {
  __m128i v;
  if (n >= 8) {
    v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t buf[8] = {0};
    std::memcpy(buf, p, n * sizeof(uint16_t));
    v = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// float32 -> bf16 bits, round to nearest even; NaN -> 0x7fc0 (c10::BFloat16's rounding), in 32-bit lanes.
inline __m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, tail_mask(n), v);
}
inline void store8(at::BFloat16* p, __m256 v, int64_t n) {
  const __m256i r = bf16_bits(v);
  const __m128i packed = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8));
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  } else {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), packed);
    std::memcpy(p, buf, n * sizeof(uint16_t));
  }
}

// The value a float32 result has once stored in T: itself for float32, rounded to bf16 for bf16.
template <typename T>
inline __m256 round_to(__m256 v);
template <>
inline __m256 round_to<float>(__m256 v) { return v; }
template <>
inline __m256 round_to<at::BFloat16>(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }

// exp(x) to ~1 fp32 ulp: x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial, scaled by 2^n.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(100.f)), _mm256_set1_ps(-110.f));  // past them: inf, 0
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // 2^n in two factors: each stays a normal float, their product overflows / underflows as exp does
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

inline float hsum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

// One row: out = weight * T(s * rsqrt(mean(s^2) + eps)) with s = x, or s = T(x + residual) (written to sum).
template <typename T>
void norm_row(const T* x, const T* residual, T* sum, const T* weight, T* out, int64_t dim, float eps) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < dim; j += 8) {
    const int64_t n = dim - j;
    __m256 v = load8(x + j, n);
    if (residual != nullptr) {
      v = round_to<T>(_mm256_add_ps(v, load8(residual + j, n)));
      store8(sum + j, v, n);
    }
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const float inv = 1.f / std::sqrt(hsum(acc) / static_cast<float>(dim) + eps);
  const __m256 inv_v = _mm256_set1_ps(inv);
  const T* s = residual != nullptr ? sum : x;
  for (int64_t j = 0; j < dim; j += 8) {
    const int64_t n = dim - j;
    const __m256 normed = round_to<T>(_mm256_mul_ps(load8(s + j, n), inv_v));
    store8(out + j, _mm256_mul_ps(load8(weight + j, n), normed), n);
  }
}

at::Tensor rows_of(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), what,
              ": needs a float32 or bf16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1, what, ": needs at least one dimension");
  at::Tensor rows = x.reshape({-1, x.size(-1)});
  return rows.stride(-1) == 1 ? rows : rows.contiguous();
}

void check_weight(const at::Tensor& weight, const at::Tensor& x, int64_t dim, const char* what) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == dim &&
                  weight.is_contiguous(),
              what, ": weight must be a contiguous [", dim, "] tensor of x's dtype (", x.scalar_type(), ")");
}

int64_t rows_per_task(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

template <typename T>
void norm_rows(const at::Tensor& rows, const at::Tensor* res_rows, at::Tensor* sum, const at::Tensor& weight,
               at::Tensor& out, float eps) {
  const int64_t n = rows.size(0), dim = rows.size(1);
  const T* xp = rows.data_ptr<T>();
  const T* rp = res_rows ? res_rows->data_ptr<T>() : nullptr;
  T* sp = sum ? sum->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t ldx = rows.stride(0), ldr = res_rows ? res_rows->stride(0) : 0;
  at::parallel_for(0, n, rows_per_task(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++)
      norm_row<T>(xp + i * ldx, rp ? rp + i * ldr : nullptr, sp ? sp + i * dim : nullptr, wp, op + i * dim, dim, eps);
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor rows = rows_of(x, "rms_norm");
  check_weight(weight, x, rows.size(1), "rms_norm");
  at::Tensor out = at::empty({rows.size(0), rows.size(1)}, rows.options());
  if (x.scalar_type() == at::kFloat) norm_rows<float>(rows, nullptr, nullptr, weight, out, (float)eps);
  else norm_rows<at::BFloat16>(rows, nullptr, nullptr, weight, out, (float)eps);
  return out.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(),
              "add_rms_norm: x and residual need the same shape and dtype");
  at::Tensor rows = rows_of(x, "add_rms_norm");
  at::Tensor res_rows = rows_of(residual, "add_rms_norm");
  check_weight(weight, x, rows.size(1), "add_rms_norm");
  at::Tensor out = at::empty({rows.size(0), rows.size(1)}, rows.options());
  at::Tensor sum = at::empty({rows.size(0), rows.size(1)}, rows.options());
  if (x.scalar_type() == at::kFloat) norm_rows<float>(rows, &res_rows, &sum, weight, out, (float)eps);
  else norm_rows<at::BFloat16>(rows, &res_rows, &sum, weight, out, (float)eps);
  return {out.view(x.sizes()), sum.view(x.sizes())};
}

// up * T(silu(gate)), silu(g) = g / (1 + exp(-g)) as torch computes it.
template <typename T>
void silu_rows(const at::Tensor& rows, at::Tensor& out) {
  const int64_t n = rows.size(0), width = rows.size(1) / 2, ld = rows.stride(0);
  const T* xp = rows.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n, rows_per_task(width), [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (int64_t i = begin; i < end; i++) {
      const T* gate = xp + i * ld;
      const T* up = gate + width;
      T* o = op + i * width;
      for (int64_t j = 0; j < width; j += 8) {
        const int64_t m = width - j;
        const __m256 g = load8(gate + j, m);
        const __m256 act = round_to<T>(_mm256_div_ps(g, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g)))));
        store8(o + j, _mm256_mul_ps(load8(up + j, m), act), m);
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  at::Tensor rows = rows_of(gate_up, "silu_and_mul");
  TORCH_CHECK(rows.size(1) % 2 == 0, "silu_and_mul: the last dimension must be even");
  at::Tensor out = at::empty({rows.size(0), rows.size(1) / 2}, rows.options());
  if (gate_up.scalar_type() == at::kFloat) silu_rows<float>(rows, out);
  else silu_rows<at::BFloat16>(rows, out);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = rows.size(1) / 2;
  return out.view(shape);
}

// x1' = T(x1 T(cos)) - T(x2 T(sin)), x2' = T(x2 T(cos)) + T(x1 T(sin)) on the first `half` dims / the next `half`.
template <typename T>
void rotate_heads(T* base, int64_t stride_h, int64_t heads, const float* cos, const float* sin, int64_t half) {
  for (int64_t h = 0; h < heads; h++) {
    T* x = base + h * stride_h;
    for (int64_t j = 0; j < half; j += 8) {
      const int64_t m = half - j;
      const __m256 c = round_to<T>(load8(cos + j, m));
      const __m256 s = round_to<T>(load8(sin + j, m));
      const __m256 x1 = load8(x + j, m);
      const __m256 x2 = load8(x + half + j, m);
      const __m256 o1 = _mm256_sub_ps(round_to<T>(_mm256_mul_ps(x1, c)), round_to<T>(_mm256_mul_ps(x2, s)));
      const __m256 o2 = _mm256_add_ps(round_to<T>(_mm256_mul_ps(x2, c)), round_to<T>(_mm256_mul_ps(x1, s)));
      store8(x + j, o1, m);
      store8(x + half + j, o2, m);
    }
  }
}

template <typename T>
void rotate_tokens(const int64_t* pp, const at::Tensor& q, const at::Tensor& k, const float* table, int64_t max_pos,
                   int64_t rotary_dim) {
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const int64_t qh = q.size(1), kh = k.size(1), half = rotary_dim / 2;
  at::parallel_for(0, q.size(0), rows_per_task((qh + kh) * rotary_dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      // emb = cat(freqs, freqs): the first half of a table row serves both halves
      const float* cos = table + pp[t] * rotary_dim;
      const float* sin = table + (max_pos + pp[t]) * rotary_dim;
      rotate_heads<T>(qp + t * q.stride(0), q.stride(1), qh, cos, sin, half);
      rotate_heads<T>(kp + t * k.stride(0), k.stride(1), kh, cos, sin, half);
    }
  });
}

void rotary_embedding_(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& cos_sin, int64_t rotary_dim) {
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && q.device().is_cpu() && k.device().is_cpu(),
              "rotary_embedding_: q and k must be float32 or bf16 CPU tensors of one dtype");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.stride(2) == 1 && k.stride(2) == 1,
              "rotary_embedding_: q [T, H, D] and k [T, Hkv, D] with a contiguous last dimension");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 3 && cos_sin.size(0) == 2 &&
                  cos_sin.size(2) == rotary_dim && cos_sin.is_contiguous(),
              "rotary_embedding_: the table must be a contiguous float32 [2, positions, rotary_dim] tensor");
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= q.size(2), "rotary_embedding_: bad rotary_dim ", rotary_dim);
  at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == q.size(0), "rotary_embedding_: one position per token");
  const int64_t max_pos = cos_sin.size(1);
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); t++)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_pos, "rotary_embedding_: position ", pp[t], " outside the table (",
                max_pos, ")");
  if (q.scalar_type() == at::kFloat) rotate_tokens<float>(pp, q, k, cos_sin.data_ptr<float>(), max_pos, rotary_dim);
  else rotate_tokens<at::BFloat16>(pp, q, k, cos_sin.data_ptr<float>(), max_pos, rotary_dim);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xgenmm_avx2, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def("silu_and_mul(Tensor gate_up) -> Tensor", &silu_and_mul);
  m.def("rotary_embedding_(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_sin, int rotary_dim) -> ()", &rotary_embedding_);
}
