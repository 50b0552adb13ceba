// The input/output plumbing both bf16 linear kernels share: x flattened to [M, K] rows, the bf16 [M, N] output,
// the bias as float32 (added before the one rounding), and the output's shape (x's leading dims, then N).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

struct LinearIO {
  at::Tensor x2, y, bias_f;
  std::vector<int64_t> out_shape;
  int64_t M;

  const uint16_t* x() const { return reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>()); }
  const float* bias() const { return bias_f.defined() ? bias_f.data_ptr<float>() : nullptr; }
  at::Tensor result() const { return y.view(out_shape); }
};

inline LinearIO linear_io(const at::Tensor& x, int64_t K, int64_t N, const std::optional<at::Tensor>& bias) {
  LinearIO io;
  io.out_shape = x.sizes().vec();
  io.out_shape.back() = N;
  io.x2 = x.reshape({-1, K}).contiguous();
  io.M = io.x2.size(0);
  io.y = at::empty({io.M, N}, x.options());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " values, expected ", N);
    io.bias_f = bias->to(at::kFloat).contiguous();
  }
  return io;
}
