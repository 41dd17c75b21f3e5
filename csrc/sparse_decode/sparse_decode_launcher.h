// Torch entry points of the sparse paged decode (see sparse_decode_launcher.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

// Attention of query [N, Hq, D] over the kept pages (kept_slots [N, Hkv, K],
// valid prefix num_kept [N, Hkv]) of a paged cache [P, Hkv, bs, D]; writes
// out [N, Hq, D] and lse [N, Hq] (float32). workspace: >= the bytes given by
// sparse_paged_decode_workspace_size for this shape. num_splits > 0 asks
// for that split-K factor, stages (3 or 4) for that cp.async ring depth
// (benchmarks, tests; the workspace must then fit their plan).
void sparse_paged_decode(const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_table,
                         const at::Tensor& seq_lens, const at::Tensor& kept_slots,
                         const at::Tensor& num_kept, double scale, at::Tensor& out,
                         at::Tensor& lse, at::Tensor& workspace, int64_t num_splits,
                         int64_t stages);

// Workspace bytes enough for any batch of 1..max_num_rows rows of this shape.
int64_t sparse_paged_decode_workspace_size(int64_t max_num_rows, int64_t num_q_heads,
                                           int64_t num_kv_heads, int64_t head_dim,
                                           int64_t block_size, int64_t max_kept,
                                           at::ScalarType dtype, int64_t device_index);

// [group_max, num_head_chunks, num_splits, workspace_bytes, merge_in_split,
// counter_bytes, dependent_launch, stages] of one call (num_splits > 0 /
// stages > 0: the plan with that split-K factor, capped / ring depth).
// counter_bytes: the workspace's leading arrival counters, which must be zero
// before a workspace's first call.
std::vector<int64_t> sparse_paged_decode_plan(int64_t num_rows, int64_t num_q_heads,
                                              int64_t num_kv_heads, int64_t head_dim,
                                              int64_t block_size, int64_t max_kept,
                                              at::ScalarType dtype, int64_t device_index,
                                              int64_t num_splits, int64_t stages);
