// Host side of the sparse decode kernels, without torch: the split-K plan
// (grid, workspace size) and the launch of the right template instance.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "sparse_decode_kernel.cuh"

namespace prhs {
namespace sparse_decode {

// A split gets at least this many kept tokens: below it the fixed cost of a
// CTA (query load, segment table, merge, partial write) dominates its bytes.
constexpr int kMinTokensPerSplit = 64;
constexpr int kMaxDevices = 64;

struct Plan {
  int group_max;        // query heads per CTA (template GMAX)
  int num_head_chunks;  // ceil(group / group_max)
  int stages;           // cp.async ring depth (template STAGES)
  int num_splits;
  bool merge_in_split;  // the last split merges (else the combine kernel)
  bool dependent_launch;  // programmatic dependent launch (dependent_launch_allowed)
  size_t workspace_bytes;
};

// A split-K workspace starts with kMergeCounters arrival counters: the same
// place for every plan, so counters stay zero across calls of any shape.
constexpr size_t kCounterBytes = size_t(kMergeCounters) * sizeof(int);

// Programmatic dependent launch: the split kernel may be launched while the
// kernel before it in the stream finishes (its CTAs start, then wait in
// wait_for_prior_grids before reading any input), which hides most of the
// launch gap between the two. Only where the kernel the device runs was
// generated for sm_90+ (its PTX version): a compute_80 PTX JIT-compiled for a
// newer GPU has no griddepcontrol.wait, and would read its inputs unordered.
// PRHS_SPARSE_DECODE_PDL=0 turns it off (A/B timing).
inline bool dependent_launch_allowed(int ptx_version) {
  static const bool disabled = [] {
    const char* env = std::getenv("PRHS_SPARSE_DECODE_PDL");
    return env != nullptr && std::strcmp(env, "0") == 0;
  }();
  return ptx_version >= 90 && !disabled;
}

inline int group_max_for(int group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
}

template <typename T, int D, int GMAX, int STAGES>
struct Variant {
  using Tl = Tile<D, GMAX, STAGES>;
  static constexpr int kHeadDim = D;

  static auto split_kernel() { return &sparse_decode_split_kernel<T, D, GMAX, STAGES>; }
  static auto combine_kernel() { return &sparse_decode_combine_kernel<T, D>; }

  // Opts the kernel into its (> 48 KB) dynamic shared memory on `device` (the
  // current device) and returns how many of its CTAs fit on one SM, and
  // whether it may be a programmatic dependent launch there.
  static cudaError_t prepare(int device, int* ctas_per_sm, bool* dependent_launch) {
    // 0: not prepared yet; else 2 * CTAs an SM + (dependent launch allowed).
    static std::atomic<int> cached[kMaxDevices];
    if (device >= 0 && device < kMaxDevices) {
      const int value = cached[device].load(std::memory_order_relaxed);
      if (value > 0) {
        *ctas_per_sm = value / 2;
        *dependent_launch = value % 2 == 1;
        return cudaSuccess;
      }
    }
    cudaError_t err = cudaFuncSetAttribute(
        split_kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize, Tl::kSmemBytes);
    if (err != cudaSuccess) return err;
    int blocks = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, split_kernel(), kThreads,
                                                        Tl::kSmemBytes);
    if (err != cudaSuccess) return err;
    if (blocks < 1) return cudaErrorInvalidConfiguration;
    cudaFuncAttributes attributes = {};
    if ((err = cudaFuncGetAttributes(&attributes, split_kernel())) != cudaSuccess) return err;
    *ctas_per_sm = blocks;
    *dependent_launch = dependent_launch_allowed(attributes.ptxVersion);
    if (device >= 0 && device < kMaxDevices) {
      cached[device].store(2 * blocks + (*dependent_launch ? 1 : 0));
    }
    return cudaSuccess;
  }

  static cudaError_t launch(const Params& p, bool dependent_launch, cudaStream_t stream) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(p.num_rows * p.num_splits, p.num_kv_heads * p.num_head_chunks);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = Tl::kSmemBytes;
    config.stream = stream;
    cudaLaunchAttribute attribute = {};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attribute;
    config.numAttrs = dependent_launch ? 1 : 0;
    cudaError_t err = cudaLaunchKernelEx(&config, split_kernel(), p);
    if (err == cudaSuccess) err = cudaGetLastError();
    if (err != cudaSuccess || p.num_splits == 1 || p.merge_counters != nullptr) return err;
    const int items = p.num_rows * p.num_q_heads;
    combine_kernel()<<<(items + kCombineWarps - 1) / kCombineWarps, kCombineWarps * 32, 0,
                       stream>>>(p);
    return cudaGetLastError();
  }
};

