"""Unit tests for prhs_vllm.eval.passkey with fake tokenizers (no model needed)."""

from __future__ import annotations

import re

import pytest

from prhs_vllm.eval.passkey import (
    INTRO,
    QUESTION,
    make_passkey_prompt,
    needle_line,
    passkey_found,
    random_passkey,
)

ENDING = "What is the pass key? The pass key is"


class WordTokenizer:
    """One token per whitespace-separated word."""

    def encode(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]


class CharTokenizer:
    """One token per character (much finer than a real tokenizer)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class SubwordTokenizer:
    """Roughly BPE-like: words and punctuation split, long words in 4-char pieces."""

    def encode(self, text: str) -> list[int]:
        toks: list[int] = []
        for piece in re.findall(r"\w+|[^\w\s]|\n", text):
            toks.extend(range(0, len(piece), 4))
        return toks


TOKENIZERS = [WordTokenizer(), CharTokenizer(), SubwordTokenizer()]


def _filler_depth(prompt: str, passkey: str) -> float:
    """Fraction of filler characters that come before the needle line."""
    needle = needle_line(passkey)
    assert prompt.startswith(INTRO + "\n")
    body = prompt[len(INTRO) + 1 : -len(QUESTION)]
    before, after = body.split(needle)
    nb, na = len(before.strip()), len(after.strip())
    return nb / (nb + na)


@pytest.mark.parametrize("tok", TOKENIZERS, ids=lambda t: type(t).__name__)
@pytest.mark.parametrize("target", [300, 1000, 3400, 8000])
def test_length_within_tolerance(tok, target):
    prompt = make_passkey_prompt(tok, target, "12345", depth=0.5, seed=1)
    n = len(tok.encode(prompt))
    assert abs(n - target) <= max(0.02 * target, 1), (n, target)


def test_length_close_for_char_tokenizer():
    # With one token per character the only slack is one filler sentence.
    tok = CharTokenizer()
    for target in (500, 777, 2048):
        n = len(tok.encode(make_passkey_prompt(tok, target, "54321", seed=3)))
        assert abs(n - target) <= 12, (n, target)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_once_at_depth_with_key_twice(depth):
    tok = WordTokenizer()
    pk = "48213"
    prompt = make_passkey_prompt(tok, 2000, pk, depth=depth, seed=7)
    needle = f"The pass key is {pk}. Remember it. {pk} is the pass key."
    assert prompt.count(needle) == 1
    assert prompt.count(pk) == 2
    lines = prompt.split("\n")
    assert needle in lines  # the needle is a line of its own
    assert _filler_depth(prompt, pk) == pytest.approx(depth, abs=0.02)


def test_structure_and_ending():
    tok = SubwordTokenizer()
    prompt = make_passkey_prompt(tok, 1500, "99999", depth=0.3, seed=2)
    assert prompt.endswith(ENDING)
    assert not prompt.endswith(" ")
    assert prompt.startswith(
        "There is an important pass key hidden inside a lot of irrelevant text. "
        "Find it and memorize it."
    )
    assert "The grass is green. The sky is blue. The sun is yellow." in prompt
    assert "<|im_start|>" not in prompt  # a completion prompt, not a chat template
    # No digits anywhere except the two copies of the key.
    assert re.findall(r"\d+", prompt) == ["99999", "99999"]


def test_deterministic_per_seed():
    tok = WordTokenizer()
    a = make_passkey_prompt(tok, 3000, "11111", depth=0.4, seed=5)
    b = make_passkey_prompt(tok, 3000, "11111", depth=0.4, seed=5)
    assert a == b
    others = {make_passkey_prompt(tok, 3000, "11111", depth=0.4, seed=s) for s in range(6)}
    assert len(others) > 1  # the seed picks the filler variants


def test_passkey_only_changes_needle():
    tok = CharTokenizer()
    a = make_passkey_prompt(tok, 1200, "11111", seed=4)
    b = make_passkey_prompt(tok, 1200, "22222", seed=4)
    assert a.replace("11111", "22222") == b


def test_rejects_bad_arguments():
    tok = WordTokenizer()
    with pytest.raises(ValueError):
        make_passkey_prompt(tok, 1000, "12345", depth=1.5)
    with pytest.raises(ValueError):
        make_passkey_prompt(tok, 1000, "")
    with pytest.raises(ValueError):
        make_passkey_prompt(tok, 5, "12345")  # shorter than intro + needle + question


def test_random_passkey():
    keys = [random_passkey(s) for s in range(50)]
    assert all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys)
    assert keys == [random_passkey(s) for s in range(50)]
    assert len(set(keys)) > 40


def test_passkey_found():
    assert passkey_found(" 60494.\n", "60494")
    assert passkey_found("60494", "60494")
    assert not passkey_found(" 60495.", "60494")
    assert not passkey_found(" 1 60494", "60494")  # first number counts
    assert not passkey_found(" 604941", "60494")
    assert not passkey_found(" no idea", "60494")
