"""Benchmark: does two-phase training learn? A synthetic cohort, end to end, on the embedded LLM.

cohort (slides of known tissue classes, a report each) → features (random ViT-B/16: the EXAONEPath
weights are not available offline; the script first checks that its features separate the classes)
→ phase 1 (LLM frozen, tower learns captions) → phase 2 (LoRA + tower, QA with the system prompt)
→ on held-out slides, the chat answer to "What is the diagnosis?" must name the right class.

Controls, on the same held-out slides, all at or below chance (1/classes): the untrained model (what
`chatexaonepath chat` gives without --model; it names no class at all), the trained model answering
from another slide's features (it names a class, so ≈ chance: the answer comes from the slide), and
the trained model with its tower re-initialised at random.
Final line: `synthetic_accuracy: X` (target ≥ 0.90). About 5 minutes alone on a 2-core CPU, up to
~15 when other jobs share it.

    python bench/learn_synthetic.py [--slides 60] [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.synthetic.tissue_cohort import (
    DIAGNOSIS_QUESTION, CohortConfig, ask_about_features, diagnosis_correct, make_cohort, read_labels, score_diagnoses,
)
from chatexaonepath.train.data import DataConfig
from chatexaonepath.train.phases import PhaseConfig, train_phase
from chatexaonepath.vision_tower.batch import extract_slides
from chatexaonepath.vision_tower.extraction import ExtractConfig
from chatexaonepath.vision_tower.features import read_features


def class_separation(cohort: Path, features: Path) -> float:
    """Leave-one-out nearest-centroid accuracy on mean-pooled slide features (1.0: perfectly separable)."""
    labels = read_labels(cohort / "labels.csv")
    ids = [s for s in labels if (features / f"{s}.h5").is_file()]
    pooled = torch.stack([read_features(features / f"{s}.h5").features.float().mean(0) for s in ids])
    pooled = (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-6)
    truth = [labels[s][0] for s in ids]
    correct = 0
    for i in range(len(ids)):
        others = [j for j in range(len(ids)) if j != i]
        centroids = {c: pooled[[j for j in others if truth[j] == c]].mean(0) for c in set(truth)}
        correct += min(centroids, key=lambda c: float((pooled[i] - centroids[c]).norm())) == truth[i]
    return correct / len(ids)


def shuffled_slides_accuracy(model: ChatEXAONEPathForCausalLM, answers: list[dict], features: Path,
                             classes: list[str], seed: int = 0) -> float:
    """Accuracy when each held-out slide is answered from another (random) slide's features: ≈ chance
    when the answer really comes from the slide."""
    import random

    order = [a["slide"] for a in answers]
    shuffled = order[:]
    rng = random.Random(seed)
    while any(a == b for a, b in zip(order, shuffled)):
        rng.shuffle(shuffled)
    correct = [diagnosis_correct(ask_about_features(model, features / f"{other}.h5", DIAGNOSIS_QUESTION),
                                 a["truth"], classes) for a, other in zip(answers, shuffled)]
    return sum(correct) / len(correct)


def randomised_tower(model: ChatEXAONEPathForCausalLM, seed: int = 1) -> ChatEXAONEPathForCausalLM:
    """The same model with freshly initialised aggregator and projector weights."""
    from chatexaonepath.chat.modeling import SlideEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.tower = SlideEncoder(model.config).to(model.device).eval()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=60)
    parser.add_argument("--classes", default="tumor,stroma,normal,necrosis,lymphoid")
    parser.add_argument("--size", type=int, default=1024, help="slide side in level-0 pixels (0.5 µm/px)")
    parser.add_argument("--llm", default="embedded")
    parser.add_argument("--phase1-epochs", type=float, default=8)
    parser.add_argument("--phase1-lr", type=float, default=2e-3)
    parser.add_argument("--phase2-epochs", type=float, default=3)
    parser.add_argument("--phase2-tower-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    work = args.out or Path(tempfile.mkdtemp(prefix="learn-synthetic-"))
    cohort, features = work / "cohort", work / "features"
    timings: dict[str, float] = {}
    started_all = time.perf_counter()

    def timed(name, fn):
        started = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - started
        print(f"  {name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)
        return result

    classes = args.classes.split(",")
    timed("cohort", lambda: make_cohort(cohort, CohortConfig(slides=args.slides, classes=classes, size=args.size,
                                                              test_fraction=0.34)))
    summary = timed("features", lambda: extract_slides(
        [cohort / "slides"], features, ExtractConfig(encoder="random-vit-b16", num_workers=0)))
    separation = class_separation(cohort, features)
    common = dict(batch_size=args.batch_size, gradient_accumulation=1, warmup_ratio=0.1, report_to="none",
                  logging_steps=5, save_total_limit=1)
    data = lambda name: DataConfig(data=[str(cohort / name)], features_dir=str(features), skip_missing=True)  # noqa: E731
    p1 = timed("phase 1", lambda: train_phase(PhaseConfig(
        phase=1, out=str(work / "p1"), llm=args.llm, epochs=args.phase1_epochs, learning_rate=args.phase1_lr,
        **common), data("captions.json")))
    p2 = timed("phase 2", lambda: train_phase(PhaseConfig(
        phase=2, out=str(work / "p2"), init=str(work / "p1"), epochs=args.phase2_epochs,
        tower_learning_rate=args.phase2_tower_lr, **common), data("instruct.json")))
    model = ChatEXAONEPathForCausalLM.from_pretrained(work / "p2")  # what `chat --model` loads
    trained = timed("answers", lambda: score_diagnoses(model, cohort, features))
    shuffled = shuffled_slides_accuracy(model, trained.answers, features, classes)
    control = score_diagnoses(randomised_tower(model), cohort, features)
    torch.manual_seed(0)
    fresh = ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path=args.llm,
                                                                 aggregator={"in_dim": model.config.aggregator["in_dim"]}))
    untrained = score_diagnoses(fresh.eval(), cohort, features)

    rows = [
        ("classes (chance)", f"{len(classes)} ({1 / len(classes):.2f})"),
        ("slides train / held out", f"{sum(s == 'train' for _, s in read_labels(cohort / 'labels.csv').values())}"
                                    f" / {len(trained.answers)}"),
        ("features extracted / failed", f"{summary.count('extracted') + summary.count('skipped')} / {len(summary.failed)}"),
        ("feature class separation (LOO centroid)", f"{separation:.2f}"),
        ("phase 1 steps, best eval loss", f"{p1.global_step}, {p1.best_eval_loss:.3f}"),
        ("phase 2 steps, best eval loss", f"{p2.global_step}, {p2.best_eval_loss:.3f}"),
        ("accuracy: untrained model", f"{untrained.accuracy:.2f}"),
        ("accuracy: trained, asked about another slide", f"{shuffled:.2f}"),
        ("accuracy: trained LLM, random tower", f"{control.accuracy:.2f}"),
        ("accuracy: trained (phase 1 + 2)", f"{trained.accuracy:.2f}"),
        *((f"time: {k}", f"{v:.0f} s") for k, v in timings.items()),
        ("time: total (with model loads and controls)", f"{time.perf_counter() - started_all:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    wrong = [a for a in trained.answers if not a["correct"]]
    for a in wrong[:5]:
        print(f"  wrong: {a['slide']} ({a['truth']}): {a['answer']!r}")
    for name, score in (("trained", trained), ("random tower", control), ("untrained", untrained)):
        print(f"  {name} answers, e.g.: {[a['answer'][:40] for a in score.answers[:3]]}")
    if not args.keep and args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"synthetic_accuracy: {trained.accuracy:.3f}")


if __name__ == "__main__":
    main()
