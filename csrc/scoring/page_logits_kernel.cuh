// Page scoring: per page slot and query head, the centroid estimate and the
// min/max box bounds of the page's log attention mass
// (prhs_vllm.ops.ref.selection.page_logits). No torch.
//
// A group of LANES = HEAD_DIM / kVec lanes scores one page for one KV head
// and all its query heads: each lane reads kVec channels of the page's
// summary (16-byte vector loads), and the lanes' partial sums are reduced by
// a transposing butterfly (each step halves both the values and the lanes
// that hold them). A block scores `iters` rounds of kThreads / LANES pages
// of one (row, KV head); the lane holding a result writes it. The next
// round's summaries are loaded before this round is scored, so two pages per
// group are in flight.
//
// Bounds as sums over channels: max(q lo, q hi) = q (lo + hi) / 2 + |q| (hi - lo) / 2,
// min(q lo, q hi) the same with -|q|.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace prhs {
namespace scoring {

constexpr int kThreads = 128;
constexpr int kVec = 8;        // channels a lane reads of each summary array
constexpr int kMaxIters = 64;  // rounds of pages one block scores

enum class QueryType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ScoreParams {
  const void* query;        // [N, Hq, D] (query_type), any strides
  const void* sums;         // kCodeBits 0: float32 key sums; 8: uint8 centroid codes [P, Hkv, D]
  const void* key_min;      // [P, Hkv, D] float32 (kCodeBits 0) or bfloat16 (8), channels contiguous
  const void* key_max;      // same layout as key_min
  const int32_t* block_table;  // [N, >= num_slots]
  const int32_t* seq_lens;     // [N]
  const uint8_t* skip;         // [N, Hkv] (nonzero: write -inf, read nothing) or nullptr
  float* est;                  // [N, Hkv, G, num_slots] float32 contiguous, as upper / lower
  float* upper;
  float* lower;
  int64_t q_stride_n, q_stride_h, q_stride_d;
  int64_t sum_stride_p, sum_stride_h;  // of sums (codes: in bytes)
  int64_t box_stride_p, box_stride_h;  // of key_min / key_max
  int64_t table_stride_n, table_stride_m;
  int64_t skip_stride_n, skip_stride_h;
  int num_slots, num_kv_heads, group, block_size, iters;
  float scale;
  QueryType query_type;
};

__device__ __forceinline__ float load_query(const ScoreParams& p, int64_t at) {
  switch (p.query_type) {
    case QueryType::kFloat16:
      return __half2float(static_cast<const __half*>(p.query)[at]);
    case QueryType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p.query)[at]);
    default:
      return static_cast<const float*>(p.query)[at];
  }
}

// WORDS 32-bit words from a 16-byte aligned address (read-only path).
template <int WORDS>
__device__ __forceinline__ void load_words(const void* src, uint32_t (&w)[WORDS]) {
  if constexpr (WORDS % 4 == 0) {
#pragma unroll
    for (int i = 0; i < WORDS / 4; ++i) {
      const uint4 v = __ldg(static_cast<const uint4*>(src) + i);
      w[4 * i] = v.x;
      w[4 * i + 1] = v.y;
      w[4 * i + 2] = v.z;
      w[4 * i + 3] = v.w;
    }
  } else {
    static_assert(WORDS == 2, "8 or a multiple of 16 bytes");
    const uint2 v = __ldg(static_cast<const uint2*>(src));
    w[0] = v.x;
    w[1] = v.y;
  }
}

// One lane's kVec channels of one page's summary, as loaded.
template <int kCodeBits>
struct PageSlice {
  // float32: sum, min, max (8 words each); int8: codes (2 words), bf16 min / max (4 each).
  static constexpr int kSumWords = kCodeBits == 0 ? kVec : kVec / 4;
  static constexpr int kBoxWords = kCodeBits == 0 ? kVec : kVec / 2;
  uint32_t sum[kSumWords];
  uint32_t lo[kBoxWords];
  uint32_t hi[kBoxWords];

  __device__ __forceinline__ void load(const ScoreParams& p, int64_t page, int h, int lane) {
    const int64_t box = page * p.box_stride_p + h * p.box_stride_h + lane * kVec;
    const int64_t sums = page * p.sum_stride_p + h * p.sum_stride_h + lane * kVec;
    if constexpr (kCodeBits == 0) {
      load_words(static_cast<const float*>(p.sums) + sums, sum);
      load_words(static_cast<const float*>(p.key_min) + box, lo);
      load_words(static_cast<const float*>(p.key_max) + box, hi);
    } else {
      load_words(static_cast<const uint8_t*>(p.sums) + sums, sum);
      load_words(static_cast<const __nv_bfloat16*>(p.key_min) + box, lo);
      load_words(static_cast<const __nv_bfloat16*>(p.key_max) + box, hi);
    }
  }

