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
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace prhs {
namespace summaries {

constexpr int kThreads = 256;

struct UpdateParams {
  const void* key;           // [T, H, D] keys (KeyT), channels contiguous
  const void* slot_mapping;  // [num_slots] (SlotT), slot = page * block_size + offset, -1 = padding
  float* key_sum;            // [P, H, D] float32, channels contiguous; min / max share strides
  float* key_min;
  float* key_max;
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

// Folds the run of tokens t.. on `page` into the summary element (h, d).
template <typename KeyT, typename SlotT>
__device__ __forceinline__ void fold_run(const UpdateParams& p, const SlotT* slots, int t,
                                         int64_t page, int h, int d) {
  const KeyT* key = static_cast<const KeyT*>(p.key) + h * p.key_stride_h + d;
  float sum = 0.f, lo = INFINITY, hi = -INFINITY;
  bool fresh = false;
  for (int j = t; j < p.num_slots; ++j) {
    const int64_t s = static_cast<int64_t>(slots[j]);
    if (s < 0) continue;
    if (s / p.block_size != page) break;
    fresh |= s % p.block_size == 0;
    const float k = to_float(key[j * p.key_stride_t]);
    sum += k;
    lo = fminf(lo, k);
    hi = fmaxf(hi, k);
  }
  const int64_t at = page * p.page_stride + h * p.head_stride + d;
  if (fresh) {
    p.key_sum[at] = sum;
    p.key_min[at] = lo;
    p.key_max[at] = hi;
  } else {
    p.key_sum[at] += sum;
    p.key_min[at] = fminf(p.key_min[at], lo);
    p.key_max[at] = fmaxf(p.key_max[at], hi);
  }
}

// Grid (num_slots, ceil(H * D / kThreads)), kThreads threads.
template <typename KeyT, typename SlotT>
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
  fold_run<KeyT>(p, slots, t, page, h, e - h * p.head_dim);
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
template <typename KeyT, typename SlotT>
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
  if (opens_run(slots, t, page, p.block_size)) fold_run<KeyT>(p, slots, t, page, h, d);
}

// Calls launch(KeyT{}, SlotT{}) for key_dtype (0 float32, 1 float16, 2
// bfloat16) and slot_bytes (8: int64, 4: int32); cudaErrorInvalidValue for others.
template <typename Launch>
inline cudaError_t dispatch_key_slot(int key_dtype, int slot_bytes, Launch&& launch) {
  auto with_slot = [&](auto slot) -> cudaError_t {
    if (key_dtype == 0) return launch(float{}, slot);
    if (key_dtype == 1) return launch(__half{}, slot);
    if (key_dtype == 2) return launch(__nv_bfloat16{}, slot);
    return cudaErrorInvalidValue;
  };
  if (slot_bytes == 8) return with_slot(int64_t{});
  if (slot_bytes == 4) return with_slot(int32_t{});
  return cudaErrorInvalidValue;
}

inline dim3 update_grid(const UpdateParams& p) {
  return dim3(p.num_slots, (p.num_heads * p.head_dim + kThreads - 1) / kThreads);
}

// Launches update_summaries_kernel for the key / slot types (see dispatch_key_slot).
inline cudaError_t launch_update_summaries(const UpdateParams& p, int key_dtype, int slot_bytes,
                                           cudaStream_t stream) {
  if (p.num_slots == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  return dispatch_key_slot(key_dtype, slot_bytes, [&](auto key, auto slot) {
    update_summaries_kernel<decltype(key), decltype(slot)>
        <<<update_grid(p), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

// Launches write_cache_and_summaries_kernel (types as in launch_update_summaries).
inline cudaError_t launch_write_cache_and_summaries(const CacheWriteParams& c, int key_dtype,
                                                    int slot_bytes, cudaStream_t stream) {
  const UpdateParams& p = c.summaries;
  if (p.num_slots == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  return dispatch_key_slot(key_dtype, slot_bytes, [&](auto key, auto slot) {
    write_cache_and_summaries_kernel<decltype(key), decltype(slot)>
        <<<update_grid(p), kThreads, 0, stream>>>(c);
    return cudaGetLastError();
  });
}

}  // namespace summaries
}  // namespace prhs
