// Shared by the AVX2 kernels (int8_linear_avx2.cpp, linear_f32_avx2.cpp): weight memory on 2 MiB pages.
#pragma once
#include <ATen/ATen.h>

#include <sys/mman.h>

#include <cstdint>

namespace xgenmm_avx2 {

// An uninitialized CPU tensor backed by 2 MiB pages where Linux grants them (madvise; the same scheme as
// `empty_hugepage` in linear_bf16_packed.cpp): with 4 KiB pages the TLB misses of a weight stream cost bandwidth.
inline at::Tensor empty_hugepage(at::IntArrayRef sizes, at::ScalarType dtype) {
  constexpr size_t kHuge = size_t(2) << 20;
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  size_t bytes = c10::elementSize(dtype);
  for (const int64_t d : sizes) bytes *= static_cast<size_t>(d);
  if (bytes < kHuge) return at::empty(sizes, options);
  const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
  void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "int8 weight packing: could not map ", len, " bytes");
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHuge - 1) & ~uintptr_t(kHuge - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = start + len + kHuge - (aligned + len);
  if (tail) munmap(reinterpret_cast<void*>(aligned + len), tail);
  madvise(reinterpret_cast<void*>(aligned), len, MADV_HUGEPAGE);
  return at::from_blob(reinterpret_cast<void*>(aligned), sizes, [len](void* p) { munmap(p, len); }, options);
}

}  // namespace xgenmm_avx2
