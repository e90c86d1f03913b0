"""Scoring a model on the lesion cohort: per-question accuracy and how well its heatmap finds the lesion.

Answers are the chat answers (greedy, through `ChatSession`, as `chatexaonepath chat` and the app
give them). The localisation score uses the very weights the app paints as the heatmap
(`ChatSession.use_features(...).attention`: the projector's pooling weights), scored per slide as a
ROC AUC against the lesion mask and averaged over the held-out slides that have a lesion. Strictly
(`localisation_auc`, the headline): every patch the lesion overlaps at all is positive. Leniently
(`localisation_auc_lenient`): patches at least MIN_COVERAGE lesion against patches without any, the
slivers the lesion only grazes left out of both sides.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ChatEXAONEPathError
from ..vision_tower.features import SlideFeatures, read_features
from .lesion_slides import patch_lesion_coverage
from .lesions import DESCRIBE_QUESTIONS, NO_LESION, QUESTIONS, SCORED, read_lesion_labels, read_lesion_mask

# Patches the lesion covers less than this are slivers at its border: their look hardly changes, no model can
# single them out, and with "any overlap" they cap the AUC near 0.85 (docs/demo_model.md).
MIN_COVERAGE = 0.10
# What an answer must say, per category: the class → the words that name it.
NAMES = {
    "diagnosis": {"adenocarcinoma": ("adenocarcinoma",), "squamous cell carcinoma": ("squamous",),
                  "melanoma": ("melanoma",), NO_LESION: ("no lesion", "normal")},
    "organ": {"colon": ("colon",), "liver": ("liver",), "lymph node": ("lymph",)},
    "grade": {"low": ("low",), "high": ("high",)},
    "margins": {"involved": ("involved", "positive"), "clear": ("clear", "free", "negative")},
}


def named(answer: str, category: str) -> set[str]:
    """The classes of `category` an answer names (whole words, case-insensitive)."""
    text = " ".join(re.findall(r"[a-z]+", answer.lower()))
    return {cls for cls, words in NAMES[category].items() if any(re.search(rf"\b{w}\b", text) for w in words)}


def truth_of(row: dict[str, str], category: str) -> str | None:
    """The true class of a labels.csv row for `category` (None: not asked, e.g. the grade of no lesion)."""
    value = row[category]
    return value or None


def answer_correct(answer: str, truth: str, category: str) -> bool:
    """Right when the answer names the true class and no other one."""
    return named(answer, category) == {truth}


DESCRIPTION = "description"  # the phase-2 description, scored fact by fact
DESCRIPTION_TOKENS = 64  # a three-sentence description; the short answers need 24


def description_facts(answer: str, row: dict[str, str]) -> dict[str, bool]:
    """Per fact a slide has (organ, diagnosis, and grade and margins where there is a lesion): named right?"""
    return {c: answer_correct(answer, truth, c) for c in SCORED if (truth := truth_of(row, c)) is not None}


def session_for(model, max_new_tokens: int = 24):
    """A chat session as the app runs one (greedy), for features already at hand."""
    from ..chat.session import ChatSession

    return ChatSession(model, max_new_tokens=max_new_tokens)


def displayed_weights(session, features: SlideFeatures) -> np.ndarray:
    """The per-patch weights the app paints as the heatmap for these features (and starts a chat on them)."""
    return session.use_features(features).attention.float().numpy()


def ask(session, features: SlideFeatures, question: str) -> str:
    """One question about one slide in a fresh conversation."""
    session.use_features(features)
    return session.ask(question).text


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties counted half); NaN without both classes."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, tied scores share their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class LesionScore:
    """Accuracy per question category and localisation AUC on one split of the cohort."""

    accuracy: dict[str, float]  # category → fraction right
    localisation_auc: float  # strict: mean per-slide AUC, every patch overlapping the lesion positive
    localisation_auc_lenient: float  # patches ≥ MIN_COVERAGE lesion vs patches without lesion, slivers left out
    per_slide_auc: dict[str, float] = field(default_factory=dict)  # the strict kind, per slide with a lesion
    answers: list[dict] = field(default_factory=list)  # {"slide", "category", "truth", "answer", "correct"}

    def accuracy_where(self, category: str, **conditions) -> float:
        """Accuracy of `category` on the answers whose fields match `conditions` (e.g. lesion=True)."""
        chosen = [a for a in self.answers if a["category"] == category
                  and all(a.get(k) == v for k, v in conditions.items())]
        return sum(a["correct"] for a in chosen) / len(chosen) if chosen else float("nan")


@dataclass
class CohortView:
    """The slides of one split with their labels, features and patch labels (read once, scored many times)."""

    ids: list[str]
    rows: dict[str, dict[str, str]]
    features: dict[str, SlideFeatures]
    coverage: dict[str, np.ndarray]  # slide → (N,) the lesion's share of each patch (> 0: it overlaps the lesion)

    @classmethod
    def load(cls, cohort_dir: str | Path, features_dir: str | Path, split: str = "test") -> "CohortView":
        cohort_dir, features_dir = Path(cohort_dir), Path(features_dir)
        rows = {sid: row for sid, row in read_lesion_labels(cohort_dir / "labels.csv").items()
                if row["split"] == split and (features_dir / f"{sid}.h5").is_file()}
        if not rows:
            raise ChatEXAONEPathError(f"No {split} slide of {cohort_dir} has features in {features_dir}.")
        features = {sid: read_features(features_dir / f"{sid}.h5") for sid in rows}
        coverage = {sid: patch_lesion_coverage(f.coords.numpy(), int(f.attrs["patch_size_level0"]),
                                               read_lesion_mask(cohort_dir / "masks" / f"{sid}.png"))
                    for sid, f in features.items()}
        return cls(sorted(rows), rows, features, coverage)


def score_lesion_cohort(model, view: CohortView, categories: tuple[str, ...] = SCORED,
                        answer_from: dict[str, str] | None = None, max_new_tokens: int = 24,
                        questions: dict[str, str] | None = None,
                        on_slide: Callable[[int, int], None] | None = None) -> LesionScore:
    """Ask each category's question about every slide and score the heatmap against the masks.

    `questions` overrides a category's question (default: its first phrasing in QUESTIONS; after phase 1
    alone, the caption prompt, whose answer starts with the diagnosis). `on_slide(done, total)` is called
    after each slide. `answer_from` maps a slide to the slide whose features answer for it (the shuffled
    control): the answers are then scored against the asked slide's truth, and its heatmap is the other
    slide's weights laid over this slide's patch grid (the two grids share the level-0 lattice).
    """
    session = session_for(model, max_new_tokens)
    answers, aucs, aucs_lenient = [], {}, {}
    for done, sid in enumerate(view.ids, 1):
        row, source = view.rows[sid], (answer_from or {}).get(sid, sid)
        features = view.features[source]
        weights = displayed_weights(session, features)
        if row["diagnosis"] != NO_LESION:
            scores, coverage = _on_grid(weights, features, view.features[sid], view.coverage[sid])
            aucs[sid] = localisation_auc(scores, coverage, min_coverage=0.0)
            aucs_lenient[sid] = localisation_auc(scores, coverage)
        for category in categories:
            if category == DESCRIPTION:
                answers.append(_describe(session, features, row, sid, max(max_new_tokens, DESCRIPTION_TOKENS)))
                continue
            truth = truth_of(row, category)
            if truth is None:
                continue
            answer = ask(session, features, (questions or {}).get(category, QUESTIONS[category][0]))
            answers.append({"slide": sid, "category": category, "truth": truth, "answer": answer,
                            "correct": answer_correct(answer, truth, category),
                            "lesion": row["diagnosis"] != NO_LESION})
        if on_slide is not None:
            on_slide(done, len(view.ids))
    accuracy = {c: sum(a["correct"] for a in answers if a["category"] == c) /
                max(1, sum(a["category"] == c for a in answers)) for c in categories}
    return LesionScore(accuracy, _mean(aucs.values()), _mean(aucs_lenient.values()), aucs, answers)


def _describe(session, features: SlideFeatures, row: dict[str, str], sid: str, max_new_tokens: int) -> dict:
    """The description asked of one slide, right when it names every fact the slide has and nothing else."""
    short, session.max_new_tokens = session.max_new_tokens, max_new_tokens
    try:
        answer = ask(session, features, DESCRIBE_QUESTIONS[0])
    finally:
        session.max_new_tokens = short
    facts = description_facts(answer, row)
    return {"slide": sid, "category": DESCRIPTION, "truth": "; ".join(f"{c}: {truth_of(row, c)}" for c in facts),
            "answer": answer, "correct": all(facts.values()), "facts": facts, "lesion": row["diagnosis"] != NO_LESION}


def untrained_localisation(model, view: CohortView, seeds) -> list[float]:
    """Localisation AUC of a freshly initialised tower per seed (the LLM kept); `model.tower` is replaced.

    An untrained tower ranks patches along a random direction and the lesion's patches are outliers, so one
    initialisation puts them near the top or the bottom (an AUC far from 0.5 either way); the direction's sign
    is symmetric, so over initialisations the AUC averages to chance: the control is the mean over many.
    """
    import torch

    from ..chat.modeling import SlideEncoder

    aucs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model.tower = SlideEncoder(model.config).to(model.device).eval()
        aucs.append(score_lesion_cohort(model, view, categories=()).localisation_auc)
    return aucs


def _mean(values) -> float:
    valid = [v for v in values if not np.isnan(v)]
    return float(np.mean(valid)) if valid else float("nan")


def localisation_auc(weights: np.ndarray, coverage: np.ndarray, min_coverage: float = MIN_COVERAGE) -> float:
    """ROC AUC of per-patch weights: patches at least `min_coverage` lesion against patches with no lesion.

    Patches the lesion only grazes (0 < coverage < `min_coverage`) count on neither side; with
    `min_coverage=0` every patch that overlaps the lesion at all is positive.
    """
    coverage = np.asarray(coverage, np.float64)
    positive = coverage > 0 if min_coverage <= 0 else coverage >= min_coverage
    keep = positive | (coverage == 0)
    return roc_auc(np.asarray(weights)[keep], positive[keep])


def _on_grid(weights: np.ndarray, source: SlideFeatures, target: SlideFeatures,
             coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`source`'s weights and `target`'s lesion coverage at the grid positions both slides have."""
    if source is target:
        return weights, coverage
    where = {tuple(c): i for i, c in enumerate(source.coords.tolist())}
    pairs = [(where[tuple(c)], j) for j, c in enumerate(target.coords.tolist()) if tuple(c) in where]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    src, dst = np.array(pairs).T
    return weights[src], coverage[dst]


def derangement(ids: list[str], seed: int = 0) -> dict[str, str]:
    """Each slide → another slide (none keeps its own): the shuffled-slide control."""
    if len(ids) < 2:
        raise ChatEXAONEPathError("The shuffled-slide control needs at least 2 slides.")
    rng = random.Random(seed)
    shuffled = list(ids)
    while any(a == b for a, b in zip(ids, shuffled)):
        rng.shuffle(shuffled)
    return dict(zip(ids, shuffled))
