// Device helpers of the sparse decode kernels: 16-byte vectors of bf16/fp16,
// cp.async, warp reductions. No torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace prhs {
namespace sparse_decode {

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename T>
struct Pack2;

template <>
struct Pack2<__nv_bfloat16> {
  __device__ __forceinline__ static float2 to_float2(uint32_t bits) {
    return __bfloat1622float2(bit_cast<__nv_bfloat162>(bits));
  }
  __device__ __forceinline__ static uint32_t from_float2(float lo, float hi) {
    return bit_cast<uint32_t>(__floats2bfloat162_rn(lo, hi));
  }
};

template <>
struct Pack2<__half> {
  __device__ __forceinline__ static float2 to_float2(uint32_t bits) {
    return __half22float2(bit_cast<__half2>(bits));
  }
  __device__ __forceinline__ static uint32_t from_float2(float lo, float hi) {
    return bit_cast<uint32_t>(__floats2half2_rn(lo, hi));
  }
};

// 8 elements of T (one 16-byte vector) -> 8 floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = Pack2<T>::to_float2(words[i]);
    f[2 * i] = pair.x;
    f[2 * i + 1] = pair.y;
  }
}

// N floats -> N elements of T at dst (N * sizeof(T) bytes, aligned to that).
template <typename T, int N>
__device__ __forceinline__ void store_packed(T* dst, const float* f) {
  static_assert(N == 2 || N == 4 || N == 8, "2, 4 or 8 elements");
  uint32_t words[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) words[i] = Pack2<T>::from_float2(f[2 * i], f[2 * i + 1]);
  if constexpr (N == 2) {
    *reinterpret_cast<uint32_t*>(dst) = words[0];
  } else if constexpr (N == 4) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
  } else {
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// 16-byte global -> shared copy; when !pred nothing is read and dst gets zeros
// (so masked tokens can never bring NaN garbage of unwritten slots into V).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}

// Release and acquire at GPU scope (fence.acq_rel.gpu): lighter than
// __threadfence(), which is fence.sc.gpu.
__device__ __forceinline__ void fence_acq_rel_gpu() {
  asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
}

// Programmatic dependent launch (sm_90+; no-ops below, and when the kernel was
// launched without the attribute). wait: every grid this one depends on has
// completed and its writes are visible. launch_dependents: a grid launched
// after this one with the attribute may start (it still waits for ours to
// complete before reading anything).
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Sum over aligned groups of WIDTH consecutive lanes (all lanes get the sum).
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

__device__ __forceinline__ float warp_sum(float x) { return group_sum<32>(x); }

}  // namespace sparse_decode
}  // namespace prhs
