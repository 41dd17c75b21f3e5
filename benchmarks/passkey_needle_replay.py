"""Which estimator keeps the pass-key needle where it matters (SmolLM2, CPU).

Builds the CPU end-to-end test's pass-key prompts (``passkey_cases``, ~4K
tokens), captures each layer's queries and keys at the answer position with
transformers, replays the default selection (budget 1/8, delta 0.05, 32-token
pages as the CPU server uses) with each estimator, and reports the dense
attention mass on the needle's pages that the selection drops, summed over
(layer, KV head), plus the heads that attend to the needle most.

    python benchmarks/passkey_needle_replay.py > benchmarks/results/passkey-needle/replay.txt
"""

from __future__ import annotations

import torch

from prhs_vllm.eval.capture import capture_qk, load_model
from prhs_vllm.eval.passkey import passkey_cases
from prhs_vllm.eval.replay import page_window, replay_layer
from prhs_vllm.ops.ref.selection import SelectionParams

BLOCK = 32
ESTIMATORS = ("centroid", "bound", "hybrid")


def main() -> None:
    torch.set_grad_enabled(False)
    model, tokenizer = load_model("smollm2")
    for case, (key, prompt) in enumerate(passkey_cases(tokenizer, 4000, 3)):
        ids = tokenizer(prompt)["input_ids"]
        needle = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
        starts = [i for i in range(len(ids) - len(needle)) if ids[i : i + len(needle)] == needle]
        pages = sorted({p // BLOCK for p in starts})
        cap = capture_qk(model, ids, 1, "smollm2")
        print(f"case {case}: pass key {key}, {len(ids)} tokens, needle pages {pages}")
        for est in ESTIMATORS:
            lost = total = 0.0
            heads = []
            for li, lay in enumerate(cap.layers[2:], start=2):
                win = page_window(lay.query, lay.key, lay.scale, BLOCK)
                params = SelectionParams(BLOCK, lay.scale, 0.125, 0.05, 64, 256, estimator=est)
                kept = replay_layer(win, params).keep[0][:, pages].all(-1)
                mass = win.true_mass[0][:, :, pages].sum(-1).mean(-1)  # [Hkv], group mean
                lost += float((mass * ~kept).sum())
                total += float(mass.sum())
                heads += [
                    (float(m), li, h, bool(k))
                    for h, (m, k) in enumerate(zip(mass, kept, strict=True))
                ]
            top = sorted(heads, reverse=True)[:5]
            shown = ", ".join(
                f"L{li}H{h} {m:.2f} {'kept' if k else 'DROPPED'}" for m, li, h, k in top
            )
            print(f"  {est:8s} needle mass dropped {lost:.3f} of {total:.3f}; top heads: {shown}")


if __name__ == "__main__":
    main()
