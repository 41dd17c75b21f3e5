// Torch entry point of the page scoring kernel (see page_logits_launcher.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

// prhs_vllm.ops.ref.selection.page_logits into est / upper / lower
// [N, Hkv, G, M] float32 contiguous. sums: [P, Hkv, D] float32 key sums
// (code_bits 0, key_min / key_max float32) or uint8 int8 centroid codes
// (code_bits 8, key_min / key_max bfloat16). block_table [N, >= M] and
// seq_lens [N] int32; skip [N, Hkv] uint8 or None. iters: rounds of pages a
// block scores (1..64), 0 to choose from the grid size.
void page_logits(const at::Tensor& query, const at::Tensor& sums, const at::Tensor& key_min,
                 const at::Tensor& key_max, const at::Tensor& block_table,
                 const at::Tensor& seq_lens, const std::optional<at::Tensor>& skip,
                 int64_t block_size, double scale, int64_t code_bits, int64_t iters,
                 at::Tensor& est, at::Tensor& upper, at::Tensor& lower);
