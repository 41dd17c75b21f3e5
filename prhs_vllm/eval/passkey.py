"""Passkey-retrieval prompts (the "needle in a haystack" of Mohtashami & Jaggi).

The prompt is a plain *completion* prompt, not a chat template: small instruct
models such as SmolLM2-135M-Instruct find the key reliably when the prompt ends
with ``"What is the pass key? The pass key is"`` and the model simply continues
it, while the chat template makes them answer something else.

Layout (parts joined by newlines)::

    There is an important pass key hidden inside a lot of irrelevant text. ...
    The grass is green. The sky is blue. ... (filler before the needle)
    The pass key is 12345. Remember it. 12345 is the pass key.
    The grass is green. ... (filler after the needle)
    What is the pass key? The pass key is

The amount of filler is chosen so that the prompt's length, as counted by the
given tokenizer, is as close as possible to ``target_tokens``; the needle sits
after ``round(depth * n)`` of the ``n`` filler sentences.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = [
    "PASSKEY_DEPTHS",
    "passkey_cases",
    "INTRO",
    "QUESTION",
    "needle_line",
    "make_passkey_prompt",
    "closest_count",
    "random_passkey",
    "passkey_found",
]

INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it."
)
QUESTION = "What is the pass key? The pass key is"

#: The classic filler block; most blocks are this one.
CLASSIC_BLOCK: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

#: A few variants, mixed in by the seed so that different seeds give different
#: haystacks. None contains a digit, so the passkey occurs only in the needle.
VARIANT_BLOCKS: tuple[tuple[str, ...], ...] = (
    (
        "The river is wide.",
        "The hill is steep.",
        "The moon is white.",
        "Here we go.",
        "There and back again.",
    ),
    (
        "The grass is green.",
        "The sea is deep.",
        "The snow is cold.",
        "Here we go.",
        "There and back again.",
    ),
    (
        "The road is long.",
        "The sky is blue.",
        "The night is dark.",
        "Here we go.",
        "There and back again.",
    ),
)

#: Probability that a filler block is a variant rather than the classic block.
VARIANT_PROB = 0.2


class _Tokenizer(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...


def needle_line(passkey: str) -> str:
    """The line that hides ``passkey`` (it names the key exactly twice)."""
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def random_passkey(seed: int) -> str:
    """A deterministic 5-digit passkey (``"10000"``..``"99999"``) for ``seed``."""
    return str(random.Random(seed).randint(10000, 99999))


def passkey_found(completion: str, passkey: str) -> bool:
    """True when the first number in ``completion`` is exactly ``passkey``.

    Scoring by the first number (not by substring) keeps a model that rambles
    out a list of numbers from getting credit by luck.
    """
    m = re.search(r"\d+", completion)
    return m is not None and m.group(0) == passkey


def _filler_sentences(seed: int):
    """Endless deterministic stream of filler sentences for ``seed``."""
    rng = random.Random(f"prhs-passkey-filler-{seed}")
    while True:
        if rng.random() < VARIANT_PROB:
            block = VARIANT_BLOCKS[rng.randrange(len(VARIANT_BLOCKS))]
        else:
            block = CLASSIC_BLOCK
        yield from block


def _assemble(sentences: list[str], n: int, depth: float, passkey: str) -> str:
    k = round(depth * n)
    parts = [INTRO]
    before = " ".join(sentences[:k])
    after = " ".join(sentences[k:n])
    if before:
        parts.append(before)
    parts.append(needle_line(passkey))
    if after:
        parts.append(after)
    parts.append(QUESTION)
    return "\n".join(parts)


def make_passkey_prompt(
    tokenizer: _Tokenizer,
    target_tokens: int,
    passkey: str,
    depth: float = 0.5,
    seed: int = 0,
) -> str:
    """Build a passkey-retrieval completion prompt of about ``target_tokens`` tokens.

    Args:
        tokenizer: anything with ``encode(str) -> list[int]`` (e.g. a Hugging
            Face tokenizer); its token count of the whole prompt is what is
            matched to ``target_tokens``.
        target_tokens: wanted prompt length in tokens. The result is the closest
            length reachable in whole filler sentences (a few tokens each), so
            within ~2% for any target of a few hundred tokens or more.
        passkey: the key to hide; must not be empty nor contain a newline.
        depth: relative position of the needle in the filler, 0.0 (right after
            the intro) to 1.0 (right before the question).
        seed: picks the filler variants; the same arguments always give the
            same prompt.

    Returns:
        The prompt, ending exactly with ``"What is the pass key? The pass key is"``
        (no trailing space, so the model's next token is `` 12345``-like).

    Raises:
        ValueError: bad ``depth``/``passkey``, or ``target_tokens`` smaller than
            the prompt with no filler at all.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not passkey or "\n" in passkey:
        raise ValueError(f"passkey must be a non-empty single-line string, got {passkey!r}")

    def length(n: int) -> int:
        ensure(n)
        return len(tokenizer.encode(_assemble(sentences, n, depth, passkey)))

    sentences: list[str] = []
    stream = _filler_sentences(seed)

    def ensure(n: int) -> None:
        while len(sentences) < n:
            sentences.append(next(stream))

    base = length(0)
    if target_tokens < base:
        raise ValueError(
            f"target_tokens={target_tokens} is below the {base} tokens of the prompt "
            "without any filler"
        )
    if base == target_tokens:
        return _assemble(sentences, 0, depth, passkey)
    return _assemble(sentences, closest_count(length, target_tokens), depth, passkey)


def closest_count(length: Callable[[int], int], target_tokens: int) -> int:
    """The n whose ``length(n)`` (tokens of the prompt with n filler units,
    non-decreasing in n) is closest to ``target_tokens``, given
    ``length(0) < target_tokens``: grow an upper bound exponentially, then
    binary-search the smallest n whose length reaches the target; the answer
    is n or n - 1, whichever is closer."""
    hi = 16
    while length(hi) < target_tokens:
        hi *= 2
    lo = 0  # invariant: length(lo) < target_tokens <= length(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) >= target_tokens:
            hi = mid
        else:
            lo = mid
    n = hi
    if n > 0 and abs(length(n - 1) - target_tokens) < abs(length(n) - target_tokens):
        n -= 1
    return n


PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


def passkey_cases(tokenizer, target_tokens: int, count: int = 3) -> list[tuple[str, str]]:
    """`count` (passkey, prompt) pairs, seeds 0..count-1, needles at the depths
    of PASSKEY_DEPTHS in turn (start, middle, end of the filler)."""
    cases = []
    for seed in range(count):
        key = random_passkey(seed)
        depth = PASSKEY_DEPTHS[seed % len(PASSKEY_DEPTHS)]
        cases.append((key, make_passkey_prompt(tokenizer, target_tokens, key, depth, seed)))
    return cases
