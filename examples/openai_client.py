"""Talk to a running prhs server with the OpenAI client: one completion, one chat.

Start the server first (``bash examples/serve_smollm2_cpu.sh`` serves SmolLM2 as
``smollm2`` on http://127.0.0.1:8000/v1), then::

    python examples/openai_client.py [--base-url URL] [--model NAME]

The base URL comes from ``--base-url``, else ``$OPENAI_BASE_URL``, else
http://127.0.0.1:8000/v1; the model is the server's served name
(``--served-model-name``; ``GET /v1/models`` lists it). Needs ``pip install openai``
(the ``test`` extra has it).
"""

from __future__ import annotations

import argparse
import os

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
        help=f"the server's OpenAI API root (default: $OPENAI_BASE_URL or {DEFAULT_BASE_URL})",
    )
    parser.add_argument("--model", default="smollm2", help="served model name (%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from openai import OpenAI

    # vLLM checks no key unless started with --api-key; the client needs one.
    client = OpenAI(
        base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"), timeout=600
    )
    print("models:", ", ".join(m.id for m in client.models.list()))

    prompt = "The capital of France is"
    completion = client.completions.create(
        model=args.model, prompt=prompt, max_tokens=args.max_tokens, temperature=0.0
    )
    print(f"completion: {prompt!r} -> {completion.choices[0].text!r}")

    question = "Name three primary colors."
    chat = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": question}],
        max_tokens=args.max_tokens,
        temperature=0.0,
    )
    print(f"chat: {question!r} -> {chat.choices[0].message.content!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
