// torch -> UpdateParams: argument checks, then the torch-free launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/Tensor.h>

#include "update_summaries_kernel.cuh"
#include "update_summaries_launcher.h"

namespace su = prhs::summaries;

namespace {

bool is_int8(const at::Tensor& key_sum) { return key_sum.scalar_type() == at::kByte; }

// The checks shared by both ops, then their UpdateParams.
su::UpdateParams update_params(const at::Tensor& key, const at::Tensor& slot_mapping,
                               int64_t block_size, at::Tensor& key_sum, at::Tensor& key_min,
                               at::Tensor& key_max) {
  TORCH_CHECK(key.is_cuda(), "prhs summaries: key must be a CUDA tensor");
  TORCH_CHECK(key.dim() == 3, "key must be [T, H, D], got ", key.dim(), " dims");
  TORCH_CHECK(key.stride(2) == 1, "key must be contiguous in its last dim");
  const auto key_type = key.scalar_type();
  TORCH_CHECK(key_type == at::kFloat || key_type == at::kHalf || key_type == at::kBFloat16,
              "key must be float32, float16 or bfloat16, got ", key_type);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.stride(0) == 1,
              "slot_mapping must be a contiguous 1-d tensor");
  const auto slot_type = slot_mapping.scalar_type();
  TORCH_CHECK(slot_type == at::kLong || slot_type == at::kInt,
              "slot_mapping must be int64 or int32, got ", slot_type);
  TORCH_CHECK(slot_mapping.size(0) <= key.size(0), "slot_mapping has ", slot_mapping.size(0),
              " slots for ", key.size(0), " key rows");
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  // int8 centroids: key_sum holds the uint8 codes, the boxes are bfloat16.
  const bool int8 = is_int8(key_sum);
  const auto box_type = int8 ? at::kBFloat16 : at::kFloat;
  for (const at::Tensor* s : {&key_sum, &key_min, &key_max}) {
    TORCH_CHECK(s->dim() == 3 && s->size(1) == key.size(1) && s->size(2) == key.size(2) &&
                    s->scalar_type() == (s == &key_sum && int8 ? at::kByte : box_type),
                "summaries must be float32 [P, ", key.size(1), ", ", key.size(2),
                "], or uint8 codes with bfloat16 boxes");
    TORCH_CHECK(s->size(0) == key_sum.size(0) && s->stride(2) == 1,
                "key_sum, key_min and key_max must share their shape, contiguous in the last dim");
    TORCH_CHECK(s->device() == key.device() && slot_mapping.device() == key.device(),
                "key, slot_mapping and the summaries must be on one device");
  }
  TORCH_CHECK(key_max.strides() == key_min.strides() &&
                  (int8 || key_sum.strides() == key_min.strides()),
              "key_sum, key_min and key_max must share strides");
  TORCH_CHECK(slot_mapping.size(0) < (int64_t{1} << 31) && key.size(1) * key.size(2) < (1 << 30),
              "too many slots or channels");
  su::UpdateParams p{};
  p.key = key.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr();
  if (int8) {
    p.codes = key_sum.data_ptr<uint8_t>();
    p.box_min = reinterpret_cast<uint16_t*>(key_min.data_ptr());
    p.box_max = reinterpret_cast<uint16_t*>(key_max.data_ptr());
    p.code_stride_p = key_sum.stride(0);
    p.code_stride_h = key_sum.stride(1);
  } else {
    p.key_sum = key_sum.data_ptr<float>();
    p.key_min = key_min.data_ptr<float>();
    p.key_max = key_max.data_ptr<float>();
  }
  p.key_stride_t = key.stride(0);
  p.key_stride_h = key.stride(1);
  p.page_stride = key_min.stride(0);
  p.head_stride = key_min.stride(1);
  p.num_slots = static_cast<int>(slot_mapping.size(0));
  p.num_heads = static_cast<int>(key.size(1));
  p.head_dim = static_cast<int>(key.size(2));
  p.block_size = static_cast<int>(block_size);
  return p;
}

int key_dtype_code(const at::Tensor& key) {
  const auto type = key.scalar_type();
  return type == at::kFloat ? 0 : (type == at::kHalf ? 1 : 2);
}

int slot_bytes(const at::Tensor& slot_mapping) {
  return slot_mapping.scalar_type() == at::kLong ? 8 : 4;
}

}  // namespace

void update_page_summaries(const at::Tensor& key, const at::Tensor& slot_mapping,
                           int64_t block_size, at::Tensor& key_sum, at::Tensor& key_min,
                           at::Tensor& key_max) {
  const su::UpdateParams p =
      update_params(key, slot_mapping, block_size, key_sum, key_min, key_max);
  const c10::cuda::CUDAGuard guard(key.device());
  const cudaError_t err = su::launch_update_summaries(
      p, key_dtype_code(key), slot_bytes(slot_mapping), is_int8(key_sum),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "prhs update_page_summaries: launch failed: ",
              cudaGetErrorString(err));
}

void write_cache_and_summaries(const at::Tensor& key, const at::Tensor& value,
                               at::Tensor& key_cache, at::Tensor& value_cache,
                               const at::Tensor& slot_mapping, at::Tensor& key_sum,
                               at::Tensor& key_min, at::Tensor& key_max) {
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [P, H, block_size, D], got ",
              key_cache.dim(), " dims");
  const int64_t block_size = key_cache.size(2);
  su::CacheWriteParams c{};
  c.summaries = update_params(key, slot_mapping, block_size, key_sum, key_min, key_max);
  TORCH_CHECK(value.sizes() == key.sizes() && value.stride(2) == 1,
              "value must match key's shape, contiguous in its last dim");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes() &&
                  value_cache.strides() == key_cache.strides(),
              "key_cache and value_cache must share shape and strides");
  TORCH_CHECK(key_cache.size(1) == key.size(1) && key_cache.size(3) == key.size(2) &&
                  key_cache.stride(3) == 1,
              "key_cache must be [P, ", key.size(1), ", block_size, ", key.size(2),
              "], contiguous in its last dim");
  TORCH_CHECK(key_cache.size(0) == key_sum.size(0), "key_cache has ", key_cache.size(0),
              " pages, the summaries ", key_sum.size(0));
  const at::Tensor* const rows_and_caches[] = {&value, &key_cache, &value_cache};
  for (const at::Tensor* t : rows_and_caches) {
    TORCH_CHECK(t->scalar_type() == key.scalar_type() && t->device() == key.device(),
                "key, value, key_cache and value_cache must share dtype and device");
  }
  c.value = value.data_ptr();
  c.value_stride_t = value.stride(0);
  c.value_stride_h = value.stride(1);
  c.key_cache = key_cache.data_ptr();
  c.value_cache = value_cache.data_ptr();
  c.cache_stride_page = key_cache.stride(0);
  c.cache_stride_head = key_cache.stride(1);
  c.cache_stride_token = key_cache.stride(2);
  const c10::cuda::CUDAGuard guard(key.device());
  const cudaError_t err = su::launch_write_cache_and_summaries(
      c, key_dtype_code(key), slot_bytes(slot_mapping), is_int8(key_sum),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "prhs write_cache_and_summaries: launch failed: ",
              cudaGetErrorString(err));
}
