"""End-to-end decode throughput of vLLM with the dense backend and with prhs.

One engine per process: `--backend dense|prhs` runs one configuration and
appends a JSON line to `--out`. Decode tokens/s is measured as
batch * output_len / (t(prefill + output_len tokens) - t(prefill + 1 token))
(the median over `--repeats` such pairs), with prefix caching off so both
runs prefill the same work, after a warm-up run of the same length (graphs
captured on first use stay out of the timing).
With `--cached-prefix` both timed runs find their prompts in vLLM's prefix
cache (filled by the warm-up), so the difference is not taken between two
~15 s prefills: the decode time is measured more tightly.

Example (H100, LLaMA-3-8B shape with dummy weights, batch 12 x 32K):
  python benchmarks/e2e_decode.py --model llama3-8b-dummy --backend prhs \
      --batch 12 --context 32768 --output-len 64 --out benchmarks/results/e2e.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def dummy_model_dir(config: dict) -> str:
    """A folder holding only config.json, for load_format='dummy'."""
    path = Path(tempfile.mkdtemp(prefix="prhs-dummy-"))
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def kv_capacity(llm, args) -> dict:
    """KV pool size and preemptions: a batch that does not fit is preempted and
    recomputed, which costs more than any attention kernel saves."""
    info = {}
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        info["kv_cache_tokens"] = int(cache.num_gpu_blocks) * int(cache.block_size)
        info["kv_tokens_needed"] = args.batch * (args.context + args.output_len + 1)
    except Exception as exc:  # engine layout differs across versions: record, go on
        info["kv_cache_error"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        for metric in llm.get_metrics():
            if metric.name == "vllm:num_preemptions":
                info["preemptions"] = int(metric.value)
    except Exception as exc:
        info["preemptions_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return info


def gpu_busy_line(prof) -> str:
    """How much of the profiled span the GPU was running kernels: a run whose
    GPU is idle most of the time is bound by host work (launches, Python)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )
    if not spans:
        return "gpu busy: no GPU events"
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = spans[-1][1] - spans[0][0]
    return (
        f"gpu busy: {busy / 1e3:.1f} ms of a {span / 1e3:.1f} ms span "
        f"({100 * busy / span:.0f}%; first to last GPU event)"
    )


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with a YAML value (``budget=0.0625``, ``centroid_dtype=int8``)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes key=value, got {text!r}")
    return key, yaml.safe_load(value)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b-dummy", help="HF folder or llama3-8b-dummy")
    parser.add_argument("--backend", choices=["dense", "prhs"], required=True)
    parser.add_argument("--config", default=None, help="prhs YAML config (default: built-in)")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="vLLM's max_num_seqs (default: --batch). vLLM captures full decode graphs "
        "only for sizes up to it, so at --batch 12 the steps run piecewise unless it is 16",
    )
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--out", default=None, help="append a JSON line here")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed (prefill, prefill + decode) pairs; the median decode time is reported",
    )
    parser.add_argument(
        "--set",
        type=parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="prhs config field over --config's (repeatable), e.g. --set budget=0.0625",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)",
    )
    parser.add_argument(
        "--cached-prefix",
        action="store_true",
        help="prefix caching on: the timed runs re-use the warm-up's prompts (decode only)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="write a torch-profiler table of the decode run here (runs the engine in-process)",
    )
    args = parser.parse_args()
    if args.backend == "dense" and (args.config or args.set):
        parser.error("--config and --set configure prhs; they do nothing with --backend dense")
    if args.max_num_seqs is not None and args.max_num_seqs < args.batch:
        parser.error(f"--max-num-seqs {args.max_num_seqs} is below --batch {args.batch}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if args.profile or args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    dummy = args.model == "llama3-8b-dummy"
    model = dummy_model_dir(LLAMA3_8B) if dummy else args.model
    kwargs = dict(
        model=model,
        max_model_len=args.context + args.output_len + 8,
        max_num_seqs=args.max_num_seqs or args.batch,
        # Profiling re-uses the prompts' cached prefixes so the profile holds decode only.
        enable_prefix_caching=bool(args.profile or args.cached_prefix),
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        dtype="bfloat16",
        disable_log_stats=False,  # llm.get_metrics() (preemptions) needs the stat loggers
    )
    if dummy:
        kwargs.update(load_format="dummy", skip_tokenizer_init=True)
    if args.backend == "prhs":
        kwargs["attention_backend"] = "prhs"
        section = dict(args.set)
        if args.config:
            section["config"] = args.config
        if section:
            kwargs["additional_config"] = {"prhs": section}
    llm = LLM(**kwargs)
    # Device-wide, so it holds in either engine mode: weights, KV pool and the
    # CUDA graphs vLLM captured at start-up (compare runs of one machine).
    free, total = torch.cuda.mem_get_info()
    device_used_gib = round((total - free) / 2**30, 3)

    generator = torch.Generator().manual_seed(0)
    prompts = [
        TokensPrompt(
            prompt_token_ids=torch.randint(
                100, 30000, (args.context,), generator=generator
            ).tolist()
        )
        for _ in range(args.batch)
    ]

    cpu_times = []  # CPU seconds of this thread per timed() call

    def timed(max_tokens: int) -> tuple[float, list]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start, cpu = time.perf_counter(), time.thread_time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        cpu_times.append(time.thread_time() - cpu)
        return time.perf_counter() - start, outputs

    # Warm-up with decode steps: prhs captures its sparse step's CUDA graphs on
    # first use of each (rows, context) bucket (vLLM's own graphs are captured
    # at start-up); that one-off cost is reported as warmup_s, not timed below.
    t_warmup, _ = timed(1 + args.output_len)
    decode_runs, prefill_runs, decode_cpu = [], [], []
    for _ in range(args.repeats):
        t_prefill, _ = timed(1)
        t_full, outputs = timed(1 + args.output_len)
        prefill_runs.append(t_prefill)
        decode_runs.append(t_full - t_prefill)
        decode_cpu.append(cpu_times[-1] - cpu_times[-2])
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        # Prefixes are cached by now: this run is (almost) all decode steps.
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t_profiled, _ = timed(1 + args.output_len)
        table = gpu_busy_line(prof) + "\n"
        table += prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        table += "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        Path(args.profile).write_text(f"profiled run: {t_profiled:.3f} s\n" + table)
    decode_s = statistics.median(decode_runs)
    result = {
        "backend": args.backend,
        "model": args.model,
        "config": args.config,
        "overrides": dict(args.set),
        "in_process": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0",
        "batch": args.batch,
        "max_num_seqs": args.max_num_seqs or args.batch,
        "context": args.context,
        "output_len": args.output_len,
        "cached_prefix": bool(args.cached_prefix or args.profile),
        "warmup_s": round(t_warmup, 3),
        "prefill_s": round(statistics.median(prefill_runs), 3),
        "decode_s": round(decode_s, 3),
        "decode_tok_per_s": round(args.batch * args.output_len / decode_s, 1),
        "decode_tok_per_s_runs": [round(args.batch * args.output_len / d, 1) for d in decode_runs],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "first_tokens": [list(o.outputs[0].token_ids[:16]) for o in outputs],
    }
    if result["in_process"]:
        # The engine steps in this thread: its CPU time per decode step is the
        # host work of a step, which wall-clock noise between runs does not inflate.
        per_step = [1e3 * c / args.output_len for c in decode_cpu]
        result["host_cpu_ms_per_step"] = round(statistics.median(per_step), 3)
        result["host_cpu_ms_per_step_runs"] = [round(c, 3) for c in per_step]
    result["gpu_memory_utilization"] = args.gpu_memory_utilization
    result.update(kv_capacity(llm, args))
    result["device_used_gib_after_init"] = device_used_gib
    try:
        from prhs_vllm.metrics import flush_process_stats, read_totals

        if result["in_process"]:
            flush_process_stats()  # the steps since the last interval's flush
        totals = read_totals()
        result["prhs_totals"] = totals
        if totals and totals.get("prhs_sparse_decode_tokens"):
            # Sparse layers each sparse decode token ran through the prhs step:
            # short of the model's sparse layers if a graph replayed a sparse step dense.
            result["sparse_layers_per_token"] = round(
                totals["prhs_sparse_layer_rows"] / totals["prhs_sparse_decode_tokens"], 3
            )
    except ImportError:
        pass
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
