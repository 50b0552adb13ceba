// The small ops of a bf16 Phi-3 decoder layer fused for the CPU: RMSNorm, residual add + RMSNorm, SiLU(gate) * up
// and rotate-half RoPE in place. The CPU counterpart of `model/fused_ops.py` (Triton, CUDA), with the same
// interface and the same roundings.
//
// Why: at decode sizes a layer's work is its weight reads, but the plain torch path runs ~40 small ops per layer
// (a bf16 RMSNorm is 6 of them, rotate-half RoPE ~16 with its table lookups), each paying dispatch and an
// allocation; at full size that is ~6% of a single-stream decode step. These bring a layer to ~11 calls.
//
// Roundings follow transformers' bf16 ops as torch computes them on CPU (each op in fp32, rounded to bf16 once):
// `residual + x` rounded before the norm, `x * rsqrt(mean(x^2) + eps)` rounded before the weight multiply, each
// RoPE product rounded before the sum, SiLU rounded before the multiply by `up`. Only the norm's reduction order
// and exp's last fp32 ulp differ. Every row is computed alone by the same instructions, so results never depend
// on the batch (the engine's bf16 batch invariance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline void store_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

inline __m512 round_bf16(__m512 v) {  // to nearest even, as torch rounds fp32 -> bf16
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// exp(x) to ~1 fp32 ulp: x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial, scaled by 2^n.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.f)), _mm512_set1_ps(-110.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One row: out = weight * round(s * rsqrt(mean(s^2) + eps)) with s = x, or s = round(x + residual) (written to sum).
void norm_row(const uint16_t* x, const uint16_t* residual, uint16_t* sum, const uint16_t* weight, uint16_t* out,
              int64_t dim, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < dim; j += 16) {
    const __mmask16 m = tail_mask(dim - j);
    __m512 v = load_bf16(x + j, m);
    if (residual != nullptr) {
      v = round_bf16(_mm512_add_ps(v, load_bf16(residual + j, m)));
      store_bf16(sum + j, v, m);
    }
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(dim) + eps);
  const __m512 inv_v = _mm512_set1_ps(inv);
  const uint16_t* s = residual != nullptr ? sum : x;
  for (int64_t j = 0; j < dim; j += 16) {
    const __mmask16 m = tail_mask(dim - j);
    const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(s + j, m), inv_v));
    store_bf16(out + j, _mm512_mul_ps(load_bf16(weight + j, m), normed), m);
  }
}

const uint16_t* cdata(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* mdata(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

at::Tensor rows_of(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, what, ": needs a bf16 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1, what, ": needs at least one dimension");
  at::Tensor rows = x.reshape({-1, x.size(-1)});
  return rows.stride(-1) == 1 ? rows : rows.contiguous();
}

void check_weight(const at::Tensor& weight, int64_t dim, const char* what) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 1 && weight.size(0) == dim &&
                  weight.is_contiguous(),
              what, ": weight must be a contiguous bf16 [", dim, "] tensor");
}

int64_t rows_per_task(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor rows = rows_of(x, "rms_norm");
  const int64_t n = rows.size(0), dim = rows.size(1);
  check_weight(weight, dim, "rms_norm");
  at::Tensor out = at::empty({n, dim}, rows.options());
  const uint16_t* xp = cdata(rows);
  const uint16_t* wp = cdata(weight);
  uint16_t* op = mdata(out);
  const int64_t ld = rows.stride(0);
  at::parallel_for(0, n, rows_per_task(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) norm_row(xp + i * ld, nullptr, nullptr, wp, op + i * dim, dim, (float)eps);
  });
  return out.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(),
              "add_rms_norm: x and residual need the same shape and dtype");
  at::Tensor rows = rows_of(x, "add_rms_norm");
  at::Tensor res_rows = rows_of(residual, "add_rms_norm");
  const int64_t n = rows.size(0), dim = rows.size(1);
  check_weight(weight, dim, "add_rms_norm");
  at::Tensor out = at::empty({n, dim}, rows.options());
  at::Tensor sum = at::empty({n, dim}, rows.options());
  const uint16_t* xp = cdata(rows);
  const uint16_t* rp = cdata(res_rows);
  const uint16_t* wp = cdata(weight);
  uint16_t* op = mdata(out);
  uint16_t* sp = mdata(sum);
  const int64_t ldx = rows.stride(0), ldr = res_rows.stride(0);
  at::parallel_for(0, n, rows_per_task(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++)
      norm_row(xp + i * ldx, rp + i * ldr, sp + i * dim, wp, op + i * dim, dim, (float)eps);
  });
  return {out.view(x.sizes()), sum.view(x.sizes())};
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  at::Tensor rows = rows_of(gate_up, "silu_and_mul");
  const int64_t n = rows.size(0), width = rows.size(1) / 2;
  TORCH_CHECK(rows.size(1) % 2 == 0, "silu_and_mul: the last dimension must be even");
  at::Tensor out = at::empty({n, width}, rows.options());
  const uint16_t* xp = cdata(rows);
  uint16_t* op = mdata(out);
  const int64_t ld = rows.stride(0);
  at::parallel_for(0, n, rows_per_task(width), [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t i = begin; i < end; i++) {
      const uint16_t* gate = xp + i * ld;
      const uint16_t* up = gate + width;
      uint16_t* o = op + i * width;
      for (int64_t j = 0; j < width; j += 16) {
        const __mmask16 m = tail_mask(width - j);
        const __m512 g = load_bf16(gate + j, m);
        const __m512 act = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
        store_bf16(o + j, _mm512_mul_ps(load_bf16(up + j, m), act), m);
      }
    }
  });
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = width;
  return out.view(shape);
}

// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin on the first `half` dims / the next `half` of each head.
void rotate_heads(uint16_t* base, int64_t stride_h, int64_t heads, const float* cos, const float* sin, int64_t half) {
  for (int64_t h = 0; h < heads; h++) {
    uint16_t* x = base + h * stride_h;
    for (int64_t j = 0; j < half; j += 16) {
      const __mmask16 m = tail_mask(half - j);
      const __m512 c = round_bf16(_mm512_maskz_loadu_ps(m, cos + j));
      const __m512 s = round_bf16(_mm512_maskz_loadu_ps(m, sin + j));
      const __m512 x1 = load_bf16(x + j, m);
      const __m512 x2 = load_bf16(x + half + j, m);
      const __m512 o1 = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, c)), round_bf16(_mm512_mul_ps(x2, s)));
      const __m512 o2 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c)), round_bf16(_mm512_mul_ps(x1, s)));
      store_bf16(x + j, o1, m);
      store_bf16(x + half + j, o2, m);
    }
  }
}

void rotary_embedding_(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& cos_sin, int64_t rotary_dim) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && q.device().is_cpu() &&
                  k.device().is_cpu(), "rotary_embedding_: q and k must be bf16 CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.stride(2) == 1 && k.stride(2) == 1,
              "rotary_embedding_: q [T, H, D] and k [T, Hkv, D] with a contiguous last dimension");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 3 && cos_sin.size(0) == 2 &&
                  cos_sin.size(2) == rotary_dim && cos_sin.is_contiguous(),
              "rotary_embedding_: the table must be a contiguous float32 [2, positions, rotary_dim] tensor");
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= q.size(2), "rotary_embedding_: bad rotary_dim ", rotary_dim);
  at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == q.size(0), "rotary_embedding_: one position per token");
  const int64_t tokens = q.size(0), max_pos = cos_sin.size(1), half = rotary_dim / 2;
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; t++)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_pos, "rotary_embedding_: position ", pp[t], " outside the table (",
                max_pos, ")");
  const float* table = cos_sin.data_ptr<float>();
  uint16_t* qp = reinterpret_cast<uint16_t*>(q.data_ptr());
  uint16_t* kp = reinterpret_cast<uint16_t*>(k.data_ptr());
  const int64_t qh = q.size(1), kh = k.size(1);
  at::parallel_for(0, tokens, rows_per_task((qh + kh) * rotary_dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      // emb = cat(freqs, freqs): the first half of a table row serves both halves
      const float* cos = table + pp[t] * rotary_dim;
      const float* sin = table + (max_pos + pp[t]) * rotary_dim;
      rotate_heads(qp + t * q.stride(0), q.stride(1), qh, cos, sin, half);
      rotate_heads(kp + t * k.stride(0), k.stride(1), kh, cos, sin, half);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xgenmm_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def("silu_and_mul(Tensor gate_up) -> Tensor", &silu_and_mul);
  m.def("rotary_embedding_(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_sin, int rotary_dim) -> ()", &rotary_embedding_);
}
