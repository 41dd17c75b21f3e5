"""Retrieval accuracy of `vllm serve` SmolLM2 on the CPU: dense against prhs configs.

For each server (``dense``, vLLM's own attention, unless ``--no-dense``; then one
per ``--configs`` YAML, served with ``--attention-backend prhs``), starts
``vllm serve`` on a free loopback port (``tests/e2e_server.vllm_server``), sends
every case of the retrieval suite (``prhs_vllm.eval.retrieval``; default
``DEFAULT_SUITE``: 54 cases of 2100-7800 tokens) through ``/v1/completions``
(greedy, ``--max-tokens`` 12, up to ``--max-num-seqs`` at once), grades each
completion (correct / distractor / miss), and scrapes every ``prhs_*`` sample
of ``/metrics`` before and after. Writes ``OUT/retrieval.json`` (per case and
server: completion and grade; metrics; command; machine), ``OUT/retrieval.md``
(counts per server by length and by kind; the cases where a prhs server's
grade differs from dense) and each server's log ``OUT/server-NAME.log``.

    python benchmarks/retrieval_serve.py --configs configs/default.yaml \
        --out benchmarks/results/cpu-retrieval

Smoke run (dense only, two cases, a few minutes on 2 cores):

    python benchmarks/retrieval_serve.py --lengths 2100 --limit 2 --out /tmp/retrieval
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for `tests.e2e_server` when run as a script

from prhs_vllm.eval.retrieval import (  # noqa: E402
    DEFAULT_SUITE,
    GRADES,
    KINDS,
    RetrievalCase,
    grade,
    retrieval_cases,
)
from tests.e2e_server import scrape_metrics, vllm_server  # noqa: E402

#: The CPU server arguments of tests/test_e2e_serve.py (max-model-len and
#: max-num-seqs come from the options).
SERVER_ARGS = ["--dtype", "bfloat16", "--block-size", "32", "--enforce-eager"]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "PRHS_STATS_FLUSH_S": "0"}


def server_specs(configs: list[str], dense: bool) -> list[dict]:
    """[{name, config (absolute path or None), args}] in serving order, dense first."""
    specs = []
    if dense:
        specs.append({"name": "dense", "config": None, "args": []})
    names = {"dense"}
    for cfg in configs:
        path = Path(cfg).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"error: no such config file: {cfg}")
        name, i = path.stem, 2
        while name in names:
            name, i = f"{path.stem}-{i}", i + 1
        names.add(name)
        extra = {"prhs": {"config": str(path)}}
        args = ["--attention-backend", "prhs", "--additional-config", json.dumps(extra)]
        specs.append({"name": name, "config": str(path), "args": args})
    return specs


def run_cases(
    base: str,
    model: str,
    cases: list[RetrievalCase],
    max_tokens: int,
    workers: int,
    name: str,
) -> list[dict]:
    """Send every case to the server at ``base``; return per case
    {completion, grade, seconds} (grade "error" and the message on a failed request)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=1800, max_retries=0)
    t_start = time.perf_counter()

    def one(i: int) -> dict:
        t0 = time.perf_counter()
        try:
            result = client.completions.create(
                model=model,
                prompt=cases[i].prompt,
                max_tokens=max_tokens,
                temperature=0.0,
            )
            text = result.choices[0].text
            return {
                "completion": text,
                "grade": grade(cases[i], text),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        except Exception as e:  # noqa: BLE001 - one failed request must not end the run
            return {"completion": None, "grade": "error", "error": repr(e)}

    results: list[dict | None] = [None] * len(cases)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, i): i for i in range(len(cases))}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = r = fut.result()
            done += 1
            c = cases[i]
            print(
                f"[{name}] {done}/{len(cases)} #{i} {c.kind} {c.target_tokens} tok "
                f"depth {c.depth}: {r['grade']} (answer {c.answer}, got "
                f"{r.get('completion', r.get('error'))!r}) "
                f"{time.perf_counter() - t_start:.0f}s",
                flush=True,
            )
    return results  # type: ignore[return-value]


def counts(grades: list[str]) -> str:
    """``correct/distractor/miss`` (and ``+N err`` when requests failed)."""
    c = Counter(grades)
    cell = "/".join(str(c[g]) for g in GRADES)
    return cell + (f" +{c['error']} err" if c["error"] else "")


