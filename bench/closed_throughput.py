"""Benchmark: does closed-ended scoring cost no more per question than `eval run`'s answering?

The embedded LLM (SmolLM2-135M, the demo model's LLM) with an untrained tower answers the same
WSI-Bench-shaped multiple-choice questions (random 768-d features, several questions per slide)
twice, the model loaded once beforehand:
  - `eval closed` (run_closed: its defaults, 32 new tokens, batches of 8, then choice extraction,
    scoring, intervals, report and chart);
  - `eval run`'s answering (generate_answers with eval run's defaults: 256 new tokens, batches of 4).
Both decode like the app (greedy with its repetition guards). An untrained tower's answers are not
right, but they are as long as a trained model's can be, which is what the cost depends on.
Each repeat runs both into fresh folders, alternating which goes first (a shared machine's load
shifts); the table shows medians. Final line: `closed_vs_run_questions_per_s: X` (≥ 1 means closed
scoring is no slower per question than eval run's answering).

    python bench/closed_throughput.py [--questions 32] [--slides 8] [--repeats 3]
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

import numpy as np
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.eval.answers import GenerateConfig, generate_answers
from chatexaonepath.eval.closed import ClosedConfig, run_closed
from chatexaonepath.eval.data import JsonlLog, load_test_items
from chatexaonepath.llm import embedded_llm_dir
from chatexaonepath.vision_tower.features import write_features

QUESTIONS = [
    "Based on the observed features, what is the histological type of the tumour? A) Adenocarcinoma "
    "B) Squamous cell carcinoma, keratinizing type C) Squamous cell carcinoma, non-keratinizing type D) Small cell carcinoma",
    "What is the grade of this tumour by its differentiation? A) Well differentiated B) Moderately differentiated "
    "C) Poorly differentiated D) Undifferentiated",
    "Which pattern of invasion is seen? A) Confined to the primary site B) Stromal invasion with necrosis "
    "C) Lymphovascular invasion D) Perineural invasion only",
    "What does the nuclear morphology show? A) Uniform nuclei B) Mild atypia C) Moderate pleomorphism "
    "D) Marked pleomorphism with prominent nucleoli",
]


def build(root: Path, n_questions: int, n_slides: int) -> tuple[Path, Path, Path]:
    """A checkpoint around the embedded LLM, features for `n_slides` slides and a WSI-Bench choice file."""
    config = ChatEXAONEPathConfig(llm_name_or_path=str(embedded_llm_dir()))
    torch.manual_seed(0)
    ChatEXAONEPathForCausalLM.build(config, dtype="fp32").save_pretrained(root / "ckpt")
    rng = np.random.default_rng(0)
    slides = [f"TCGA-B{k}-{1000 + k}-01Z-00-DX1" for k in range(n_slides)]
    for slide in slides:
        coords = np.stack([np.arange(64) * 512, np.zeros(64)], 1)
        write_features(root / "features" / f"{slide}.h5", rng.normal(size=(64, 768)).astype(np.float32), coords,
                       {"encoder": "bench"})
    records = [{"id": f"q{i}", "image": f"TCGA-BENCH/{slides[i % n_slides]}.pt",
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
                                  {"from": "gpt", "value": "ABCD"[i % 4]}]} for i in range(n_questions)]
    (root / "Bench_choice_test.json").write_text(json.dumps(records))
    return root / "ckpt", root / "features", root / "Bench_choice_test.json"


def closed_once(model, ckpt: Path, features: Path, data: Path, out: Path) -> tuple[int, float, list[int]]:
    """(questions scored, seconds, new tokens per answer) of `eval closed` with its defaults."""
    started = time.perf_counter()
    summary = run_closed(ClosedConfig(data=[str(data)], model=str(ckpt), features=str(features)), out,
                         model=model).summary
    seconds = time.perf_counter() - started
    return summary["n"], seconds, [r["new_tokens"] for r in JsonlLog(out / "answers.jsonl").records()]


def run_once(model, ckpt: Path, features: Path, data: Path, out: Path) -> tuple[int, float, list[int]]:
    """(questions answered, seconds, new tokens per answer) of `eval run`'s answering with its defaults."""
    items = load_test_items(data, features)
    config = GenerateConfig(model=str(ckpt), data=str(data), features=str(features))
    started = time.perf_counter()
    generate_answers(items, config, JsonlLog(out / "answers.jsonl"), model=model)
    seconds = time.perf_counter() - started
    tokens = [r["new_tokens"] for r in JsonlLog(out / "answers.jsonl").records()]
    return len(tokens), seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[int, float, list[int]]]] = {"closed": [], "run": []}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        ckpt, features, data = build(root, args.questions, args.slides)
        model = ChatEXAONEPathForCausalLM.from_pretrained(ckpt)
        for repeat in range(args.repeats):
            order = ["closed", "run"] if repeat % 2 == 0 else ["run", "closed"]
            for name in order:
                once = closed_once if name == "closed" else run_once
                results[name].append(once(model, ckpt, features, data, root / f"{name}{repeat}"))
    rates = {name: [n / s for n, s, _ in runs] for name, runs in results.items()}
    print(f"{'':36}{'questions':>10}{'median s':>10}{'questions/s':>13}{'mean new tokens':>17}")
    for name, label in (("closed", "eval closed (32 tokens, batch 8)"), ("run", "eval run answering (256, batch 4)")):
        runs = results[name]
        print(f"{label:36}{runs[0][0]:>10}{statistics.median(s for _, s, _ in runs):>10.1f}"
              f"{statistics.median(rates[name]):>13.2f}{np.mean([t for _, _, ts in runs for t in ts]):>17.1f}")
    print(f"closed_vs_run_questions_per_s: {statistics.median(rates['closed']) / statistics.median(rates['run']):.2f}")


if __name__ == "__main__":
    main()
