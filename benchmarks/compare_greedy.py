"""Compare greedy token ids of two benchmarks/greedy_tokens.py runs.

  python benchmarks/compare_greedy.py DENSE.json PRHS.json
Prints, per prompt, whether the tokens match and the index of the first
difference, whether each pass key was found, and the prhs counters.
"""

import json
import sys


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    dense, other = (json.load(open(path)) for path in sys.argv[1:3])
    rows = []
    for i, (a, b) in enumerate(zip(dense["tokens"], other["tokens"], strict=False)):
        key = dense["passkeys"][i]
        found = (
            ""
            if key is None
            else f" passkey dense={key in dense['texts'][i]} "
            + (f"{other['backend']}={key in other['texts'][i]}")
        )
        diff = first_difference(a, b)
        rows.append(diff is None)
        print(f"prompt {i}: {'match' if diff is None else f'differs at token {diff}'}{found}")
    print(f"{sum(rows)}/{len(rows)} prompts identical; prhs totals: {other.get('prhs_totals')}")


if __name__ == "__main__":
    main()
