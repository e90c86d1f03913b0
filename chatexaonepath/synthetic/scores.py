"""Scoring a model on the lesion cohort: per-question accuracy and how well its heatmap finds the lesion.

Answers are the chat answers (greedy, through `ChatSession`, as `chatexaonepath chat` and the app
give them). The localisation score uses the very weights the app paints as the heatmap
(`ChatSession.use_features(...).attention`: the projector's pooling weights), scored per slide as a
ROC AUC against the lesion mask and averaged over the held-out slides that have a lesion. Strictly
(`localisation_auc`, the headline): every patch the lesion overlaps at all is positive. Leniently
(`localisation_auc_lenient`): patches at least MIN_COVERAGE lesion against patches without any, the
slivers the lesion only grazes left out of both sides.

Cases (2–3 slides of one organ, at most one with a lesion; synthetic/lesions.py) are scored as the app
asks them: the case's slides loaded into one session, each named by its file name, and each case question
asked in a fresh conversation. "What is the diagnosis of this case?" is right when the answer names the
case's diagnosis and no other; "Which slide shows the lesion?" when it names the lesion's slide (by its
number or its name) and no other, or, for a case without a lesion, says that none does.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ChatEXAONEPathError
from ..eval.stats import wilson_interval
from ..vision_tower.features import SlideFeatures, read_features
from .lesion_slides import patch_lesion_coverage
from .lesions import (
    CASE_QUESTIONS, CASE_SCORED, DESCRIBE_QUESTIONS, NO_LESION, QUESTIONS, SCORED, LesionCase, read_lesion_cases,
    read_lesion_labels, read_lesion_mask,
)

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


# -- cases ----------------------------------------------------------------------------------------------------
_NONE_WORDS = re.compile(r"\b(none|neither|no slide|no lesion)\b")


def named_slides(answer: str, names: list[str]) -> set:
    """The slides an answer names: 1-based positions (`slide 2`, or a slide's file name as its label gives it),
    and NO_LESION when it says that none does. Names count whole (a stem alone, like `a` of `a.svs`, could be any
    word)."""
    text = answer.lower()
    found: set = {int(n) for n in re.findall(r"\bslide\s*(\d+)", text)}
    for position, name in enumerate(names, 1):
        if name and re.search(rf"(?<![\w.-]){re.escape(name.lower())}(?![\w-])", text):
            found.add(position)
    if _NONE_WORDS.search(text):
        found.add(NO_LESION)
    return found


def case_truth(case: LesionCase, question: str) -> str | int:
    """The true answer to a case question: the diagnosis, or the lesion slide's position (NO_LESION: none)."""
    if question == "case_diagnosis":
        return case.diagnosis
    return case.lesion_slide or NO_LESION


def case_answer_correct(answer: str, case: LesionCase, question: str, names: list[str] | None = None) -> bool:
    """Right when the answer names the true class (or slide) and no other; `names` are the slides it was shown
    (default: the case's own)."""
    if question == "case_diagnosis":
        return answer_correct(answer, case.diagnosis, "diagnosis")
    return named_slides(answer, names or case.names) == {case_truth(case, question)}


@dataclass
class CaseView:
    """The cases of one split whose slides all have features (read once, scored many times)."""

    cases: list[LesionCase]
    features: dict[str, SlideFeatures]

    @classmethod
    def load(cls, cohort_dir: str | Path, features_dir: str | Path, split: str = "test") -> "CaseView":
        cohort_dir, features_dir = Path(cohort_dir), Path(features_dir)
        if not (cohort_dir / "cases.csv").is_file():
            raise ChatEXAONEPathError(f"{cohort_dir} has no cases.csv (made before cohorts had cases); run "
                                      f"`chatexaonepath synth lesions` on it again.")
        cases = [c for c in read_lesion_cases(cohort_dir / "cases.csv") if c.split == split
                 and all((features_dir / f"{sid}.h5").is_file() for sid in c.slide_ids)]
        if not cases:
            raise ChatEXAONEPathError(f"No {split} case of {cohort_dir} has features in {features_dir}.")
        slides = sorted({sid for c in cases for sid in c.slide_ids})
        return cls(sorted(cases, key=lambda c: c.case_id), {sid: read_features(features_dir / f"{sid}.h5")
                                                              for sid in slides})


@dataclass
class CaseScore:
    """Per case question: the answers, and how many were right."""

    answers: list[dict]  # {"case", "category", "truth", "answer", "correct", "slides"}

    def counts(self, question: str) -> tuple[int, int]:
        """(right, asked) for a case question."""
        chosen = [a["correct"] for a in self.answers if a["category"] == question]
        return sum(chosen), len(chosen)

    @property
    def accuracy(self) -> dict[str, float]:
        """Case question → fraction right (NaN when none was asked)."""
        return {q: (c / n if n else float("nan")) for q in CASE_SCORED for c, n in [self.counts(q)]}

    def interval(self, question: str) -> tuple[float, float] | None:
        """The 95 % Wilson interval of a case question's accuracy (None when none was asked)."""
        return wilson_interval(*self.counts(question))


def score_cases(model, view: CaseView, answer_from: dict[str, str] | None = None, max_new_tokens: int = 24,
                on_case: Callable[[int, int], None] | None = None) -> CaseScore:
    """Ask each case question of every case, the case's slides loaded together as the app loads them.

    `answer_from` maps a case to the case whose slides answer for it (the shuffled-case control): the answers are
    scored against the asked case's truth, the slide numbers and names against the slides shown.
    """
    session = session_for(model, max_new_tokens)
    by_id = {c.case_id: c for c in view.cases}
    answers = []
    for done, case in enumerate(view.cases, 1):
        shown = by_id[(answer_from or {}).get(case.case_id, case.case_id)]
        for i, (sid, name) in enumerate(zip(shown.slide_ids, shown.names)):
            session.use_features(view.features[sid], name, add=i > 0)
        for question in CASE_SCORED:
            session.reset()  # each question in a fresh conversation about the same slides
            answer = session.ask(CASE_QUESTIONS[question][0]).text
            answers.append({"case": case.case_id, "category": question, "truth": case_truth(case, question),
                            "answer": answer, "correct": case_answer_correct(answer, case, question, shown.names),
                            "slides": len(shown.slide_ids)})
        if on_case is not None:
            on_case(done, len(view.cases))
    return CaseScore(answers)


def case_derangement(cases: list[LesionCase], seed: int = 0) -> dict[str, str]:
    """Each case → another case, of as many slides where there is one (so slide numbers mean the same): the
    shuffled-case control."""
    if len(cases) < 2:
        raise ChatEXAONEPathError("The shuffled-case control needs at least 2 cases.")
    by_size: dict[int, list[str]] = {}
    for case in cases:
        by_size.setdefault(len(case.slide_ids), []).append(case.case_id)
    mapping = {}
    for size, ids in sorted(by_size.items()):
        if len(ids) >= 2:
            mapping |= derangement(ids, seed + size)
    rest = [c.case_id for c in cases if c.case_id not in mapping]  # a size with a single case: any other case
    everyone = [c.case_id for c in cases]
    for case_id in rest:
        mapping[case_id] = random.Random(seed).choice([other for other in everyone if other != case_id])
    return mapping
