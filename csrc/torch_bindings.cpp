// Registers the prhs ops (torch.ops.prhs.*) and makes prhs_vllm._C importable.
#include <Python.h>
#include <torch/library.h>

#include "sparse_decode/sparse_decode_launcher.h"
#include "scoring/page_logits_launcher.h"
#include "summaries/update_summaries_launcher.h"

TORCH_LIBRARY(prhs, m) {
  m.def(
      "sparse_paged_decode(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor kept_slots, Tensor num_kept, float scale, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!) workspace, int num_splits=0, int stages=0) "
      "-> ()");
  m.def(
      "sparse_paged_decode_workspace_size(int max_num_rows, int num_q_heads, int num_kv_heads, "
      "int head_dim, int block_size, int max_kept, ScalarType dtype, int device_index) -> int",
      &sparse_paged_decode_workspace_size);
  m.def(
      "sparse_paged_decode_plan(int num_rows, int num_q_heads, int num_kv_heads, int head_dim, "
      "int block_size, int max_kept, ScalarType dtype, int device_index, int num_splits=0, "
      "int stages=0) -> int[]",
      &sparse_paged_decode_plan);
  m.def(
      "update_page_summaries(Tensor key, Tensor slot_mapping, int block_size, "
      "Tensor(a!) key_sum, Tensor(b!) key_min, Tensor(c!) key_max) -> ()");
  m.def(
      "write_cache_and_summaries(Tensor key, Tensor value, Tensor! key_cache, "
      "Tensor! value_cache, Tensor slot_mapping, Tensor(a!) key_sum, Tensor(b!) key_min, "
      "Tensor(c!) key_max) -> ()");
  m.def(
      "page_logits(Tensor query, Tensor sums, Tensor key_min, Tensor key_max, "
      "Tensor block_table, Tensor seq_lens, Tensor? skip, int block_size, float scale, "
      "int code_bits, int iters, Tensor(a!) est, Tensor(b!) upper, Tensor(c!) lower) -> ()");
}

TORCH_LIBRARY_IMPL(prhs, CUDA, m) {
  m.impl("sparse_paged_decode", &sparse_paged_decode);
  m.impl("update_page_summaries", &update_page_summaries);
  m.impl("write_cache_and_summaries", &write_cache_and_summaries);
  m.impl("page_logits", &page_logits);
}

// The ops register when the library loads; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
