"""Greedy token ids of vLLM (offline `LLM`) for a set of prompts, with the dense
backend or with prhs. One engine per process; compare two runs' JSON files.

  python benchmarks/greedy_tokens.py --model DIR --backend prhs \
      --config configs/full-budget.yaml --passkey 4000 --out /tmp/prhs.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHORT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF folder or llama3-8b-dummy")
    parser.add_argument("--backend", choices=["dense", "prhs"], required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--passkey", type=int, default=0, help="also N-token passkey prompts")
    parser.add_argument("--num-passkeys", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

    import torch
    from e2e_decode import LLAMA3_8B, dummy_model_dir
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    dummy = args.model == "llama3-8b-dummy"
    kwargs = dict(
        model=dummy_model_dir(LLAMA3_8B) if dummy else args.model,
        max_model_len=8192,
        enforce_eager=args.enforce_eager,
        dtype="bfloat16",
        gpu_memory_utilization=0.85,
    )
    if args.block_size:
        kwargs["block_size"] = args.block_size
    if dummy:
        kwargs.update(load_format="dummy", skip_tokenizer_init=True)
    if args.backend == "prhs":
        kwargs["attention_backend"] = "prhs"
        if args.config:
            kwargs["additional_config"] = {"prhs": {"config": args.config}}
    llm = LLM(**kwargs)

    keys: list[str | None] = []
    if dummy:
        gen = torch.Generator().manual_seed(0)
        prompts = [
            TokensPrompt(prompt_token_ids=torch.randint(100, 30000, (n,), generator=gen).tolist())
            for n in (7, 300, 3000, 6000)
        ]
        keys = [None] * len(prompts)
    else:
        from prhs_vllm.eval.passkey import passkey_cases

        prompts = list(SHORT_PROMPTS)
        keys = [None] * len(prompts)
        if args.passkey:
            for key, prompt in passkey_cases(llm.get_tokenizer(), args.passkey, args.num_passkeys):
                prompts.append(prompt)
                keys.append(key)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "backend": args.backend,
        "config": args.config,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "passkeys": keys,
    }
    try:
        from prhs_vllm.metrics import read_totals

        result["prhs_totals"] = read_totals()
    except ImportError:
        pass
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps({k: result[k] for k in ("backend", "texts", "passkeys")}))


if __name__ == "__main__":
    main()
