// Split-K flash-decoding over the kept pages of a paged KV cache. No torch.
//
// One CTA = one (row, KV head, head chunk, split): it reads each kept K/V page
// of its share once and applies it to all (up to GMAX) query heads of the KV
// head's group. Threads are laid out as kRows token rows x kLanes lanes; a
// lane owns 8 channels (one 16-byte vector) of every row it touches. K/V go
// global -> shared through a STAGES-deep cp.async ring in which each thread
// reads back only its own copies, so the main loop needs no barrier. Every
// token row keeps its own online-softmax state; rows are merged once at the
// end through shared memory. With num_splits > 1 the CTA writes a partial
// (normalised output, log2-sum-exp); the last split of a (row, KV head, head
// chunk) to finish merges them (merge_counters), or, without counters,
// sparse_decode_combine_kernel does.
//
// The kept pages go to the splits round robin (split s takes kept pages s,
// s + num_splits, ...): a split's kept_slots entries are then known before
// num_kept is, so the two loads overlap and the first K/V load comes one
// dependent load sooner. Every CTA of a one-wave grid waits out that chain at
// the same time, with HBM idle.
#pragma once

#include <cmath>
#include <cstdint>

#include "device_utils.cuh"
#include "sparse_decode_params.h"

namespace prhs {
namespace sparse_decode {

constexpr int kThreads = 128;
// cp.async ring depths (the STAGES template argument): shallow fits 4 CTAs an
// SM (GMAX <= 4), deep 3 with 50% more bytes in flight each; the plan picks
// (make_plan in sparse_decode_dispatch.cuh).
constexpr int kShallowStages = 3;
constexpr int kDeepStages = 4;
constexpr int kTokensPerThread = 4;  // rows per thread per stage
constexpr int kSegment = 16;         // tokens; every page size is a multiple
constexpr int kSegmentCap = 256;     // segments whose addresses sit in smem at once
constexpr int kMaxSplits = 256;
constexpr int kCombineWarps = 4;
// Arrival counters at the start of a split-K workspace, one per (row, KV head,
// head chunk). Automatic plans split only below one wave of CTAs (a few
// hundred units), so this bounds only forced split counts, which beyond it
// use the combine kernel.
constexpr int kMergeCounters = 4096;
constexpr float kLn2 = 0.693147180559945309f;

template <int D, int GMAX, int STAGES>
struct Tile {
  static constexpr int kVec = 8;                           // elements per 16 bytes
  static constexpr int kLanes = D / kVec;                  // threads per token row
  static constexpr int kRows = kThreads / kLanes;          // token rows per pass
  static constexpr int kChunk = kRows * kTokensPerThread;  // tokens per stage
  static constexpr int kSegsPerChunk = kChunk / kSegment;
  static constexpr int kStageElems = 2 * kChunk * D;  // K rows, then V rows
  static constexpr int kPipeBytes = STAGES * kStageElems * 2;  // 2-byte bf16 / fp16
  static constexpr int kMergeBytes = kRows * GMAX * (D + 2) * 4;
  static constexpr int kMainBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
  static constexpr int kSmemBytes = kMainBytes + kSegmentCap * (8 + 4);

