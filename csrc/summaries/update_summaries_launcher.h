// Torch entry points of the page-summary update (see update_summaries_launcher.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

// Folds key [T, H, D] (bf16 / fp16 / fp32) at slot_mapping [T'] (int32 / int64,
// -1 = padding, T' <= T) into the float32 page summaries key_sum / key_min /
// key_max [P, H, D] (same strides), in place; or, with key_sum uint8 codes
// [P, H, D], into int8 centroids in bfloat16 boxes key_min / key_max.
void update_page_summaries(const at::Tensor& key, const at::Tensor& slot_mapping,
                           int64_t block_size, at::Tensor& key_sum, at::Tensor& key_min,
                           at::Tensor& key_max);

// vLLM's KV cache write for an unquantized cache (key and value rows [T, H, D]
// copied to their slots in key_cache / value_cache [P, H, block_size, D], same
// dtype as key) and update_page_summaries, in one launch.
void write_cache_and_summaries(const at::Tensor& key, const at::Tensor& value,
                               at::Tensor& key_cache, at::Tensor& value_cache,
                               const at::Tensor& slot_mapping, at::Tensor& key_sum,
                               at::Tensor& key_min, at::Tensor& key_max);
