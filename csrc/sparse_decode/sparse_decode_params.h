// Arguments of the sparse paged decode kernels: plain pointers, sizes and
// strides (in elements), so the kernels never see torch.
#pragma once

#include <cstdint>

namespace prhs {
namespace sparse_decode {

enum class DType : int { kBFloat16 = 0, kFloat16 = 1 };

struct Params {
  // Inputs.
  const void* query;           // [N, Hq, D], dtype
  const void* key_cache;       // [P, Hkv, bs, D], dtype, strided
  const void* value_cache;     // [P, Hkv, bs, D], dtype, same strides as key_cache
  const int32_t* block_table;  // [N, M], rows block_table_stride apart
  const int32_t* seq_lens;     // [N]
  const int32_t* kept_slots;   // [N, Hkv, K] contiguous: indexes into block_table rows
  const int32_t* num_kept;     // [N, Hkv] contiguous: valid prefix of kept_slots

  // Outputs.
  void* out;    // [N, Hq, D], dtype
  float* lse;   // [N, Hq], natural log
  // Split-K workspace (unused when num_splits == 1).
  float* partial_out;  // [num_splits, N, Hq, D], normalised per split
  float* partial_lse;  // [num_splits, N, Hq], log2 domain
  // [N, Hkv, num_head_chunks] arrival counts, zero between launches (each
  // launch resets the ones it counted), or nullptr: merge in a second kernel.
  int* merge_counters;

  int64_t query_stride_row, query_stride_head;
  int64_t out_stride_row, out_stride_head;
  int64_t lse_stride_row, lse_stride_head;
  int64_t kv_stride_page, kv_stride_head, kv_stride_token;
  int64_t block_table_stride;

  int num_rows;      // N
  int num_q_heads;   // Hq
  int num_kv_heads;  // Hkv
  int head_dim;      // D
  int block_size;    // bs, a multiple of 16
  int max_blocks;    // M
  int max_kept;      // K

  float scale_log2;  // softmax scale * log2(e)
  DType dtype;

  // Filled by make_plan().
  int group_size;       // Hq / Hkv
  int num_head_chunks;  // CTAs that share one KV head's query heads
  int num_splits;       // split-K factor over the kept pages
};

}  // namespace sparse_decode
}  // namespace prhs