  static_assert(D == 64 || D == 128 || D == 256, "head_dim 64, 128 or 256");
  static_assert(GMAX == 1 || GMAX == 2 || GMAX == 4 || GMAX == 8, "GMAX 1, 2, 4 or 8");
  static_assert(32 % kLanes == 0, "a token row's lanes sit in one warp (shuffle sums)");
  static_assert(kChunk % kSegment == 0, "a stage holds whole segments");
  static_assert(kMainBytes % 16 == 0, "segment table alignment");
  static_assert(kSegmentCap % kThreads == 0, "the segment table fills in whole rounds");
};

// The num_splits partials of GMAX query heads of one row, merged by one CTA
// (the last split to finish). lse_buf: >= GMAX * num_splits floats of smem.
// __ldcg: other SMs wrote the partials, so read them from L2, not L1.
template <typename T, int D, int GMAX>
__device__ __forceinline__ void merge_splits(const Params& p, int row, int first_head,
                                             int num_heads, float* lse_buf) {
  const float kNegInf = -INFINITY;
  const int64_t split_stride = int64_t(p.num_rows) * p.num_q_heads;
  const int64_t first = int64_t(row) * p.num_q_heads + first_head;
  for (int i = threadIdx.x; i < GMAX * p.num_splits; i += kThreads) {
    const int g = i / p.num_splits;
    const int s = i - g * p.num_splits;
    lse_buf[i] = g < num_heads ? __ldcg(p.partial_lse + s * split_stride + first + g) : kNegInf;
  }
  __syncthreads();
  for (int item = threadIdx.x; item < GMAX * D / 4; item += kThreads) {
    const int g = item / (D / 4);
    const int d = (item - g * (D / 4)) * 4;
    if (g >= num_heads) continue;
    const float* lse = lse_buf + g * p.num_splits;
    float m_all = kNegInf;
    for (int s = 0; s < p.num_splits; ++s) m_all = fmaxf(m_all, lse[s]);
    float l_all = 0.f;
    float o[4] = {0.f, 0.f, 0.f, 0.f};
    if (m_all != kNegInf) {
      const float* src = p.partial_out + (first + g) * D + d;
#pragma unroll 4
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = exp2f(lse[s] - m_all);
        if (w == 0.f) continue;  // empty split: skip its bytes
        const float4 x = __ldcg(reinterpret_cast<const float4*>(src + s * split_stride * D));
        l_all += w;
        o[0] = fmaf(w, x.x, o[0]);
        o[1] = fmaf(w, x.y, o[1]);
        o[2] = fmaf(w, x.z, o[2]);
        o[3] = fmaf(w, x.w, o[3]);
      }
    }
    const float inv_l = l_all > 0.f ? 1.f / l_all : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] *= inv_l;
    const int head = first_head + g;
    T* dst = static_cast<T*>(p.out) + row * p.out_stride_row + head * p.out_stride_head + d;
    store_packed<T, 4>(dst, o);
    if (d == 0) {
      p.lse[row * p.lse_stride_row + head * p.lse_stride_head] =
          l_all > 0.f ? (m_all + log2f(l_all)) * kLn2 : kNegInf;
    }
  }
}

// Which (row, split, KV head, head chunk) a CTA of the split kernel works on.
struct CtaPlace {
  int row, split, kv_head, head_chunk;
  int first_head, num_heads;  // the query heads of the chunk
  int64_t row_head;           // row * Hkv + kv_head
};

// Read from %ctaid through volatile asm, so that the kernel can read it again
// after its main loop rather than hold it in registers through the loop:
// GMAX 4 needs all 128 a thread has at 4 CTAs an SM, and ptxas would spill.
template <int GMAX>
__device__ __forceinline__ CtaPlace cta_place(const Params& p) {
  int x, y;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(x));
  asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(y));
  CtaPlace at;
  at.row = x / p.num_splits;
  at.split = x - at.row * p.num_splits;
  at.kv_head = y / p.num_head_chunks;
  at.head_chunk = y - at.kv_head * p.num_head_chunks;
  at.first_head = at.kv_head * p.group_size + at.head_chunk * GMAX;
  at.num_heads = min(GMAX, p.group_size - at.head_chunk * GMAX);
  at.row_head = int64_t(at.row) * p.num_kv_heads + at.kv_head;
  return at;
}