  // Channel c as float32: the box, and the centroid (kCodeBits 8) or key sum (0).
  __device__ __forceinline__ void channel(int c, float& lo_c, float& hi_c, float& centre) const {
    if constexpr (kCodeBits == 0) {
      lo_c = __uint_as_float(lo[c]);
      hi_c = __uint_as_float(hi[c]);
      centre = __uint_as_float(sum[c]);
    } else {
      // bf16 is the top half of a float32; two per word, channel c in the
      // low half when c is even.
      const uint32_t lw = lo[c / 2], hw = hi[c / 2];
      lo_c = __uint_as_float(c % 2 ? lw & 0xffff0000u : lw << 16);
      hi_c = __uint_as_float(c % 2 ? hw & 0xffff0000u : hw << 16);
      const float code = static_cast<float>((sum[c / 4] >> (8 * (c % 4))) & 0xffu);
      // ref.quant.decode_centroids: lo + code / 255 * (hi - lo).
      centre = fmaf(code, (hi_c - lo_c) * (1.0f / 255.0f), lo_c);
    }
  }
};

// Sums of V values over LANES lanes (both powers of two, the lanes aligned in
// the warp), as a transposing butterfly: at each step a lane keeps half of its
// values and adds the partner's copy of that half; once one value is left the
// steps add it whole. Afterwards a lane holds the sums of values
// value_index(lane) + i, i < kKept.
template <int V, int LANES>
struct Butterfly {
  static constexpr int kKept = V > LANES ? V / LANES : 1;

  __device__ __forceinline__ static void reduce(float (&v)[V], int lane) {
    int values = V;
#pragma unroll
    for (int offset = LANES / 2; offset >= 1; offset /= 2) {
      if (values > 1) {
        const bool upper = lane & offset;
        const int half = values / 2;
#pragma unroll
        for (int i = 0; i < V / 2; ++i) {
          if (i < half) {
            const float send = upper ? v[i] : v[i + half];
            const float keep = upper ? v[i + half] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
          }
        }
        values = half;
      } else {
        v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
      }
    }
  }

  // Index of the first value a lane holds after reduce.
  __device__ __forceinline__ static int value_index(int lane) {
    int index = 0, values = V;
#pragma unroll
    for (int offset = LANES / 2; offset >= 1 && values > 1; offset /= 2) {
      values /= 2;
      if (lane & offset) index += values;
    }
    return index;
  }

  // Whether this lane writes its values (lanes past the splits hold copies).
  __device__ __forceinline__ static bool writes(int lane) {
    if constexpr (V >= LANES) {
      return true;
    } else {
      return lane % (LANES / V) == 0;
    }
  }
};

__host__ __device__ constexpr int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Grid (ceil(num_slots / tile), num_kv_heads, N), tile = GROUPS * iters.
template <int kCodeBits, int HEAD_DIM, int GMAX>
__global__ void __launch_bounds__(kThreads) page_logits_kernel(const ScoreParams p) {
  constexpr int LANES = HEAD_DIM / kVec;
  constexpr int GROUPS = kThreads / LANES;
  constexpr int V = next_pow2(3 * GMAX);  // est, upper, lower per query head, padded
  using Reduce = Butterfly<V, LANES>;

  const int n = blockIdx.z, h = blockIdx.y;
  const int tile = GROUPS * p.iters;
  const int first = blockIdx.x * tile;
  const int in_tile = min(tile, p.num_slots - first);
  const int lane = threadIdx.x % LANES, group_slot = threadIdx.x / LANES;
  const int seq_len = p.seq_lens[n];
  bool dead = static_cast<int64_t>(first) * p.block_size >= seq_len;
  if (p.skip != nullptr) dead |= p.skip[n * p.skip_stride_n + h * p.skip_stride_h] != 0;
  const int64_t head_row = (static_cast<int64_t>(n) * p.num_kv_heads + h) * p.group;
  auto out = [&](int kind) { return kind == 0 ? p.est : (kind == 1 ? p.upper : p.lower); };

  if (dead) {  // nothing to read: -inf rows
    for (int i = threadIdx.x; i < 3 * p.group * in_tile; i += kThreads) {
      const int k = i / in_tile, t = i % in_tile;
      out(k / p.group)[(head_row + k % p.group) * p.num_slots + first + t] = -INFINITY;
    }
    return;
  }
  const int32_t* table = p.block_table + n * p.table_stride_n;
  // Tokens in slot j (0 past the context or the slots).
  auto tokens = [&](int j) {
    if (j >= p.num_slots) return 0;
    return max(0, min(p.block_size, seq_len - j * p.block_size));
  };
  auto fetch = [&](int round, PageSlice<kCodeBits>& slice) {
    const int j = first + round * GROUPS + group_slot;
    if (round < p.iters && tokens(j) > 0) {
      slice.load(p, static_cast<int64_t>(table[j * p.table_stride_m]), h, lane);
    }
  };
  PageSlice<kCodeBits> next{};
  fetch(0, next);  // in flight while the queries load

  float q[GMAX][kVec], q_abs[GMAX][kVec];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    const int64_t row = n * p.q_stride_n + (static_cast<int64_t>(h) * p.group + g) * p.q_stride_h;
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      q[g][c] = g < p.group ? load_query(p, row + (lane * kVec + c) * p.q_stride_d) : 0.0f;
      q_abs[g][c] = fabsf(q[g][c]);
    }
  }

  for (int round = 0; round < p.iters; ++round) {
    const PageSlice<kCodeBits> slice = next;
    fetch(round + 1, next);
    const int t = round * GROUPS + group_slot;
    const int count = tokens(first + t);
    // Per query head: q.centre, q.(lo + hi), |q|.(hi - lo) over this lane's channels.
    float est[GMAX], mid[GMAX], spread[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) est[g] = mid[g] = spread[g] = 0.0f;
    if (count > 0) {
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        float lo, hi, centre;
        slice.channel(c, lo, hi, centre);
        const float sum = lo + hi, width = hi - lo;
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          est[g] = fmaf(q[g][c], centre, est[g]);
          mid[g] = fmaf(q[g][c], sum, mid[g]);
          spread[g] = fmaf(q_abs[g][c], width, spread[g]);
        }
      }
    }
    float v[V];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      v[g] = est[g];
      v[GMAX + g] = mid[g] + spread[g];
      v[2 * GMAX + g] = mid[g] - spread[g];
    }
