"""Benchmark: how much faster is judging with 8 requests in flight than with 1?

A local OpenAI-compatible test server (chatexaonepath.loopback) answers every judge request with a
well-formed verdict after a fixed latency (200 ms by default, like a busy vLLM server), so the
measurement is the judge's own scheduling: concurrency, parsing and the per-verdict append+flush.
Each repeat judges the same answers into a fresh run folder at concurrency 1 and at concurrency 8,
alternating; the table shows the medians. Final line: `judge_concurrency_speedup: X` (target ≥ 6).

    python bench/judge_throughput.py [--answers 64] [--latency 0.2] [--repeats 3] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.backends import BackendOptions, build_backend
from chatexaonepath.eval.criteria import AcceptanceRule, load_criteria
from chatexaonepath.eval.data import JsonlLog
from chatexaonepath.eval.judge import Judge, JudgeConfig, JudgeItem
from chatexaonepath.eval.run import judge_items
from chatexaonepath.loopback import FakeOpenAIServer

REPORT = "FINAL DIAGNOSIS: Left breast, core biopsy: invasive ductal carcinoma, Nottingham grade 2."


def judge_reply(ids: list[str]):
    body = json.dumps({**{i: {"reason": "Consistent with the report.", "pass": True} for i in ids},
                       "addresses_evaluator": False})
    text = "\n".join(f"{i}: consistent." for i in ids) + f"\n```json\n{body}\n```"
    return lambda messages: text


def judge_once(url: str, items: list[JudgeItem], concurrency: int) -> tuple[float, int]:
    """(seconds, verdicts) to judge `items` at `concurrency` into a fresh run folder."""
    criteria = load_criteria()
    backend = build_backend(f"openai:bench@{url}", BackendOptions(max_retries=0))
    judge = Judge(backend, criteria, AcceptanceRule("major"), JudgeConfig(concurrency=concurrency))
    with tempfile.TemporaryDirectory() as folder:
        log = JsonlLog(Path(folder) / "verdicts.jsonl")
        started = time.perf_counter()
        judge_items(items, judge, log)
        seconds = time.perf_counter() - started
        verdicts = log.records()
    if len(verdicts) != len(items) or any(v["accepted"] is not True for v in verdicts):
        raise SystemExit(f"judging at concurrency {concurrency} gave unexpected verdicts")
    return seconds, len(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    items = [JudgeItem(f"a{i}", "What is the diagnosis?", "Invasive ductal carcinoma.", REPORT)
             for i in range(args.answers)]
    levels = (1, args.concurrency)
    times: dict[int, list[float]] = {c: [] for c in levels}
    with FakeOpenAIServer(models=("bench",), delay=args.latency, reply=judge_reply(load_criteria().ids)) as server:
        judge_once(server.url, items[:2], 2)  # warm-up: imports, first connections
        for _ in range(args.repeats):
            for concurrency in levels:
                times[concurrency].append(judge_once(server.url, items, concurrency)[0])

    print(f"{args.answers} answers, one request each, server latency {1000 * args.latency:.0f} ms, "
          f"{args.repeats} repeats (median)")
    print(f"{'concurrency':>11} | {'seconds':>8} | {'verdicts/s':>10} | {'ideal s':>8}")
    for concurrency in levels:
        median = statistics.median(times[concurrency])
        ideal = args.answers * args.latency / concurrency
        print(f"{concurrency:>11} | {median:>8.2f} | {args.answers / median:>10.1f} | {ideal:>8.2f}")
    speedup = statistics.median(times[1]) / statistics.median(times[args.concurrency])
    print(f"judge_concurrency_speedup: {speedup:.2f}")


if __name__ == "__main__":
    main()