template <typename T, int D, int GMAX, int STAGES>
__global__ void __launch_bounds__(kThreads, GMAX >= 8 ? 2 : STAGES <= kShallowStages ? 4 : 3)
    sparse_decode_split_kernel(const Params p) {
  using Tl = Tile<D, GMAX, STAGES>;
  constexpr int kVec = Tl::kVec, kLanes = Tl::kLanes, kRows = Tl::kRows;
  constexpr int kChunk = Tl::kChunk, kU = kTokensPerThread;
  const float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem[];
  T* pipe = reinterpret_cast<T*>(smem);
  int64_t* seg_offset = reinterpret_cast<int64_t*>(smem + Tl::kMainBytes);
  int* seg_valid = reinterpret_cast<int*>(seg_offset + kSegmentCap);

  CtaPlace at = cta_place<GMAX>(p);
  const int lane = threadIdx.x % kLanes;
  const int trow = threadIdx.x / kLanes;

  // Everything below reads inputs that the previous kernel may have written.
  wait_for_prior_grids();

  // This split's kept pages (round robin), in 16-token segments. seg_bound
  // comes from the kept_slots width alone, so the first kept_slots loads do
  // not wait for num_kept.
  const int segs_per_page = p.block_size / kSegment;
  const auto split_pages = [&](int pages) {
    return pages > at.split ? (pages - at.split + p.num_splits - 1) / p.num_splits : 0;
  };
  const int seg_bound = split_pages(p.max_kept) * segs_per_page;
  const int* split_slots = p.kept_slots + at.row_head * p.max_kept + at.split;
  const int seq_len = p.seq_lens[at.row];
  // The query heads' bits now, their floats after the table: the loads overlap
  // the table's (nothing waits for them before the first K/V load is issued).
  uint4 q_bits[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    const T* src = static_cast<const T*>(p.query) + at.row * p.query_stride_row +
                   (at.first_head + min(g, at.num_heads - 1)) * p.query_stride_head + lane * kVec;
    q_bits[g] = *reinterpret_cast<const uint4*>(src);
  }

  // Segment table entries of this split's segments: the K/V offset of segment
  // `seg` (of the split's; its page holds kept_slots entry `kept_idx`) and how
  // many of its tokens are visible (0: none). `kept` is only compared here:
  // nothing derived from it (a division) is scheduled before the slot loads.
  struct Entry {
    int64_t offset;
    int valid;
  };
  auto table_entry = [&](int seg, int slot, int kept) {
    const int page_of_split = seg / segs_per_page;
    const int seg_in_page = seg - page_of_split * segs_per_page;
    const int kept_idx = at.split + page_of_split * p.num_splits;
    Entry e{0, 0};
    if (kept_idx < kept && slot >= 0 && slot < p.max_blocks) {
      const int first_token = slot * p.block_size + seg_in_page * kSegment;
      e.valid = min(max(seq_len - first_token, 0), kSegment);
      if (e.valid > 0) {
        const int64_t page = p.block_table[at.row * p.block_table_stride + slot];
        e.offset = page * p.kv_stride_page + at.kv_head * p.kv_stride_head +
                   int64_t(seg_in_page) * kSegment * p.kv_stride_token;
      }
    }
    return e;
  };
  // The first batch reads kept_slots up to seg_bound whatever num_kept says
  // (only entries below it are used): the slot loads and num_kept's go out
  // together.
  const int fill = min(kSegmentCap, seg_bound);
  constexpr int kFillRounds = kSegmentCap / kThreads;
  int slots[kFillRounds];
#pragma unroll
  for (int f = 0; f < kFillRounds; ++f) {
    const int i = threadIdx.x + f * kThreads;
    slots[f] = i < fill ? split_slots[int64_t(i / segs_per_page) * p.num_splits] : -1;
  }
  const int kept = min(max(p.num_kept[at.row_head], 0), p.max_kept);
#pragma unroll
  for (int f = 0; f < kFillRounds; ++f) {
    const int i = threadIdx.x + f * kThreads;
    if (i >= fill) break;
    const Entry e = table_entry(i, slots[f], kept);
    seg_offset[i] = e.offset;
    seg_valid[i] = e.valid;
  }
  const int seg_count = split_pages(kept) * segs_per_page;
  __syncthreads();

  // Query heads of the group, pre-scaled so that logits are in log2 units.
  float q[GMAX][kVec];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    unpack8<T>(q_bits[g], q[g]);
#pragma unroll
    for (int i = 0; i < kVec; ++i) q[g][i] = g < at.num_heads ? q[g][i] * p.scale_log2 : 0.f;
  }

  float m[GMAX], l[GMAX], acc[GMAX][kVec];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = kNegInf;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[g][i] = 0.f;
  }

  const T* key_base = static_cast<const T*>(p.key_cache) + lane * kVec;
  const T* value_base = static_cast<const T*>(p.value_cache) + lane * kVec;

  for (int batch = 0;;) {
    const int num_segs = max(0, min(kSegmentCap, seg_count - batch));
    const int num_chunks = (num_segs + Tl::kSegsPerChunk - 1) / Tl::kSegsPerChunk;

    // Token r of a stage is row r % kRows of pass r / kRows: thread `trow`
    // owns rows trow, trow + kRows, ... of every stage.
    auto issue = [&](int chunk) {
      T* k_dst = pipe + (chunk % STAGES) * Tl::kStageElems + lane * kVec;
      T* v_dst = k_dst + kChunk * D;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int r = u * kRows + trow;
        const int seg = chunk * Tl::kSegsPerChunk + r / kSegment;
        const int tok = r % kSegment;
        const bool visible = seg < num_segs && tok < seg_valid[seg];
        const int64_t offset = visible ? seg_offset[seg] + tok * p.kv_stride_token : 0;
        cp_async_16(k_dst + r * D, key_base + offset, visible);
        cp_async_16(v_dst + r * D, value_base + offset, visible);
      }
    };

    auto compute = [&](int chunk) {
      const T* k_src = pipe + (chunk % STAGES) * Tl::kStageElems + lane * kVec;
      const T* v_src = k_src + kChunk * D;
      float s[kU][GMAX];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int r = u * kRows + trow;
        float k[kVec];
        unpack8<T>(*reinterpret_cast<const uint4*>(k_src + r * D), k);
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < kVec; ++i) dot = fmaf(q[g][i], k[i], dot);
          s[u][g] = dot;
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int r = u * kRows + trow;
        const int seg = chunk * Tl::kSegsPerChunk + r / kSegment;
        const bool visible = seg < num_segs && r % kSegment < seg_valid[seg];
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          s[u][g] = group_sum<kLanes>(s[u][g]);
          if (!visible) s[u][g] = kNegInf;
        }
      }
      // Online softmax; s becomes the probabilities p (relative to the new max).
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float m_new = m[g];
#pragma unroll
        for (int u = 0; u < kU; ++u) m_new = fmaxf(m_new, s[u][g]);
        const float m_ref = m_new == kNegInf ? 0.f : m_new;  // no (-inf) - (-inf)
        const float alpha = exp2f(m[g] - m_ref);
        l[g] *= alpha;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[g][i] *= alpha;
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          s[u][g] = exp2f(s[u][g] - m_ref);
          l[g] += s[u][g];
        }
        m[g] = m_new;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int r = u * kRows + trow;
        float v[kVec];
        unpack8<T>(*reinterpret_cast<const uint4*>(v_src + r * D), v);
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[g][i] = fmaf(s[u][g], v[i], acc[g][i]);
        }
      }
    };

