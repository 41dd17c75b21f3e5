// Page summaries on cache write: per (page, KV head, channel) the float32 key
// sum, min and max of the tokens in the page. No torch.
//
// vLLM writes each request's new tokens contiguously (padding, -1, aside),
// so the tokens of one page form one run in slot_mapping once -1 entries are
// skipped. The block of the run's first token folds the whole run into the
// page (in token order, no atomics: deterministic); the other blocks return at
// once. A run that writes offset 0 belongs to a new occupant: it replaces the
// page's summary instead of adding to it. (A page whose tokens came in two
// runs, split by another page's, would be written twice concurrently; vLLM
// never does that. The torch reference takes any order.)
//
// int8 centroids (prhs_vllm.ops.ref.quant) instead of float32 sums: the run's
// keys are folded the same way, then merged with the page's decoded old
// centroid and bf16 box, the box rounded outward and the centroid encoded
// again -- the Triton kernel's float32 operations in its order (IEEE
// division, no fused multiply-add), so the two agree bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace prhs {
namespace summaries {

constexpr int kThreads = 256;

struct UpdateParams {
  const void* key;           // [T, H, D] keys (KeyT), channels contiguous
  const void* slot_mapping;  // [num_slots] (SlotT), slot = page * block_size + offset, -1 = padding
  float* key_sum;            // [P, H, D] float32, channels contiguous; min / max share strides
  float* key_min;
  float* key_max;
  // int8 centroids: codes [P, H, D] uint8 and bf16 boxes [P, H, D] (as bits,
  // page_stride / head_stride) instead of key_sum / key_min / key_max.
  uint8_t* codes;
  uint16_t* box_min;
  uint16_t* box_max;
  int64_t code_stride_p, code_stride_h;
  int64_t key_stride_t, key_stride_h;
  int64_t page_stride, head_stride;
  int num_slots, num_heads, head_dim, block_size;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Whether token t opens its page's run: the previous real token (-1 entries
// skipped) is on another page, or there is none.
template <typename SlotT>
__device__ __forceinline__ bool opens_run(const SlotT* slots, int t, int64_t page,
                                          int block_size) {
  for (int j = t - 1; j >= 0; --j) {
    const int64_t before = static_cast<int64_t>(slots[j]);
    if (before < 0) continue;
    return before / block_size != page;
  }
  return true;
}

// The keys of the run of tokens t.. on `page` at channel (h, d), in token order.
struct RunKeys {
  float sum, lo, hi;
  int tokens;
  int64_t first_offset;  // of the run's first slot: the tokens the page held before
};

template <typename KeyT, typename SlotT>
__device__ __forceinline__ RunKeys fold_keys(const UpdateParams& p, const SlotT* slots, int t,
                                             int64_t page, int h, int d) {
  const KeyT* key = static_cast<const KeyT*>(p.key) + h * p.key_stride_h + d;
  RunKeys r{0.f, INFINITY, -INFINITY, 0, -1};
  for (int j = t; j < p.num_slots; ++j) {
    const int64_t s = static_cast<int64_t>(slots[j]);
    if (s < 0) continue;
    if (s / p.block_size != page) break;
    if (r.first_offset < 0) r.first_offset = s % p.block_size;
    const float k = to_float(key[j * p.key_stride_t]);
    r.sum += k;
    r.lo = fminf(r.lo, k);
    r.hi = fmaxf(r.hi, k);
    ++r.tokens;
  }
  return r;
}

// Folds the run of tokens t.. on `page` into the summary element (h, d).
template <typename KeyT, typename SlotT>
__device__ __forceinline__ void fold_run(const UpdateParams& p, const SlotT* slots, int t,
                                         int64_t page, int h, int d) {
  const RunKeys r = fold_keys<KeyT>(p, slots, t, page, h, d);
  const int64_t at = page * p.page_stride + h * p.head_stride + d;
  if (r.first_offset == 0) {  // a new occupant
    p.key_sum[at] = r.sum;
    p.key_min[at] = r.lo;
    p.key_max[at] = r.hi;
  } else {
    p.key_sum[at] += r.sum;
    p.key_min[at] = fminf(p.key_min[at], r.lo);
    p.key_max[at] = fmaxf(p.key_max[at], r.hi);
  }
}

// bf16 bits of x rounded down (up = false) or up, as ref.quant.round_outward_bf16:
// drop the low 16 bits (toward zero), then one ulp away from zero where bits
// were dropped and toward zero is inward.
__device__ __forceinline__ uint16_t outward_bf16_bits(float x, bool up) {
  const uint32_t bits = __float_as_uint(x);
  const bool negative = bits >> 31;
  const bool step = (bits & 0xffffu) != 0 && (up ? !negative : negative);
  return static_cast<uint16_t>((bits >> 16) + (step ? 1u : 0u));
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// fold_run for int8 centroids: the run's keys merged into the page's old
// state (unless the run starts at offset 0), encoded again.
template <typename KeyT, typename SlotT>
__device__ __forceinline__ void fold_run_int8(const UpdateParams& p, const SlotT* slots, int t,
                                              int64_t page, int h, int d) {
  constexpr float kLevels = 255.0f;
  const RunKeys r = fold_keys<KeyT>(p, slots, t, page, h, d);
  float lo = r.lo, hi = r.hi;
  const int64_t offset = r.first_offset;
  const int64_t box = page * p.page_stride + h * p.head_stride + d;
  const int64_t code = page * p.code_stride_p + h * p.code_stride_h + d;
  const float old_n = static_cast<float>(offset);
  float old_centroid = 0.f;
  if (offset > 0) {
    const float old_lo = bf16_bits_to_float(p.box_min[box]);
    const float old_hi = bf16_bits_to_float(p.box_max[box]);
    const float level = __fdiv_rn(static_cast<float>(p.codes[code]), kLevels);
    old_centroid = __fadd_rn(old_lo, __fmul_rn(level, __fsub_rn(old_hi, old_lo)));
    lo = fminf(old_lo, lo);
    hi = fmaxf(old_hi, hi);
  }
  const float count = __fadd_rn(old_n, static_cast<float>(r.tokens));
  const float centroid =
      __fdiv_rn(__fadd_rn(__fmul_rn(old_centroid, offset > 0 ? old_n : 0.f), r.sum), count);
  const uint16_t lo_bits = outward_bf16_bits(lo, false), hi_bits = outward_bf16_bits(hi, true);
  const float box_lo = bf16_bits_to_float(lo_bits);
  const float width = __fsub_rn(bf16_bits_to_float(hi_bits), box_lo);
  float frac = __fdiv_rn(__fsub_rn(centroid, box_lo), fmaxf(width, 1e-30f));
  frac = width > 0.f ? frac : 0.f;
  // rintf: ties to even, as torch.round.
  p.codes[code] = static_cast<uint8_t>(rintf(__fmul_rn(fminf(fmaxf(frac, 0.f), 1.f), kLevels)));
  p.box_min[box] = lo_bits;
  p.box_max[box] = hi_bits;
}

template <bool kInt8, typename KeyT, typename SlotT>
__device__ __forceinline__ void fold(const UpdateParams& p, const SlotT* slots, int t,
                                     int64_t page, int h, int d) {
  if constexpr (kInt8) {
    fold_run_int8<KeyT>(p, slots, t, page, h, d);
  } else {
    fold_run<KeyT>(p, slots, t, page, h, d);
  }
}

// Grid (num_slots, ceil(H * D / kThreads)), kThreads threads.
template <typename KeyT, typename SlotT, bool kInt8>
__global__ void __launch_bounds__(kThreads) update_summaries_kernel(const UpdateParams p) {
  const SlotT* slots = static_cast<const SlotT*>(p.slot_mapping);
  const int t = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slots[t]);
  if (slot < 0) return;
  const int64_t page = slot / p.block_size;
  if (!opens_run(slots, t, page, p.block_size)) return;
  const int e = blockIdx.y * kThreads + threadIdx.x;
  if (e >= p.num_heads * p.head_dim) return;
  const int h = e / p.head_dim;
  fold<kInt8, KeyT>(p, slots, t, page, h, e - h * p.head_dim);
}

// The KV cache write of an unquantized paged cache (what vLLM's
// reshape_and_cache_flash does for one: a copy of each real token's key and
// value rows into its slot) and the summary update, in one launch: per layer
// and step the host cost of a second op is what the dense fallback pays.
struct CacheWriteParams {
  UpdateParams summaries;  // key, slot_mapping, summaries, shapes
  const void* value;       // [T, H, D] (KeyT), channels contiguous
  int64_t value_stride_t, value_stride_h;
  void* key_cache;         // [P, H, block_size, D] (KeyT) views; value_cache shares strides
  void* value_cache;
  int64_t cache_stride_page, cache_stride_head, cache_stride_token;
};

// Grid (num_slots, ceil(H * D / kThreads)), kThreads threads.
template <typename KeyT, typename SlotT, bool kInt8>
__global__ void __launch_bounds__(kThreads)
    write_cache_and_summaries_kernel(const CacheWriteParams c) {
  const UpdateParams& p = c.summaries;
  const SlotT* slots = static_cast<const SlotT*>(p.slot_mapping);
  const int t = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slots[t]);
  const int e = blockIdx.y * kThreads + threadIdx.x;
  if (slot < 0 || e >= p.num_heads * p.head_dim) return;
  const int h = e / p.head_dim, d = e - h * p.head_dim;
  const int64_t page = slot / p.block_size;
  const int64_t at = page * c.cache_stride_page + h * c.cache_stride_head +
                     (slot - page * p.block_size) * c.cache_stride_token + d;
  static_cast<KeyT*>(c.key_cache)[at] =
      static_cast<const KeyT*>(p.key)[t * p.key_stride_t + h * p.key_stride_h + d];
  static_cast<KeyT*>(c.value_cache)[at] =
      static_cast<const KeyT*>(c.value)[t * c.value_stride_t + h * c.value_stride_h + d];
  if (opens_run(slots, t, page, p.block_size)) fold<kInt8, KeyT>(p, slots, t, page, h, d);
}

// Calls launch(KeyT{}, SlotT{}, bool_constant<int8>) for key_dtype (0 float32,
// 1 float16, 2 bfloat16), slot_bytes (8: int64, 4: int32) and the summary
// format (int8: int8 centroids, else float32 sums); cudaErrorInvalidValue for others.
template <typename Launch>
inline cudaError_t dispatch_key_slot(int key_dtype, int slot_bytes, bool int8, Launch&& launch) {
  auto with_format = [&](auto key, auto slot) -> cudaError_t {
    if (int8) return launch(key, slot, std::true_type{});
    return launch(key, slot, std::false_type{});
  };
  auto with_slot = [&](auto slot) -> cudaError_t {
    if (key_dtype == 0) return with_format(float{}, slot);
    if (key_dtype == 1) return with_format(__half{}, slot);
    if (key_dtype == 2) return with_format(__nv_bfloat16{}, slot);
    return cudaErrorInvalidValue;
  };
  if (slot_bytes == 8) return with_slot(int64_t{});
  if (slot_bytes == 4) return with_slot(int32_t{});
  return cudaErrorInvalidValue;
}

inline dim3 update_grid(const UpdateParams& p) {
  return dim3(p.num_slots, (p.num_heads * p.head_dim + kThreads - 1) / kThreads);
}

// Launches update_summaries_kernel for the key / slot types and summary
// format (see dispatch_key_slot).
inline cudaError_t launch_update_summaries(const UpdateParams& p, int key_dtype, int slot_bytes,
                                           bool int8, cudaStream_t stream) {
  if (p.num_slots == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  return dispatch_key_slot(key_dtype, slot_bytes, int8, [&](auto key, auto slot, auto q) {
    update_summaries_kernel<decltype(key), decltype(slot), decltype(q)::value>
        <<<update_grid(p), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

// Launches write_cache_and_summaries_kernel (types as in launch_update_summaries).
inline cudaError_t launch_write_cache_and_summaries(const CacheWriteParams& c, int key_dtype,
                                                    int slot_bytes, bool int8,
                                                    cudaStream_t stream) {
  const UpdateParams& p = c.summaries;
  if (p.num_slots == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  return dispatch_key_slot(key_dtype, slot_bytes, int8, [&](auto key, auto slot, auto q) {
    write_cache_and_summaries_kernel<decltype(key), decltype(slot), decltype(q)::value>
        <<<update_grid(p), kThreads, 0, stream>>>(c);
    return cudaGetLastError();
  });
}

}  // namespace summaries
}  // namespace prhs