#pragma unroll
    for (int i = 3 * GMAX; i < V; ++i) v[i] = 0.0f;
    Reduce::reduce(v, lane);
    if (Reduce::writes(lane) && t < in_tile) {
      const float log_n = __logf(static_cast<float>(max(count, 1)));
      const float est_scale =
          kCodeBits == 0 ? p.scale / static_cast<float>(max(count, 1)) : p.scale;
      const int index = Reduce::value_index(lane);
#pragma unroll
      for (int i = 0; i < Reduce::kKept; ++i) {
        const int k = index + i, kind = k / GMAX, g = k % GMAX;
        if (kind < 3 && g < p.group) {
          const float scaled = kind == 0 ? v[i] * est_scale : 0.5f * p.scale * v[i];
          out(kind)[(head_row + g) * p.num_slots + first + t] =
              count > 0 ? scaled + log_n : -INFINITY;
        }
      }
    }
  }
}

// Pages a block scores per round.
inline int groups_per_block(int head_dim) { return kThreads / (head_dim / kVec); }

template <int kCodeBits, int HEAD_DIM, int GMAX>
cudaError_t launch_for(const ScoreParams& p, int num_rows, cudaStream_t stream) {
  const int tile = groups_per_block(HEAD_DIM) * p.iters;
  const dim3 grid((p.num_slots + tile - 1) / tile, p.num_kv_heads, num_rows);
  page_logits_kernel<kCodeBits, HEAD_DIM, GMAX><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int kCodeBits, int HEAD_DIM>
cudaError_t launch_for_dim(const ScoreParams& p, int num_rows, cudaStream_t stream) {
  if (p.group <= 1) return launch_for<kCodeBits, HEAD_DIM, 1>(p, num_rows, stream);
  if (p.group <= 2) return launch_for<kCodeBits, HEAD_DIM, 2>(p, num_rows, stream);
  if (p.group <= 4) return launch_for<kCodeBits, HEAD_DIM, 4>(p, num_rows, stream);
  if (p.group <= 8) return launch_for<kCodeBits, HEAD_DIM, 8>(p, num_rows, stream);
  return cudaErrorInvalidValue;
}

// Scores num_rows rows; code_bits 0 (float32 sums) or 8, head_dim 64 / 128 /
// 256, group 1..8, 1 <= iters <= kMaxIters. cudaErrorInvalidValue otherwise.
inline cudaError_t launch_page_logits(const ScoreParams& p, int num_rows, int head_dim,
                                      int code_bits, cudaStream_t stream) {
  if (num_rows == 0 || p.num_slots == 0) return cudaSuccess;
  if (p.iters < 1 || p.iters > kMaxIters || p.group < 1) return cudaErrorInvalidValue;
  if (code_bits != 0 && code_bits != 8) return cudaErrorInvalidValue;
  if (head_dim == 64) {
    return code_bits ? launch_for_dim<8, 64>(p, num_rows, stream)
                     : launch_for_dim<0, 64>(p, num_rows, stream);
  }
  if (head_dim == 128) {
    return code_bits ? launch_for_dim<8, 128>(p, num_rows, stream)
                     : launch_for_dim<0, 128>(p, num_rows, stream);
  }
  if (head_dim == 256) {
    return code_bits ? launch_for_dim<8, 256>(p, num_rows, stream)
                     : launch_for_dim<0, 256>(p, num_rows, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scoring
}  // namespace prhs
