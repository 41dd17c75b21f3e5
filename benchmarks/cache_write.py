"""Cost of one layer's KV cache write (``do_kv_cache_update``) on the GPU:
vLLM's FlashAttention impl against prhs's, with the page-summary update fused
into the write (csrc ``write_cache_and_summaries``) and unfused (vLLM's write,
then the bound summary update).

In a step that runs dense (every row below ``min_context``) this write is the
only work prhs adds to a layer, once per layer and step, so its host time is
what the dense fallback costs. Per call: the host time of a loop of eager
calls and the GPU time of the calls replayed from a CUDA graph.

Example (H100, LLaMA-3-8B attention: 8 KV heads, head_dim 128, 16-token pages):
  python benchmarks/cache_write.py --tokens 12 8192 --out benchmarks/results/cache_write.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_decode import LLAMA3_8B, dummy_model_dir  # noqa: E402

NUM_HEADS = LLAMA3_8B["num_attention_heads"]
NUM_KV_HEADS = LLAMA3_8B["num_key_value_heads"]
HEAD_DIM = LLAMA3_8B["head_dim"]
BLOCK_SIZE = 16


def vllm_config():
    """A VllmConfig of the LLaMA-3-8B shape ``e2e_decode.py`` serves (config.json only)."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig

    model = ModelConfig(
        model=dummy_model_dir(LLAMA3_8B),
        dtype=torch.bfloat16,
        max_model_len=32768,
        skip_tokenizer_init=True,
    )
    return VllmConfig(model_config=model, cache_config=CacheConfig(block_size=BLOCK_SIZE))


def impls(config) -> dict:
    """{name: impl}: vLLM's FlashAttention impl and prhs's, fused and unfused."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from prhs_vllm.backend.cuda import PrhsFlashAttentionImpl

    args = (NUM_HEADS, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS, None, None, "auto")
    config.additional_config = {"prhs": {"dense_layers": []}}
    with set_current_vllm_config(config):
        out = {"vllm": FlashAttentionImpl(*args), "prhs fused": PrhsFlashAttentionImpl(*args)}
        unfused = PrhsFlashAttentionImpl(*args)
    unfused.fused_cache_write = False
    out["prhs unfused"] = unfused
    return out


def write_inputs(num_tokens: int, num_pages: int, device: str = "cuda"):
    """(layer, key, value, kv_cache, slot_mapping) of one layer's write: a decode
    step's rows (one token per request, each on its own page) up to 512 tokens,
    one prefill beyond; key and value are views of a qkv row, as models hand them."""
    layer = types.SimpleNamespace(
        layer_name="model.layers.3.self_attn.attn",
        _k_scale=torch.ones((), device=device),
        _v_scale=torch.ones((), device=device),
    )
    # NHD memory order (vLLM's default), seen as the logical [P, H, bs, 2D].
    kv_cache = torch.zeros(
        num_pages, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM, dtype=torch.bfloat16, device=device
    ).permute(0, 2, 1, 3)
    qkv = torch.randn(num_tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device=device)
    kv = qkv.to(torch.bfloat16)[:, NUM_HEADS * HEAD_DIM :].view(-1, 2 * NUM_KV_HEADS, HEAD_DIM)
    if num_tokens <= 512:
        slots = (torch.randperm(num_pages - 1, device=device)[:num_tokens] + 1) * BLOCK_SIZE + 5
    else:
        pages = torch.randperm(num_pages - 1, device=device)[: -(-num_tokens // BLOCK_SIZE)] + 1
        pos = torch.arange(num_tokens, device=device)
        slots = pages[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    return layer, kv[:, :NUM_KV_HEADS], kv[:, NUM_KV_HEADS:], kv_cache, slots


def time_writes(impl, num_tokens: int, num_pages: int, calls: int) -> dict:
    """Microseconds per ``do_kv_cache_update`` call: host (a loop of eager calls,
    which the GPU keeps up with at decode sizes) and GPU (the calls replayed
    from a CUDA graph, so no host time is in it)."""
    inputs = write_inputs(num_tokens, num_pages)
    for _ in range(10):
        impl.do_kv_cache_update(*inputs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        impl.do_kv_cache_update(*inputs)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    per_graph = 50
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            impl.do_kv_cache_update(*inputs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    replays = max(1, calls // per_graph)
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return {
        "host_us": round(1e6 * host / calls, 2),
        "gpu_us": round(1e3 * start.elapsed_time(end) / (replays * per_graph), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[12, 8192])
    parser.add_argument("--calls", type=int, default=3200, help="calls timed per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops (medians kept)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    num_pages = 4096
    rows = []
    for name, impl in impls(vllm_config()).items():
        for tokens in args.tokens:
            runs = [time_writes(impl, tokens, num_pages, args.calls) for _ in range(args.repeats)]
            row = {
                "impl": name,
                "tokens": tokens,
                "host_us": sorted(r["host_us"] for r in runs)[len(runs) // 2],
                "gpu_us": sorted(r["gpu_us"] for r in runs)[len(runs) // 2],
                "host_us_runs": [r["host_us"] for r in runs],
                "gpu": torch.cuda.get_device_name(),
                "shape": f"Hkv={NUM_KV_HEADS} D={HEAD_DIM} bs={BLOCK_SIZE} bf16, NHD cache",
                "command": "python benchmarks/cache_write.py "
                f"--tokens {' '.join(map(str, args.tokens))} --calls {args.calls}",
            }
            rows.append(row)
            host, gpu = row["host_us"], row["gpu_us"]
            print(f"{name:14} T={tokens:6d}  host {host:8.2f} us  gpu {gpu:8.2f} us")
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