#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < num_chunks) issue(st);
      cp_async_commit();
    }
    for (int chunk = 0; chunk < num_chunks; ++chunk) {
      cp_async_wait<STAGES - 2>();
      // Refills the slot that this thread emptied in the previous iteration.
      if (chunk + STAGES - 1 < num_chunks) issue(chunk + STAGES - 1);
      cp_async_commit();
      compute(chunk);
    }
    batch += kSegmentCap;
    if (batch >= seg_count) break;
    __syncthreads();  // the previous batch's table is no longer read
    const int num_segs_next = min(kSegmentCap, seg_count - batch);
#pragma unroll
    for (int f = 0; f < kFillRounds; ++f) {
      const int i = threadIdx.x + f * kThreads;
      if (i >= num_segs_next) break;
      // From p, not split_slots: a pointer held through the main loop spills.
      const int kept_idx = at.split + (batch + i) / segs_per_page * p.num_splits;
      const int slot = p.kept_slots[at.row_head * p.max_kept + kept_idx];
      const Entry e = table_entry(batch + i, slot, kept);
      seg_offset[i] = e.offset;
      seg_valid[i] = e.valid;
    }
    __syncthreads();
  }
  // A dependent grid may start launching its CTAs into the SM room that ours free.
  allow_dependent_grids();
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's smem becomes the merge buffer
  at = cta_place<GMAX>(p);

  // Merge the kRows per-row states of each (head, channel).
  float* merge_acc = reinterpret_cast<float*>(smem);  // [kRows][GMAX][D]
  float* merge_m = merge_acc + kRows * GMAX * D;      // [kRows][GMAX]
  float* merge_l = merge_m + kRows * GMAX;            // [kRows][GMAX]
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    float4* dst = reinterpret_cast<float4*>(merge_acc + (trow * GMAX + g) * D + lane * kVec);
    dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    if (lane == 0) {
      merge_m[trow * GMAX + g] = m[g];
      merge_l[trow * GMAX + g] = l[g];
    }
  }
  __syncthreads();

  for (int item = threadIdx.x; item < GMAX * D / 4; item += kThreads) {
    const int g = item / (D / 4);
    const int d = (item - g * (D / 4)) * 4;
    if (g >= at.num_heads) continue;
    float m_all = kNegInf;
#pragma unroll
    for (int z = 0; z < kRows; ++z) m_all = fmaxf(m_all, merge_m[z * GMAX + g]);
    float l_all = 0.f;
    float o[4] = {0.f, 0.f, 0.f, 0.f};
    if (m_all != kNegInf) {
#pragma unroll
      for (int z = 0; z < kRows; ++z) {
        const float w = exp2f(merge_m[z * GMAX + g] - m_all);
        const float4 a = *reinterpret_cast<const float4*>(merge_acc + (z * GMAX + g) * D + d);
        l_all = fmaf(w, merge_l[z * GMAX + g], l_all);
        o[0] = fmaf(w, a.x, o[0]);
        o[1] = fmaf(w, a.y, o[1]);
        o[2] = fmaf(w, a.z, o[2]);
        o[3] = fmaf(w, a.w, o[3]);
      }
    }
    // No visible token: output 0, log-sum-exp -inf.
    const float inv_l = l_all > 0.f ? 1.f / l_all : 0.f;
    const float lse2 = l_all > 0.f ? m_all + log2f(l_all) : kNegInf;
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] *= inv_l;
    const int head = at.first_head + g;
    if (p.num_splits == 1) {
      T* dst = static_cast<T*>(p.out) + at.row * p.out_stride_row + head * p.out_stride_head + d;
      store_packed<T, 4>(dst, o);
      if (d == 0) p.lse[at.row * p.lse_stride_row + head * p.lse_stride_head] = lse2 * kLn2;
    } else {
      const int64_t part = (int64_t(at.split) * p.num_rows + at.row) * p.num_q_heads + head;
      *reinterpret_cast<float4*>(p.partial_out + part * D + d) =
          make_float4(o[0], o[1], o[2], o[3]);
      if (d == 0) p.partial_lse[part] = lse2;
    }
  }
  if (p.num_splits == 1 || p.merge_counters == nullptr) return;

  // The last split to arrive merges: no second kernel, no gap between two.
  // The barrier orders the CTA's partial writes before thread 0's release
  // fence and count (cumulativity): one acq_rel fence a CTA. A __threadfence()
  // in every thread (fence.sc: MEMBAR.SC.GPU + CCTL.IVALL) made the whole
  // kernel 5-8% slower on the H100 (docs/results.md).
  int* is_last = seg_valid;  // the segment table is no longer read
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = p.merge_counters + at.row_head * p.num_head_chunks + at.head_chunk;
    fence_acq_rel_gpu();
    const bool last = atomicAdd(counter, 1) == p.num_splits - 1;
    if (last) {
      *counter = 0;  // every split has arrived: ready for the next launch
      fence_acq_rel_gpu();  // acquire: the other splits' partials
    }
    *is_last = last;
  }
  __syncthreads();
  if (!*is_last) return;
  merge_splits<T, D, GMAX>(p, at.row, at.first_head, at.num_heads, reinterpret_cast<float*>(smem));
}

