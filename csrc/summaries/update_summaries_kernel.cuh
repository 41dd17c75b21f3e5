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

// Grid (num_slots, ceil(H * D / kThreads)), kThreads threads.
template <typename KeyT, typename SlotT>
__global__ void __launch_bounds__(kThreads) update_summaries_kernel(const UpdateParams p) {
  const SlotT* slots = static_cast<const SlotT*>(p.slot_mapping);
  const int t = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slots[t]);
  if (slot < 0) return;
  const int64_t page = slot / p.block_size;
  for (int j = t - 1; j >= 0; --j) {  // the previous real token: on this page?
    const int64_t before = static_cast<int64_t>(slots[j]);
    if (before < 0) continue;
    if (before / p.block_size == page) return;  // not the run's first token
    break;
  }
  const int elems = p.num_heads * p.head_dim;
  const int e = blockIdx.y * kThreads + threadIdx.x;
  if (e >= elems) return;
  const int h = e / p.head_dim, d = e - h * p.head_dim;
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

// Launches the kernel for the key / slot types (key_dtype: 0 float32, 1 float16,
// 2 bfloat16; slot_bytes 4 or 8). Returns cudaErrorInvalidValue for others.
inline cudaError_t launch_update_summaries(const UpdateParams& p, int key_dtype, int slot_bytes,
                                           cudaStream_t stream) {
  if (p.num_slots == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  const dim3 grid(p.num_slots, (p.num_heads * p.head_dim + kThreads - 1) / kThreads);
#define PRHS_LAUNCH(KEY, SLOT) update_summaries_kernel<KEY, SLOT><<<grid, kThreads, 0, stream>>>(p)
  if (slot_bytes == 8) {
    if (key_dtype == 0) PRHS_LAUNCH(float, int64_t);
    else if (key_dtype == 1) PRHS_LAUNCH(__half, int64_t);
    else if (key_dtype == 2) PRHS_LAUNCH(__nv_bfloat16, int64_t);
    else return cudaErrorInvalidValue;
  } else if (slot_bytes == 4) {
    if (key_dtype == 0) PRHS_LAUNCH(float, int32_t);
    else if (key_dtype == 1) PRHS_LAUNCH(__half, int32_t);
    else if (key_dtype == 2) PRHS_LAUNCH(__nv_bfloat16, int32_t);
    else return cudaErrorInvalidValue;
  } else {
    return cudaErrorInvalidValue;
  }
#undef PRHS_LAUNCH
  return cudaGetLastError();
}

}  // namespace summaries
}  // namespace prhs
