"""Benchmark: RAIDER generation throughput with `--concurrency 8` vs 1, and indexing speed.

The LLM is an OpenAI-compatible server on loopback that answers after a fixed 200 ms, so the
ratio measures RAIDER's own overhead (retrieval, validation, the durable log) around the wait.
Run from the repository root: `python bench/raider_throughput.py`. The last line is
`raider_concurrency_speedup: X` (target ≥ 6).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import chatexaonepath  # noqa: F401
except ImportError:  # not installed yet: run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from chatexaonepath.backends import build_backend
from chatexaonepath.loopback import FakeOpenAIServer
from chatexaonepath.raider.chunking import chunk_report
from chatexaonepath.raider.generate import GenerateConfig, generate_answers, load_questions
from chatexaonepath.raider.index import ChunkIndex, Embedder

DELAY_S, REPORTS, REPEATS, CONCURRENCY = 0.2, 4, 3, 8
ORGANS = ["breast", "colon", "lung", "prostate", "kidney", "stomach"]


def synthetic_report(i: int) -> str:
    """A headed report of realistic length (about 1.5 KB)."""
    organ = ORGANS[i % len(ORGANS)]
    return (f"CLINICAL HISTORY:\nMass in the {organ}; rule out malignancy.\n\n"
            f"GROSS DESCRIPTION:\nReceived in formalin labelled with the patient's name is a {organ} resection. "
            "Sectioning reveals a firm tan-white lesion. Representative sections are submitted in cassettes.\n\n"
            f"MICROSCOPIC DESCRIPTION:\nSections show an infiltrating neoplasm arranged in glands and nests. "
            "Nuclear pleomorphism is moderate. Mitoses are frequent. There is a desmoplastic stromal reaction. "
            "Necrosis is focally present.\n\n"
            f"FINAL DIAGNOSIS:\n{organ.title()}, resection: invasive carcinoma, grade {1 + i % 3}. "
            "Margins are negative for carcinoma. Lymphovascular invasion is present. "
            f"{i % 5} of twelve lymph nodes contain metastatic carcinoma.\n\n"
            "COMMENT:\nImmunohistochemistry supports the diagnosis. Results were discussed with the surgeon.")


def main() -> None:
    questions = load_questions()
    texts = {f"report-{i:03d}": synthetic_report(i) for i in range(200)}
    chunks = [c for rid, text in texts.items() for c in chunk_report(rid, text)]
    embedder = Embedder()
    with tempfile.TemporaryDirectory() as tmp:
        index = ChunkIndex(Path(tmp) / "db", embedder)
        started = time.perf_counter()
        index.add(chunks)
        index_rate = len(chunks) / (time.perf_counter() - started)

        report_ids = sorted(texts)[:REPORTS]
        config_for = {c: GenerateConfig(concurrency=c, phrasings=0) for c in (1, CONCURRENCY)}
        seconds: dict[int, list[float]] = {1: [], CONCURRENCY: []}
        requests = 0
        with FakeOpenAIServer(delay=DELAY_S, reply=lambda messages: "Invasive carcinoma") as server:
            backend = build_backend(f"openai:test-model@{server.url}")
            for repeat in range(REPEATS):
                for concurrency, config in config_for.items():  # interleaved, so load drifts hit both alike
                    _, stats = generate_answers(index, backend, questions, Path(tmp) / f"{concurrency}-{repeat}.jsonl",
                                                config, report_ids)
                    seconds[concurrency].append(stats.seconds)
                    requests = stats.asked
    median = {c: statistics.median(s) for c, s in seconds.items()}
    table = Table(title=f"RAIDER generation, {requests} requests ({REPORTS} reports), server latency "
                        f"{DELAY_S * 1e3:.0f} ms, median of {REPEATS}")
    for column in ("concurrency", "seconds", "answers/s", "ideal answers/s"):
        table.add_column(column, justify="right")
    for c in (1, CONCURRENCY):
        table.add_row(str(c), f"{median[c]:.2f}", f"{requests / median[c]:.1f}", f"{c / DELAY_S:.1f}")
    Console().print(table)
    print(f"indexing: {len(chunks)} chunks of {len(texts)} reports at {index_rate:.0f} chunks/s "
          f"(embedder {embedder.name}, CPU)")
    print(f"raider_concurrency_speedup: {median[1] / median[CONCURRENCY]:.2f}")


if __name__ == "__main__":
    main()
