// torch -> Params: argument checks, then the torch-free plan and launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/Tensor.h>

#include <initializer_list>

#include "sparse_decode_dispatch.cuh"
#include "sparse_decode_launcher.h"

namespace sd = prhs::sparse_decode;

namespace {

sd::DType dtype_of(at::ScalarType type) {
  TORCH_CHECK(type == at::kBFloat16 || type == at::kHalf,
              "prhs sparse_paged_decode: bfloat16 or float16 inputs, got ", type);
  return type == at::kBFloat16 ? sd::DType::kBFloat16 : sd::DType::kFloat16;
}

void check_int32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
}

// 16-byte vector accesses need 16-byte aligned rows.
void check_vectors(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dim");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must be 16-byte aligned");
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0, name, " stride ", d, " must be a multiple of 8 elements");
  }
}

// Shape fields of Params (no pointers): what make_plan needs.
sd::Params shape_params(int64_t num_rows, int64_t num_q_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t block_size, int64_t max_kept,
                        at::ScalarType dtype) {
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256,
              "prhs sparse_paged_decode: head_dim must be 64, 128 or 256, got ", head_dim);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "num_q_heads ", num_q_heads,
              " is not a multiple of num_kv_heads ", num_kv_heads);
  TORCH_CHECK(block_size > 0 && block_size % sd::kSegment == 0,
              "block_size must be a multiple of 16, got ", block_size);
  TORCH_CHECK(num_rows >= 0 && max_kept >= 0, "negative sizes");
  sd::Params p{};
  p.num_rows = static_cast<int>(num_rows);
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(block_size);
  p.max_kept = static_cast<int>(max_kept);
  p.dtype = dtype_of(dtype);
  return p;
}

// What a benchmark or test may ask of the plan: a split count, a ring depth.
void check_plan_requests(int64_t num_splits, int64_t stages) {
  TORCH_CHECK(num_splits >= 0 && num_splits <= sd::kMaxSplits, "num_splits must be in [0, ",
              sd::kMaxSplits, "], got ", num_splits);
  TORCH_CHECK(stages == 0 || stages == sd::kShallowStages || stages == sd::kDeepStages,
              "stages must be 0 (the plan's), ", sd::kShallowStages, " or ", sd::kDeepStages,
              ", got ", stages);
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "prhs sparse_paged_decode: ", what, ": ",
              cudaGetErrorString(err));
}

}  // namespace