def markdown(report: dict) -> str:
    """The report's tables: per server, counts by length and by kind; differences
    of each prhs server from dense."""
    cases = report["cases"]
    servers = [s["name"] for s in report["servers"]]
    lengths = sorted({c["target_tokens"] for c in cases})
    kinds = [k for k in KINDS if any(c["kind"] == k for c in cases)]
    suite = report["suite"]
    lines = [
        f"# Retrieval: dense vs prhs ({Path(str(report.get('model', '?'))).name}, CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs  ",
        f"Suite: {len(cases)} cases, lengths {suite['lengths']}, depths {suite['depths']}, "
        f"kinds {suite['kinds']}, seed {suite['seed']}, haystack {suite['haystack']}"
        + (f", first {suite['limit']}" if suite["limit"] else "")
        + f"; greedy, max_tokens {suite['max_tokens']}.",
        "",
        "Cells: correct / distractor / miss.",
        "",
    ]

    def grades_of(name: str, pick) -> list[str]:
        return [c["results"][name]["grade"] for c in cases if name in c["results"] and pick(c)]

    for title, keys, field in (
        ("length (tokens)", lengths, "target_tokens"),
        ("kind", kinds, "kind"),
    ):
        lines.append(f"| server \\ {title} | " + " | ".join(map(str, keys)) + " | all |")
        lines.append("|---" * (len(keys) + 2) + "|")
        for name in servers:
            row = [counts(grades_of(name, lambda c, k=k, f=field: c[f] == k)) for k in keys]
            row.append(counts(grades_of(name, lambda c: True)))
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")

    if "dense" in servers:
        for name in servers:
            if name == "dense":
                continue
            diffs, lost = [], 0
            for c in cases:
                r, d = c["results"].get(name), c["results"].get("dense")
                if r is None or d is None or r["grade"] == d["grade"]:
                    continue
                lost += d["grade"] == "correct"
                diffs.append(
                    f"#{c['index']} {c['kind']} {c['target_tokens']}@{c['depth']} "
                    f"(answer {c['answer']}): dense {d['grade']} {d['completion']!r}, "
                    f"{name} {r['grade']} {r['completion']!r}"
                )
            lines.append(
                f"**{name} vs dense**: {len(diffs)} cases differ in grade, {lost} needles "
                f"that dense found are lost" + (": " + "; ".join(diffs) if diffs else ".")
            )
            lines.append("")
    for s in report["servers"]:
        if s.get("error"):
            lines.append(f"Server {s['name']} failed: {s['error']}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="*", default=[], help="prhs YAML configs, one server each"
    )
    parser.add_argument("--no-dense", action="store_true", help="skip the dense server")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_SUITE.lengths))
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_SUITE.depths))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(DEFAULT_SUITE.kinds))
    parser.add_argument("--seed", type=int, default=DEFAULT_SUITE.seed)
    parser.add_argument("--haystack", choices=("filler", "essays"), default=DEFAULT_SUITE.haystack)
    parser.add_argument(
        "--limit", type=int, default=0, help="only the first N cases (lengths outermost)"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="SmolLM2 folder (default: $PRHS_SMOLLM2_DIR or "
        "~/.cache/prhs-vllm/smollm2-135m-instruct, converted if missing)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from prhs_vllm.models import prepare_smollm2

    specs = server_specs(args.configs, not args.no_dense)
    if not specs:
        parser.error("nothing to serve: --no-dense and no --configs")
    model_dir = args.model_dir or os.environ.get("PRHS_SMOLLM2_DIR")
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        model = str(Path(model_dir).resolve())
    else:
        model = str(prepare_smollm2(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model)
    t0 = time.perf_counter()
    cases = retrieval_cases(
        tokenizer, args.lengths, args.depths, args.kinds, args.seed, args.haystack
    )
    if args.limit:
        cases = cases[: args.limit]
    print(f"{len(cases)} cases built in {time.perf_counter() - t0:.1f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": shlex.join(["python", "benchmarks/retrieval_serve.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "model": model,
        "server_args": SERVER_ARGS
        + ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs)],
        "server_env": SERVER_ENV,
        "suite": {
            "lengths": args.lengths,
            "depths": args.depths,
            "kinds": args.kinds,
            "seed": args.seed,
            "haystack": args.haystack,
            "limit": args.limit,
            "max_tokens": args.max_tokens,
        },
        "servers": [],
        "cases": [
            {
                "index": i,
                "kind": c.kind,
                "target_tokens": c.target_tokens,
                "num_tokens": c.num_tokens,
                "depth": c.depth,
                "seed": c.seed,
                "answer": c.answer,
                "distractors": list(c.distractors),
                "results": {},
            }
            for i, c in enumerate(cases)
        ],
    }

    def write() -> None:
        (args.out / "retrieval.json").write_text(json.dumps(report) + "\n")
        (args.out / "retrieval.md").write_text(markdown(report))

    for spec in specs:
        name = spec["name"]
        entry = {"name": name, "config": spec["config"], "args": spec["args"], "error": None}
        report["servers"].append(entry)
        log = args.out / f"server-{name}.log"
        entry["log"] = log.name
        print(f"[{name}] starting vllm serve (log: {log})", flush=True)
        t_server = time.perf_counter()
        try:
            with vllm_server(model, report["server_args"] + spec["args"], log, SERVER_ENV) as base:
                entry["startup_seconds"] = round(time.perf_counter() - t_server, 1)
                entry["metrics_before"] = scrape_metrics(base, prefix="prhs_", labelled=True)
                t_run = time.perf_counter()
                results = run_cases(base, model, cases, args.max_tokens, args.max_num_seqs, name)
                entry["run_seconds"] = round(time.perf_counter() - t_run, 1)
                time.sleep(0.5)
                entry["metrics_after"] = scrape_metrics(base, prefix="prhs_", labelled=True)
        except Exception as e:  # noqa: BLE001 - report the failure, go on with the next server
            entry["error"] = f"{type(e).__name__}: {e}"
            print(f"[{name}] failed: {entry['error']}", flush=True)
            write()
            continue
        for c, r in zip(report["cases"], results, strict=True):
            c["results"][name] = r
        tally = Counter(r["grade"] for r in results)
        print(f"[{name}] {dict(tally)} in {entry['run_seconds']}s", flush=True)
        write()

    write()
    print(f"wrote {args.out / 'retrieval.json'} and {args.out / 'retrieval.md'}", flush=True)
    print((args.out / "retrieval.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