template <typename T, int D, int GMAX, typename F>
cudaError_t with_stages(int stages, F&& f) {
  switch (stages) {
    case kShallowStages: return f(Variant<T, D, GMAX, kShallowStages>{});
    case kDeepStages: return f(Variant<T, D, GMAX, kDeepStages>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int D, typename F>
cudaError_t with_group_max(int group_max, int stages, F&& f) {
  switch (group_max) {
    case 1: return with_stages<T, D, 1>(stages, f);
    case 2: return with_stages<T, D, 2>(stages, f);
    case 4: return with_stages<T, D, 4>(stages, f);
    case 8: return with_stages<T, D, 8>(stages, f);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename F>
cudaError_t with_head_dim(int head_dim, int group_max, int stages, F&& f) {
  switch (head_dim) {
    case 64: return with_group_max<T, 64>(group_max, stages, f);
    case 128: return with_group_max<T, 128>(group_max, stages, f);
    case 256: return with_group_max<T, 256>(group_max, stages, f);
    default: return cudaErrorInvalidValue;
  }
}

// Calls f(Variant<T, D, GMAX, STAGES>{}) for the runtime dtype / head_dim /
// group_max / stages.
template <typename F>
cudaError_t with_variant(DType dtype, int head_dim, int group_max, int stages, F&& f) {
  switch (dtype) {
    case DType::kBFloat16: return with_head_dim<__nv_bfloat16>(head_dim, group_max, stages, f);
    case DType::kFloat16: return with_head_dim<__half>(head_dim, group_max, stages, f);
    default: return cudaErrorInvalidValue;
  }
}

inline cudaError_t sm_count(int device, int* count) {
  static std::atomic<int> cached[kMaxDevices];
  if (device >= 0 && device < kMaxDevices) {
    *count = cached[device].load(std::memory_order_relaxed);
    if (*count > 0) return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess && device >= 0 && device < kMaxDevices) cached[device].store(*count);
  return err;
}

// Splits: as many as one wave of CTAs holds (every SM at its occupancy),
// never more. A CTA count just past a whole wave leaves the next wave nearly
// empty, and each further wave pays a CTA's fixed latency again (kept_slots ->
// block_table -> K/V are dependent loads before the first byte streams). H100,
// 12 / 16 rows x 8 KV heads x 32K, 1/16 (docs/results.md; tag archive/results-history):
// 5 / 4 splits (480 / 512 CTAs of 528) took 0.051 / 0.062 ms, 6 / 5 splits
// (576 / 640: the old ceil) 0.066 / 0.088 ms, 11 / 8 splits (two waves)
// 0.060 / 0.069 ms.
inline int64_t one_wave_splits(int64_t units, int64_t target) {
  return std::max<int64_t>(1, target / units);
}

// The busiest SM's share of a one-wave grid of `ctas` CTAs of `pages_per_cta`
// kept pages each: what the plan minimises over ring depths. H100, 12 / 16 /
// 32 rows x 8 KV heads x 32K (docs/results.md; tag archive/results-history): it picks
// the faster depth in each of the six shapes timed (1/16 and 1/8), e.g. at
// 12 rows the deep ring's 4 splits (3 CTAs on the busiest SM x 32 pages,
// 0.0448 ms) over the shallow one's 5 (4 x 26, 0.0473 ms).
inline int64_t busiest_sm_pages(int64_t ctas, int64_t pages_per_cta, int64_t sms) {
  return (ctas + sms - 1) / sms * pages_per_cta;
}

// Heads per CTA, ring depth and split-K factor: rows x KV heads x head chunks
// x splits CTAs (one_wave_splits), no split shorter than kMinTokensPerSplit;
// of the two ring depths the one whose busiest SM has the fewest kept pages
// (then fewer splits: less to merge; then the shallow ring). Depends only on
// shapes and the device, never on data, so CUDA graphs can replay it. Reads
// the shape fields of `p` (num_rows ... max_kept, dtype).
// requested_splits > 0 asks for that many splits (same cap), requested_stages
// (kShallowStages or kDeepStages) for that ring (benchmarks, tests).
inline cudaError_t make_plan(const Params& p, int device, Plan* plan, int requested_splits = 0,
                             int requested_stages = 0) {
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0) return cudaErrorInvalidValue;
  if (requested_stages != 0 && requested_stages != kShallowStages &&
      requested_stages != kDeepStages) {
    return cudaErrorInvalidValue;
  }
  const int group = p.num_q_heads / p.num_kv_heads;
  plan->group_max = group_max_for(group);
  plan->num_head_chunks = (group + plan->group_max - 1) / plan->group_max;
  int sms = 0;
  cudaError_t err = sm_count(device, &sms);
  if (err != cudaSuccess) return err;

  const int64_t units = int64_t(std::max(p.num_rows, 1)) * p.num_kv_heads * plan->num_head_chunks;
  const int64_t kept_pages = std::max(p.max_kept, 1);
  const int64_t kept_tokens = int64_t(p.max_kept) * p.block_size;
  const int64_t cap = std::min<int64_t>(
      std::min<int64_t>(kMaxSplits, kept_pages),
      std::max<int64_t>(1, (kept_tokens + kMinTokensPerSplit - 1) / kMinTokensPerSplit));
  int64_t best_pages = -1;
  for (const int stages : {kShallowStages, kDeepStages}) {
    if (requested_stages != 0 && stages != requested_stages) continue;
    int ctas_per_sm = 0;
    bool dependent_launch = false;
    err = with_variant(p.dtype, p.head_dim, plan->group_max, stages, [&](auto variant) {
      return decltype(variant)::prepare(device, &ctas_per_sm, &dependent_launch);
    });
    if (err != cudaSuccess) return err;
    const int64_t target = int64_t(sms) * ctas_per_sm;
    const int64_t splits = std::max<int64_t>(
        1, requested_splits > 0 ? std::min<int64_t>(requested_splits, cap)
                                : std::min(one_wave_splits(units, target), cap));
    const int64_t pages =
        busiest_sm_pages(units * splits, (kept_pages + splits - 1) / splits, sms);
    const bool better = best_pages < 0 || pages < best_pages ||
                        (pages == best_pages && splits < plan->num_splits);
    if (!better) continue;
    best_pages = pages;
    plan->stages = stages;
    plan->num_splits = int(splits);
    plan->dependent_launch = dependent_launch;
  }
  plan->merge_in_split = plan->num_splits > 1 && units <= kMergeCounters;
  plan->workspace_bytes = plan->num_splits == 1
                              ? 0
                              : kCounterBytes + size_t(plan->num_splits) * p.num_rows *
                                                    p.num_q_heads * (p.head_dim + 1) *
                                                    sizeof(float);
  return cudaSuccess;
}

// Largest workspace any batch of 1..max_rows rows of this shape needs.
inline cudaError_t max_workspace_bytes(Params p, int max_rows, int device, size_t* bytes) {
  *bytes = 0;
  for (int rows = 1; rows <= max_rows; ++rows) {
    p.num_rows = rows;
    Plan plan;
    const cudaError_t err = make_plan(p, device, &plan);
    if (err != cudaSuccess) return err;
    *bytes = std::max(*bytes, plan.workspace_bytes);
  }
  return cudaSuccess;
}

// Launches the decode (and the split-K merge) on `stream`. `workspace` must
// hold plan.workspace_bytes, 16-byte aligned, and its first kCounterBytes
// must be zero (as every launch leaves them). Returns the launch error.
inline cudaError_t run(Params p, const Plan& plan, void* workspace, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  p.group_size = p.num_q_heads / p.num_kv_heads;
  p.num_head_chunks = plan.num_head_chunks;
  p.num_splits = plan.num_splits;
  // Counters, then [splits, N, Hq, D] partial outputs, then [splits, N, Hq]
  // partial lse.
  unsigned char* base = static_cast<unsigned char*>(workspace);
  const bool counted = base != nullptr && plan.merge_in_split;
  p.merge_counters = counted ? reinterpret_cast<int*>(base) : nullptr;
  p.partial_out = base == nullptr ? nullptr : reinterpret_cast<float*>(base + kCounterBytes);
  p.partial_lse = p.partial_out == nullptr
                      ? nullptr
                      : p.partial_out + size_t(plan.num_splits) * p.num_rows * p.num_q_heads *
                                            p.head_dim;
  return with_variant(p.dtype, p.head_dim, plan.group_max, plan.stages,
                      [&](auto variant) {
                        return decltype(variant)::launch(p, plan.dependent_launch, stream);
                      });
}

}  // namespace sparse_decode
}  // namespace prhs