// Merges the num_splits partials of each (row, query head): one warp each.
template <typename T, int D>
__global__ void __launch_bounds__(kCombineWarps * 32)
    sparse_decode_combine_kernel(const Params p) {
  constexpr int kPerLane = D / 32;
  const float kNegInf = -INFINITY;
  __shared__ float weights[kCombineWarps][kMaxSplits];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int item = blockIdx.x * kCombineWarps + warp;
  if (item >= p.num_rows * p.num_q_heads) return;
  const int row = item / p.num_q_heads;
  const int head = item - row * p.num_q_heads;
  const int64_t split_stride = int64_t(p.num_rows) * p.num_q_heads;

  float m_all = kNegInf;
  for (int s = lane; s < p.num_splits; s += 32) {
    m_all = fmaxf(m_all, p.partial_lse[s * split_stride + item]);
  }
  m_all = warp_max(m_all);
  float l_all = 0.f;
  for (int s = lane; s < p.num_splits; s += 32) {
    const float w = m_all == kNegInf ? 0.f : exp2f(p.partial_lse[s * split_stride + item] - m_all);
    weights[warp][s] = w;
    l_all += w;
  }
  l_all = warp_sum(l_all);
  __syncwarp();

  float o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float w = weights[warp][s];
    if (w == 0.f) continue;  // empty split: skip its bytes
    const float* src = p.partial_out + (s * split_stride + item) * D + lane * kPerLane;
    if constexpr (kPerLane == 2) {
      const float2 x = *reinterpret_cast<const float2*>(src);
      o[0] = fmaf(w, x.x, o[0]);
      o[1] = fmaf(w, x.y, o[1]);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; i += 4) {
        const float4 x = *reinterpret_cast<const float4*>(src + i);
        o[i] = fmaf(w, x.x, o[i]);
        o[i + 1] = fmaf(w, x.y, o[i + 1]);
        o[i + 2] = fmaf(w, x.z, o[i + 2]);
        o[i + 3] = fmaf(w, x.w, o[i + 3]);
      }
    }
  }
  const float inv_l = l_all > 0.f ? 1.f / l_all : 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] *= inv_l;
  T* dst = static_cast<T*>(p.out) + row * p.out_stride_row + head * p.out_stride_head +
           lane * kPerLane;
  store_packed<T, kPerLane>(dst, o);
  if (lane == 0) {
    p.lse[row * p.lse_stride_row + head * p.lse_stride_head] =
        l_all > 0.f ? (m_all + log2f(l_all)) * kLn2 : kNegInf;
  }
}

}  // namespace sparse_decode
}  // namespace prhs
