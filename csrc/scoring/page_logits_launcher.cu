// torch -> ScoreParams: argument checks, then the torch-free launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/Tensor.h>

#include "page_logits_kernel.cuh"
#include "page_logits_launcher.h"

namespace sc = prhs::scoring;

namespace {

// 16-byte vector loads of kVec channels need aligned page / head rows.
void check_summary(const at::Tensor& t, const char* name, at::ScalarType type,
                   const at::Tensor& query, int64_t channels) {
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(2) == channels && t.stride(2) == 1, name,
              " must be [P, Hkv, ", channels, "], contiguous in its last dim");
  TORCH_CHECK(t.device() == query.device(), name, " must be on the query's device");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  (t.stride(0) * t.element_size()) % 16 == 0 &&
                  (t.stride(1) * t.element_size()) % 16 == 0,
              name, " must have 16-byte aligned rows");
}

void check_output(const at::Tensor& t, const char* name, const at::Tensor& query,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.sizes() == shape && t.is_contiguous(), name,
              " must be float32 ", shape, ", contiguous");
  TORCH_CHECK(t.device() == query.device(), name, " must be on the query's device");
}

sc::QueryType query_type(at::ScalarType type) {
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "query must be float32, float16 or bfloat16, got ", type);
  return type == at::kFloat ? sc::QueryType::kFloat32
                            : (type == at::kHalf ? sc::QueryType::kFloat16
                                                 : sc::QueryType::kBFloat16);
}

// Largest power-of-two iters <= 16 that still gives 8 blocks per SM of an H100.
int auto_iters(int64_t num_rows, int64_t num_kv_heads, int64_t num_slots, int groups) {
  for (int iters = 16; iters > 1; iters /= 2) {
    const int64_t tiles = (num_slots + groups * iters - 1) / (groups * iters);
    if (num_rows * num_kv_heads * tiles >= 8 * 132) return iters;
  }
  return 1;
}

}  // namespace

void page_logits(const at::Tensor& query, const at::Tensor& sums, const at::Tensor& key_min,
                 const at::Tensor& key_max, const at::Tensor& block_table,
                 const at::Tensor& seq_lens, const std::optional<at::Tensor>& skip,
                 int64_t block_size, double scale, int64_t code_bits, int64_t iters,
                 at::Tensor& est, at::Tensor& upper, at::Tensor& lower) {
  TORCH_CHECK(query.is_cuda() && query.dim() == 3, "query must be a CUDA [N, Hq, D] tensor");
  const int64_t num_rows = query.size(0), head_dim = query.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256,
              "prhs page_logits: head_dim must be 64, 128 or 256, got ", head_dim);
  TORCH_CHECK(code_bits == 0 || code_bits == 8, "code_bits must be 0 or 8, got ", code_bits);
  const int64_t num_kv_heads = key_min.dim() == 3 ? key_min.size(1) : 0;
  TORCH_CHECK(num_kv_heads > 0 && query.size(1) % num_kv_heads == 0, "query has ",
              query.size(1), " heads for ", num_kv_heads, " KV heads");
  const int64_t group = query.size(1) / num_kv_heads;
  TORCH_CHECK(group <= 8, "prhs page_logits: at most 8 query heads per KV head, got ", group);
  const auto box_type = code_bits == 0 ? at::kFloat : at::kBFloat16;
  check_summary(sums, "sums", code_bits == 0 ? at::kFloat : at::kByte, query, head_dim);
  check_summary(key_min, "key_min", box_type, query, head_dim);
  check_summary(key_max, "key_max", box_type, query, head_dim);
  TORCH_CHECK(key_max.strides() == key_min.strides() && key_max.sizes() == key_min.sizes(),
              "key_min and key_max must share shape and strides");
  TORCH_CHECK(sums.size(0) == key_min.size(0) && sums.size(1) == num_kv_heads,
              "sums must be [", key_min.size(0), ", ", num_kv_heads, ", ", head_dim, "]");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  block_table.size(0) == num_rows && block_table.device() == query.device(),
              "block_table must be int32 [", num_rows, ", M] on the query's device");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == num_rows && seq_lens.is_contiguous() &&
                  seq_lens.device() == query.device(),
              "seq_lens must be contiguous int32 [", num_rows, "] on the query's device");
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  const int64_t num_slots = est.dim() == 4 ? est.size(3) : -1;
  TORCH_CHECK(num_slots >= 0 && block_table.size(1) >= num_slots, "block_table has ",
              block_table.size(1), " columns for ", num_slots, " slots");
  const std::vector<int64_t> shape{num_rows, num_kv_heads, group, num_slots};
  check_output(est, "est", query, shape);
  check_output(upper, "upper", query, shape);
  check_output(lower, "lower", query, shape);
  TORCH_CHECK(iters >= 0 && iters <= sc::kMaxIters, "iters must be 0..", sc::kMaxIters);
  TORCH_CHECK(num_slots * block_size < (int64_t{1} << 31) && num_rows < 65536 &&
                  num_kv_heads < 65536,
              "prhs page_logits: too many rows, heads or slots");

  sc::ScoreParams p{};
  p.query = query.data_ptr();
  p.sums = sums.data_ptr();
  p.key_min = key_min.data_ptr();
  p.key_max = key_max.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  if (skip.has_value()) {
    const at::Tensor& s = *skip;
    TORCH_CHECK(s.scalar_type() == at::kByte && s.dim() == 2 && s.size(0) == num_rows &&
                    s.size(1) == num_kv_heads && s.device() == query.device(),
                "skip must be uint8 [", num_rows, ", ", num_kv_heads, "] on the query's device");
    p.skip = s.data_ptr<uint8_t>();
    p.skip_stride_n = s.stride(0);
    p.skip_stride_h = s.stride(1);
  }
  p.est = est.data_ptr<float>();
  p.upper = upper.data_ptr<float>();
  p.lower = lower.data_ptr<float>();
  p.q_stride_n = query.stride(0);
  p.q_stride_h = query.stride(1);
  p.q_stride_d = query.stride(2);
  p.sum_stride_p = sums.stride(0);
  p.sum_stride_h = sums.stride(1);
  p.box_stride_p = key_min.stride(0);
  p.box_stride_h = key_min.stride(1);
  p.table_stride_n = block_table.stride(0);
  p.table_stride_m = block_table.stride(1);
  p.num_slots = static_cast<int>(num_slots);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.group = static_cast<int>(group);
  p.block_size = static_cast<int>(block_size);
  const int groups = sc::groups_per_block(static_cast<int>(head_dim));
  p.iters = iters > 0 ? static_cast<int>(iters)
                      : auto_iters(num_rows, num_kv_heads, num_slots, groups);
  p.scale = static_cast<float>(scale);
  p.query_type = query_type(query.scalar_type());
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaError_t err =
      sc::launch_page_logits(p, static_cast<int>(num_rows), static_cast<int>(head_dim),
                             static_cast<int>(code_bits), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "prhs page_logits: launch failed: ", cudaGetErrorString(err));
}
