// CI check: the host dispatch without torch, which instantiates every sparse
// decode kernel (bf16/fp16 x head_dim 64/128/256 x GMAX 1/2/4/8 x both ring
// depths), page-summary update, fused cache write and page scoring kernel, so
// the kernels compile on machines with nvcc but no CUDA torch. Never run.
#include "../sparse_decode/sparse_decode_dispatch.cuh"
#include "../scoring/page_logits_kernel.cuh"
#include "../summaries/update_summaries_kernel.cuh"

namespace sd = prhs::sparse_decode;

// The host path (plan, dispatch, launches) of every variant.
cudaError_t prhs_compile_check(sd::Params p, void* workspace, cudaStream_t stream) {
  sd::Plan plan;
  cudaError_t err = sd::make_plan(p, 0, &plan);
  if (err != cudaSuccess) return err;
  size_t bytes = 0;
  err = sd::max_workspace_bytes(p, 256, 0, &bytes);
  if (err != cudaSuccess) return err;
  return sd::run(p, plan, workspace, stream);
}

// Every summary update and fused cache write instance (key fp32 / fp16 / bf16
// x slot int64 / int32 x float32 sums / int8 centroids).
cudaError_t prhs_compile_check_summaries(prhs::summaries::CacheWriteParams c, cudaStream_t stream) {
  for (int key_dtype = 0; key_dtype < 3; ++key_dtype) {
    for (int slot_bytes : {4, 8}) {
      for (bool int8 : {false, true}) {
        cudaError_t err = prhs::summaries::launch_update_summaries(c.summaries, key_dtype,
                                                                   slot_bytes, int8, stream);
        if (err != cudaSuccess) return err;
        err = prhs::summaries::launch_write_cache_and_summaries(c, key_dtype, slot_bytes, int8,
                                                                stream);
        if (err != cudaSuccess) return err;
      }
    }
  }
  return cudaSuccess;
}

// Every page scoring instance (float32 sums / int8 codes x head_dim 64 / 128 /
// 256 x GMAX 1 / 2 / 4 / 8).
cudaError_t prhs_compile_check_scoring(prhs::scoring::ScoreParams p, cudaStream_t stream) {
  for (int code_bits : {0, 8}) {
    for (int head_dim : {64, 128, 256}) {
      for (int group : {1, 2, 4, 8}) {
        p.group = group;
        const cudaError_t err =
            prhs::scoring::launch_page_logits(p, 1, head_dim, code_bits, stream);
        if (err != cudaSuccess) return err;
      }
    }
  }
  return cudaSuccess;
}
