// The ISA-independent half of the paged-attention kernels (`paged_attention.cpp`, AVX-512; `paged_attention_avx2.cpp`,
// AVX2): argument checks, the split of a flat varlen batch into decode rows and prefill tiles, each tile's positions,
// and the one-call KV store. The SIMD halves differ only in how they compute a tile's chunks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace xgenmm_paged {

constexpr int kQueryTile = 16;
constexpr int64_t kKeyChunk = 128;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Args {
  int64_t heads, kv_heads, block_size, max_blocks, q_stride_t, q_stride_h, o_stride_t, o_stride_h, window;
  float scale;
  const int32_t* block_tables;
  const int32_t* qsl;
  const int32_t* seq_lens;
};

// A tile: up to kQueryTile consecutive query rows of one sequence.
struct Tile {
  int64_t seq, first_row, rows;
};

struct TileView {
  int64_t q_start, n_q;
  int64_t pos[kQueryTile], lo[kQueryTile];
  const int32_t* table;
  int64_t first_chunk, end_chunk;  // chunks [first, end) hold every key of the tile
};

inline TileView view_of(const Args& a, const Tile& t) {
  TileView v;
  const int64_t q_len = a.qsl[t.seq + 1] - a.qsl[t.seq];
  const int64_t context = a.seq_lens[t.seq] - q_len;
  v.q_start = a.qsl[t.seq] + t.first_row;
  v.n_q = t.rows;
  for (int64_t j = 0; j < v.n_q; j++) {
    v.pos[j] = context + t.first_row + j;
    v.lo[j] = a.window > 0 ? std::max<int64_t>(0, v.pos[j] - a.window + 1) : 0;
  }
  v.table = a.block_tables + t.seq * a.max_blocks;
  v.first_chunk = v.lo[0] / kKeyChunk;
  v.end_chunk = v.pos[v.n_q - 1] / kKeyChunk + 1;
  return v;
}

// A checked call: its arguments, the int32 tensors they point into (kept alive), and the work split.
struct Plan {
  at::Tensor bt, qsl, sl;
  Args a;
  std::vector<Tile> decode, prefill;
};

inline Plan make_plan(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                      double scale, int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [T, H, D] of the same shape");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out need a contiguous last dimension");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.sizes() == v_cache.sizes(), "k_cache / v_cache must be contiguous [blocks, block_size, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type() &&
                  q.scalar_type() == v_cache.scalar_type(), "q, out and the caches must share one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt, "block_tables, query_start_loc and seq_lens must be int32");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim must match the cache");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of the KV heads");
  Plan p;
  p.bt = block_tables.contiguous(), p.qsl = query_start_loc.contiguous(), p.sl = seq_lens.contiguous();
  const int64_t B = p.sl.size(0);
  TORCH_CHECK(p.qsl.dim() == 1 && p.qsl.size(0) == B + 1 && p.bt.dim() == 2 && p.bt.size(0) >= B,
              "query_start_loc must be [B+1] and block_tables [B, max_blocks] for B = len(seq_lens)");
  p.a = Args{q.size(1), k_cache.size(2), k_cache.size(1), p.bt.size(1), q.stride(0), q.stride(1), out.stride(0),
             out.stride(1), sliding_window, static_cast<float>(scale), p.bt.data_ptr<int32_t>(),
             p.qsl.data_ptr<int32_t>(), p.sl.data_ptr<int32_t>()};
  TORCH_CHECK(p.a.qsl[0] == 0 && p.a.qsl[B] <= q.size(0), "query_start_loc must start at 0 and end within q");
  for (int64_t b = 0; b < B; b++) {
    const int64_t q_len = p.a.qsl[b + 1] - p.a.qsl[b];
    TORCH_CHECK(q_len >= 0 && q_len <= p.a.seq_lens[b], "sequence ", b, " has more query rows than context");
    const int64_t n_blocks = (p.a.seq_lens[b] + p.a.block_size - 1) / p.a.block_size;
    TORCH_CHECK(n_blocks <= p.a.max_blocks, "sequence ", b, " is longer than its block table holds");
    for (int64_t i = 0; i < n_blocks; i++) {
      const int32_t block = p.a.block_tables[b * p.a.max_blocks + i];
      TORCH_CHECK(block >= 0 && block < k_cache.size(0), "sequence ", b, " names block ", block,
                  " outside the cache (", k_cache.size(0), " blocks)");
    }
    if (q_len == 1) p.decode.push_back({b, 0, 1});
    for (int64_t r = 0; q_len > 1 && r < q_len; r += kQueryTile)
      p.prefill.push_back({b, r, std::min<int64_t>(kQueryTile, q_len - r)});
  }
  return p;
}

// New keys / values of the step into their cache slots (slot < 0: a padding token, skipped). One call instead of
// the reference's mask, gather and two index_copy_ per layer; a plain copy, so no value changes.
inline void store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "store_kv: k and v must be [T, Hkv, D] with a contiguous last dimension");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "store_kv: the caches must be contiguous [blocks, block_size, Hkv, D] matching k");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(), "store_kv: k, v and the caches must share one dtype");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0), "store_kv: one slot per token");
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), n_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t elem = k.element_size(), row = H * D;
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; t++)
    TORCH_CHECK(sp[t] < n_slots, "store_kv: slot ", sp[t], " is outside the cache (", n_slots, " slots)");
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / row), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      if (sp[t] < 0) continue;
      for (int64_t h = 0; h < H; h++) {
        std::memcpy(kc + (sp[t] * row + h * D) * elem, kp + (t * k.stride(0) + h * k.stride(1)) * elem, D * elem);
        std::memcpy(vc + (sp[t] * row + h * D) * elem, vp + (t * v.stride(0) + h * v.stride(1)) * elem, D * elem);
      }
    }
  });
}

}  // namespace xgenmm_paged