void sparse_paged_decode(const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_table,
                         const at::Tensor& seq_lens, const at::Tensor& kept_slots,
                         const at::Tensor& num_kept, double scale, at::Tensor& out,
                         at::Tensor& lse, at::Tensor& workspace, int64_t num_splits,
                         int64_t stages) {
  TORCH_CHECK(query.is_cuda(), "query must be a CUDA tensor");
  TORCH_CHECK(query.dim() == 3, "query must be [N, Hq, D]");
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [P, Hkv, block_size, D]");
  // Dims before any size(i) below (kept_slots.size(-1) of a 0-dim tensor throws
  // an index error that names neither the argument nor the op).
  check_int32(block_table, "block_table", 2);
  check_int32(seq_lens, "seq_lens", 1);
  check_int32(kept_slots, "kept_slots", 3);
  check_int32(num_kept, "num_kept", 2);
  const int64_t num_rows = query.size(0), num_q_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  sd::Params p = shape_params(num_rows, num_q_heads, num_kv_heads, head_dim, block_size,
                              kept_slots.size(-1), query.scalar_type());
  TORCH_CHECK(key_cache.size(3) == head_dim, "key_cache head_dim mismatch");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must match key_cache");
  TORCH_CHECK(value_cache.strides() == key_cache.strides(),
              "value_cache must have key_cache's strides");
  for (const at::Tensor* t : {&key_cache, &value_cache, static_cast<const at::Tensor*>(&out)}) {
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), "dtype mismatch with query");
  }
  TORCH_CHECK(out.sizes() == query.sizes(), "out must be [N, Hq, D] like query");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == num_rows &&
                  lse.size(1) == num_q_heads,
              "lse must be float32 [N, Hq]");
  check_vectors(query, "query");
  check_vectors(key_cache, "key_cache");
  check_vectors(value_cache, "value_cache");
  check_vectors(out, "out");

  TORCH_CHECK(block_table.size(0) == num_rows && block_table.stride(1) == 1,
              "block_table must be [N, M] with contiguous rows");
  TORCH_CHECK(seq_lens.size(0) == num_rows && seq_lens.is_contiguous(), "seq_lens must be [N]");
  TORCH_CHECK(kept_slots.size(0) == num_rows && kept_slots.size(1) == num_kv_heads &&
                  kept_slots.is_contiguous(),
              "kept_slots must be contiguous [N, Hkv, K]");
  TORCH_CHECK(num_kept.size(0) == num_rows && num_kept.size(1) == num_kv_heads &&
                  num_kept.is_contiguous(),
              "num_kept must be contiguous [N, Hkv]");
  const std::initializer_list<const at::Tensor*> all = {
      &key_cache, &value_cache, &block_table, &seq_lens, &kept_slots, &num_kept, &out, &lse,
      &workspace};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device() == query.device(), "all tensors must be on ", query.device());
  }
  TORCH_CHECK(workspace.is_contiguous(), "workspace must be contiguous");

  const c10::cuda::CUDAGuard guard(query.device());
  const int device = query.device().index();
  sd::Plan plan;
  check_plan_requests(num_splits, stages);
  check_cuda(
      sd::make_plan(p, device, &plan, static_cast<int>(num_splits), static_cast<int>(stages)),
      "plan");
  TORCH_CHECK(workspace.nbytes() >= plan.workspace_bytes, "workspace holds ",
              workspace.nbytes(), " bytes, this call needs ", plan.workspace_bytes,
              " (size it with sparse_paged_decode_workspace_size)");
  TORCH_CHECK(plan.workspace_bytes == 0 ||
                  reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 16 == 0,
              "workspace must be 16-byte aligned");

  p.query = query.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.kept_slots = kept_slots.data_ptr<int32_t>();
  p.num_kept = num_kept.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.query_stride_row = query.stride(0);
  p.query_stride_head = query.stride(1);
  p.out_stride_row = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.lse_stride_row = lse.stride(0);
  p.lse_stride_head = lse.stride(1);
  p.kv_stride_page = key_cache.stride(0);
  p.kv_stride_head = key_cache.stride(1);
  p.kv_stride_token = key_cache.stride(2);
  p.block_table_stride = block_table.stride(0);
  p.max_blocks = static_cast<int>(block_table.size(1));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  void* ws = plan.workspace_bytes == 0 ? nullptr : workspace.data_ptr();
  check_cuda(sd::run(p, plan, ws, c10::cuda::getCurrentCUDAStream(device).stream()), "launch");
}

int64_t sparse_paged_decode_workspace_size(int64_t max_num_rows, int64_t num_q_heads,
                                           int64_t num_kv_heads, int64_t head_dim,
                                           int64_t block_size, int64_t max_kept,
                                           at::ScalarType dtype, int64_t device_index) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  const sd::Params p =
      shape_params(0, num_q_heads, num_kv_heads, head_dim, block_size, max_kept, dtype);
  size_t bytes = 0;
  check_cuda(sd::max_workspace_bytes(p, static_cast<int>(max_num_rows),
                                     static_cast<int>(device_index), &bytes),
             "workspace size");
  return static_cast<int64_t>(bytes);
}

std::vector<int64_t> sparse_paged_decode_plan(int64_t num_rows, int64_t num_q_heads,
                                              int64_t num_kv_heads, int64_t head_dim,
                                              int64_t block_size, int64_t max_kept,
                                              at::ScalarType dtype, int64_t device_index,
                                              int64_t num_splits, int64_t stages) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  const sd::Params p =
      shape_params(num_rows, num_q_heads, num_kv_heads, head_dim, block_size, max_kept, dtype);
  sd::Plan plan;
  check_plan_requests(num_splits, stages);
  check_cuda(sd::make_plan(p, static_cast<int>(device_index), &plan, static_cast<int>(num_splits),
                           static_cast<int>(stages)),
             "plan");
  const int64_t counter_bytes = plan.num_splits > 1 ? static_cast<int64_t>(sd::kCounterBytes) : 0;
  return {plan.group_max,
          plan.num_head_chunks,
          plan.num_splits,
          static_cast<int64_t>(plan.workspace_bytes),
          plan.merge_in_split ? 1 : 0,
          counter_bytes,
          plan.dependent_launch ? 1 : 0,
          plan.stages};
}
