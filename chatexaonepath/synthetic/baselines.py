"""Trivial and supervised baselines on the lesion cohort: what a claim that the model learns is measured against.

On the same slides and splits as the model (bench/learn_lesions.py):

- **colour statistics** — per patch, read from the slide at the features' coordinates: mean and spread per
  RGB channel (the "six numbers"), an 8-bin histogram per channel, and optical-density mean and spread.
  Slide-level variants (the slide's mean; its most outlying patch, absolute and relative to the slide's
  median) are classified by nearest centroid and by logistic regression; per patch, the distance from the
  slide's median in each space is an outlier score for localisation. Every variant is scored and the best
  one on the test split counts, so the baseline is as strong as it can be made: a cohort it cannot solve
  is one that colour cannot solve;
- **untrained features** — the patch features' distance from the slide's median feature (an outlier score);
- **mean-pooled features + a linear classifier** (logistic regression, its strength chosen on validation);
- **a label-supervised ABMIL** on the same features (CLAM's gated attention with a head per question,
  trained on the labels directly, the epoch chosen on validation): the ceiling the language-supervised
  tower is compared with.

Cases (2–3 slides of one organ, at most one with a lesion) get the same baselines through one rule on
per-slide diagnosis probabilities (each baseline's, fitted on the training slides' labels): the case's
lesion slide is the slide least likely lesion-free, unless even it is below a threshold chosen on the
validation cases (then none is), and the case's diagnosis is that slide's likeliest lesion type (or none).

Classifiers are fitted in torch (full-batch L-BFGS for the linear ones): the package has torch already,
and these are a few lines each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..eval.stats import wilson_interval
from ..vision_tower.features import SlideFeatures
from .lesions import NO_LESION
from .scores import localisation_auc

logger = logging.getLogger(__name__)

QUESTIONS = ("diagnosis", "organ", "grade", "margins")
# Grade and margins are asked of lesion slides only (a slide without a lesion has neither).
ASKED_OF_LESIONS = ("grade", "margins")


@dataclass
class SplitView:
    """The slides of one split: labels, features, patch colour statistics and lesion coverage."""

    ids: list[str]
    labels: dict[str, dict[str, str]]  # slide → labels.csv row
    features: dict[str, SlideFeatures]
    colour: dict[str, dict[str, np.ndarray]]  # slide → variant → (N, d) per-patch colour statistics
    coverage: dict[str, np.ndarray]  # slide → (N,) lesion share of each patch


def load_split_views(cohort_dir: str | Path, features_dir: str | Path,
                     colour_cache: str | Path | None = None) -> dict[str, SplitView]:
    """train / val / test views of a lesion cohort with features; colour statistics read once and cached."""
    import json

    from .lesions import SPLITS
    from .scores import CohortView

    cohort_dir = Path(cohort_dir)
    cache_file = Path(colour_cache) if colour_cache else None
    cached = json.loads(cache_file.read_text()) if cache_file is not None and cache_file.is_file() else {}
    views = {}
    for split in SPLITS:
        view = CohortView.load(cohort_dir, features_dir, split=split)
        colour = {}
        for sid in view.ids:
            if sid not in cached:
                f = view.features[sid]
                stats = patch_colour_statistics(cohort_dir / "slides" / f"{sid}.tiff", f.coords.numpy(),
                                                int(f.attrs["patch_size_level0"]))
                cached[sid] = {k: v.tolist() for k, v in stats.items()}
            colour[sid] = {k: np.asarray(v) for k, v in cached[sid].items()}
        views[split] = SplitView(view.ids, view.rows, view.features, colour, view.coverage)
    if cache_file is not None:
        from ..fileio import atomic_write_json

        atomic_write_json(cache_file, cached, indent=None)
    return views


def patch_colour_statistics(slide_path: str | Path, coords: np.ndarray, patch_size_level0: int,
                            patch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-patch colour statistics of a slide at the features' coordinates → {variant: (N, d)}.

    `moments`: mean and standard deviation per RGB channel (the six numbers); `histogram`: an 8-bin
    histogram per channel; `density`: mean and standard deviation of each channel's optical density.
    """
    from PIL import Image

    from ..vision_tower.slide import open_slide

    moments, histograms, density = [], [], []
    with open_slide(slide_path) as slide:
        for x, y in np.asarray(coords, np.int64):
            region = slide.read_region((int(x), int(y)), 0, (patch_size_level0, patch_size_level0))
            if patch_size_level0 != patch_size:
                region = np.asarray(Image.fromarray(region).resize((patch_size, patch_size), Image.BILINEAR))
            pixels = np.asarray(region, np.float32).reshape(-1, 3)
            moments.append(np.concatenate([pixels.mean(0), pixels.std(0)]))
            histograms.append(np.concatenate([np.histogram(pixels[:, c], bins=8, range=(0, 256))[0]
                                              for c in range(3)]) / len(pixels))
            od = -np.log(np.clip(pixels, 1, 255) / 255.0)
            density.append(np.concatenate([od.mean(0), od.std(0)]))
    return {"moments": np.asarray(moments), "histogram": np.asarray(histograms), "density": np.asarray(density)}


# -- statistics -----------------------------------------------------------------------------------------------
def asked(labels: dict[str, str], question: str) -> str | None:
    """The true answer class of a slide for `question`, or None when it is not asked of this slide."""
    if question in ASKED_OF_LESIONS and labels["diagnosis"] == NO_LESION:
        return None
    return labels[question] or None


@dataclass
class Accuracy:
    """Right answers out of asked ones, with the 95 % Wilson interval."""

    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % Wilson interval (eval/stats.py); NaN when nothing was asked."""
        return wilson_interval(self.correct, self.total) or (float("nan"), float("nan"))

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.value:.2f} [{low:.2f}, {high:.2f}]"


def accuracy(predictions: dict[str, str], view: SplitView, question: str) -> Accuracy:
    """How many of the split's slides asked `question` got the right class."""
    pairs = [(predictions.get(sid), asked(view.labels[sid], question)) for sid in view.ids]
    pairs = [(p, t) for p, t in pairs if t is not None]
    return Accuracy(sum(p == t for p, t in pairs), len(pairs))


# -- linear classifiers --------------------------------------------------------------------------------------
def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(a - mean) / std for a in (train, *others)]


def fit_logistic(x: np.ndarray, y: list[str], l2: float, seed: int = 0) -> tuple[torch.nn.Linear, list[str]]:
    """Multinomial logistic regression with an L2 penalty, by full-batch L-BFGS on standardised inputs."""
    classes = sorted(set(y))
    torch.manual_seed(seed)
    inputs = torch.as_tensor(x, dtype=torch.float32)
    targets = torch.tensor([classes.index(v) for v in y])
    model = torch.nn.Linear(inputs.shape[1], len(classes))
    optimiser = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets) + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return model, classes


def predict_logistic(model: torch.nn.Linear, classes: list[str], x: np.ndarray) -> list[str]:
    with torch.no_grad():
        return [classes[i] for i in model(torch.as_tensor(x, dtype=torch.float32)).argmax(1).tolist()]


def nearest_centroid(train_x: np.ndarray, train_y: list[str], x: np.ndarray) -> list[str]:
    """The class whose mean (of standardised inputs) is nearest."""
    classes = sorted(set(train_y))
    centroids = np.stack([train_x[[v == c for v in train_y]].mean(0) for c in classes])
    distances = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return [classes[i] for i in distances.argmin(1)]


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def _logistic_chosen_on_validation(train_x: np.ndarray, train_y: list[str], val_x: np.ndarray,
                                   val_y: list[str]) -> tuple[torch.nn.Linear, list[str]]:
    """The logistic regression whose penalty (of L2_GRID) gives the best validation accuracy."""
    best, best_score = None, -1.0
    for l2 in L2_GRID:
        model, classes = fit_logistic(train_x, train_y, l2)
        score = np.mean([p == t for p, t in zip(predict_logistic(model, classes, val_x), val_y)]) if val_y else 0.0
        if score > best_score:
            best, best_score = (model, classes), score
    return best


def classify(train: tuple[np.ndarray, list[str]], val: tuple[np.ndarray, list[str]],
             test: np.ndarray, method: str) -> list[str]:
    """Fit on train, choose the penalty on validation (logistic), predict test; inputs standardised on train."""
    (train_x, train_y), (val_x, val_y) = train, val
    train_x, val_x, test_x = _standardise(train_x, val_x, test)
    if method == "centroid":
        return nearest_centroid(train_x, train_y, test_x)
    return predict_logistic(*_logistic_chosen_on_validation(train_x, train_y, val_x, val_y), test_x)


def _rows(view: SplitView, vectors: dict[str, np.ndarray], question: str) -> tuple[np.ndarray, list[str], list[str]]:
    ids = [sid for sid in view.ids if asked(view.labels[sid], question) is not None]
    return (np.stack([vectors[sid] for sid in ids]) if ids else np.zeros((0, 1)),
            [asked(view.labels[sid], question) for sid in ids], ids)


def slide_level_baseline(views: dict[str, SplitView], vectors: dict[str, dict[str, np.ndarray]],
                         method: str, questions: tuple[str, ...] = QUESTIONS) -> dict[str, Accuracy]:
    """Per question: a classifier on one slide-level vector per slide (`vectors[split][slide]`), test accuracy."""
    result = {}
    for question in questions:
        train_x, train_y, _ = _rows(views["train"], vectors["train"], question)
        val_x, val_y, _ = _rows(views["val"], vectors["val"], question)
        test_x, _, test_ids = _rows(views["test"], vectors["test"], question)
        predictions = dict(zip(test_ids, classify((train_x, train_y), (val_x, val_y), test_x, method)))
        result[question] = accuracy(predictions, views["test"], question)
    return result


# -- colour ------------------------------------------------------------------------------------------------
def _outlier_scores(x: np.ndarray) -> np.ndarray:
    """Distance of each row from the slide's median, in units of the slide's robust spread per dimension."""
    median = np.median(x, 0)
    spread = np.median(np.abs(x - median), 0) * 1.4826 + 1e-6
    return np.sqrt((((x - median) / spread) ** 2).sum(1))


def colour_slide_vectors(view: SplitView) -> dict[str, dict[str, np.ndarray]]:
    """Slide-level colour vectors per variant: the slide's mean, and its most outlying patch (as it is and
    relative to the slide's median) — the lesion, when colour finds it."""
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for sid in view.ids:
        for space, x in view.colour[sid].items():
            top = int(np.argmax(_outlier_scores(x)))
            median = np.median(x, 0)
            vectors.setdefault(f"{space}: slide mean", {})[sid] = x.mean(0)
            vectors.setdefault(f"{space}: outlier patch", {})[sid] = np.concatenate([x[top], median])
            vectors.setdefault(f"{space}: outlier − median", {})[sid] = x[top] - median
    return vectors


@dataclass
class ColourBaseline:
    """Every colour variant's test accuracy per question, and the best variant per question."""

    variants: dict[str, dict[str, Accuracy]]  # "<space>: <vector> / <method>" → question → accuracy
    localisation: dict[str, tuple[float, float]]  # space → (strict AUC, lenient AUC), mean over lesion slides

    def best(self, question: str) -> tuple[str, Accuracy]:
        return best_variant(self.variants, question)

    def best_localisation(self, strict: bool = True) -> tuple[str, float]:
        index = 0 if strict else 1
        name = max(self.localisation, key=lambda s: self.localisation[s][index])
        return name, self.localisation[name][index]


def colour_baseline(views: dict[str, SplitView]) -> ColourBaseline:
    """Nearest centroid and logistic regression on every slide-level colour vector; outlier localisation."""
    per_split = {split: colour_slide_vectors(view) for split, view in views.items()}
    variants = {}
    for name in per_split["train"]:
        vectors = {split: per_split[split][name] for split in views}
        for method in ("centroid", "logistic"):
            variants[f"{name} / {method}"] = slide_level_baseline(views, vectors, method)
    test = views["test"]
    localisation = {}
    for space in next(iter(test.colour.values())):
        scored = [(_outlier_scores(test.colour[sid][space]), test.coverage[sid]) for sid in test.ids
                  if test.labels[sid]["diagnosis"] != NO_LESION]
        localisation[space] = (_mean([localisation_auc(s, c, min_coverage=0.0) for s, c in scored]),
                               _mean([localisation_auc(s, c) for s, c in scored]))
    return ColourBaseline(variants, localisation)


def _mean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


# -- features -------------------------------------------------------------------------------------------
def feature_outlier_localisation(view: SplitView) -> tuple[float, float]:
    """(strict, lenient) localisation AUC of the untrained features' distance from the slide's median feature."""
    strict, lenient = [], []
    for sid in view.ids:
        if view.labels[sid]["diagnosis"] == NO_LESION:
            continue
        x = view.features[sid].features.float().numpy()
        score = np.linalg.norm(x - np.median(x, 0), axis=1)
        strict.append(localisation_auc(score, view.coverage[sid], min_coverage=0.0))
        lenient.append(localisation_auc(score, view.coverage[sid]))
    return _mean(strict), _mean(lenient)


def mean_pooled_baseline(views: dict[str, SplitView]) -> dict[str, Accuracy]:
    """Logistic regression on each slide's mean patch feature (penalty chosen on validation)."""
    vectors = {split: {sid: view.features[sid].features.float().mean(0).numpy() for sid in view.ids}
               for split, view in views.items()}
    return slide_level_baseline(views, vectors, "logistic")


@dataclass
class AbmilResult:
    """The label-supervised ABMIL's test accuracy per question, its attention's localisation, its chosen epoch."""

    accuracy: dict[str, Accuracy]
    localisation_auc: float  # strict (every overlapping patch positive), mean over test lesion slides
    localisation_auc_lenient: float
    epoch: int
    val_accuracy: float  # of the diagnosis, at the epoch kept
    predictions: dict[str, dict[str, str]] = field(default_factory=dict)  # question → slide → class
    # validation and test slide → diagnosis class → probability (what the case rule is built on)
    diagnosis_probabilities: dict[str, dict[str, float]] = field(default_factory=dict)


class Abmil(torch.nn.Module):
    """CLAM's gated attention over a slide's patches, then one linear head per question."""

    def __init__(self, in_dim: int, classes: dict[str, list[str]], hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        from ..vision_tower.aggregator import AggregatorConfig, GatedAttentionAggregator

        self.aggregator = GatedAttentionAggregator(AggregatorConfig(in_dim=in_dim, hidden_dim=hidden,
                                                                    attention_dim=hidden // 2, dropout=dropout))
        self.heads = torch.nn.ModuleDict({q.replace(" ", "_"): torch.nn.Linear(hidden, len(c))
                                          for q, c in classes.items()})

    def forward(self, features: torch.Tensor):
        out = self.aggregator(features)  # one slide: (1, N, D) → pooled (1, H), attention (1, N)
        return {q: head(out.pooled)[0] for q, head in self.heads.items()}, out.attention[0]


def _abmil_bags(views: dict[str, SplitView], inputs: str) -> dict[str, torch.Tensor]:
    """Standardised bags (training statistics): `absolute`, `centred` (each patch relative to its slide's median
    patch, which removes what a whole slide shares — its stain, its scanner — and keeps what stands out in it),
    or `both` side by side."""
    train = views["train"]
    stacked = torch.cat([train.features[s].features.float() for s in train.ids])
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    bags = {}
    for view in views.values():
        for sid in view.ids:
            x = view.features[sid].features.float()
            standard = (x - mean) / std
            centred = (x - x.median(0).values) / std
            bags[sid] = {"absolute": standard, "centred": centred, "both": torch.cat([standard, centred], 1)}[inputs]
    return bags


def abmil_baseline(views: dict[str, SplitView], seed: int = 0, epochs: int = 40, lr: float = 1e-3) -> AbmilResult:
    """Train ABMIL on the training slides' labels with absolute, slide-centred and both inputs; keep the variant
    and epoch with the best validation accuracy (the diagnosis first, then the mean over the questions)."""
    best: tuple | None = None
    for inputs in ("absolute", "centred", "both"):
        result = _train_abmil(views, _abmil_bags(views, inputs), seed, epochs, lr)
        if best is None or result[0] > best[0]:
            best = result
    _, epoch, model, bags, classes = best
    test = views["test"]
    predictions = {q: _predict(model, bags, test, classes, q) for q in QUESTIONS}
    strict, lenient = [], []
    with torch.no_grad():
        for sid in test.ids:
            if test.labels[sid]["diagnosis"] == NO_LESION:
                continue
            weights = model(bags[sid])[1].numpy()
            strict.append(localisation_auc(weights, test.coverage[sid], min_coverage=0.0))
            lenient.append(localisation_auc(weights, test.coverage[sid]))
    probabilities = {}
    with torch.no_grad():
        for view in (views["val"], test):
            for sid in view.ids:
                p = torch.softmax(model(bags[sid])[0]["diagnosis"], 0).tolist()
                probabilities[sid] = dict(zip(classes["diagnosis"], p))
    return AbmilResult({q: accuracy(predictions[q], test, q) for q in QUESTIONS}, _mean(strict), _mean(lenient),
                       epoch, best[0][0], predictions, probabilities)


def _train_abmil(views: dict[str, SplitView], bags: dict[str, torch.Tensor], seed: int, epochs: int, lr: float):
    train, val = views["train"], views["val"]
    classes = {q: sorted({asked(train.labels[s], q) for s in train.ids} - {None}) for q in QUESTIONS}
    torch.manual_seed(seed)
    model = Abmil(bags[train.ids[0]].shape[1], classes)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    best = ((-1.0, -1.0), 0, None)
    for epoch in range(1, epochs + 1):
        model.train()
        for sid in [train.ids[i] for i in rng.permutation(len(train.ids))]:
            logits, _ = model(bags[sid])
            losses = [torch.nn.functional.cross_entropy(logits[q.replace(" ", "_")][None],
                                                        torch.tensor([classes[q].index(t)]))
                      for q in QUESTIONS if (t := asked(train.labels[sid], q)) is not None]
            optimiser.zero_grad()
            torch.stack(losses).sum().backward()
            optimiser.step()
        per_question = [accuracy(_predict(model, bags, val, classes, q), val, q).value for q in QUESTIONS]
        score = (per_question[0], float(np.mean(per_question)))  # the diagnosis first
        if score > best[0]:
            best = (score, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    model.eval()
    return best[0], best[1], model, bags, classes


def _predict(model: Abmil, bag: dict[str, torch.Tensor], view: SplitView, classes: dict[str, list[str]],
             question: str) -> dict[str, str]:
    model.eval()
    with torch.no_grad():
        return {sid: classes[question][int(model(bag[sid])[0][question.replace(" ", "_")].argmax())]
                for sid in view.ids}


# -- cases ------------------------------------------------------------------------------------------------
Probabilities = dict[str, dict[str, float]]  # slide → diagnosis class → probability


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def diagnosis_probabilities(views: dict[str, SplitView], vectors: dict[str, dict[str, np.ndarray]],
                            method: str) -> Probabilities:
    """Per validation and test slide, the diagnosis classes' probabilities from one slide-level vector per slide,
    fitted on the training slides: logistic regression (penalty chosen on validation) or nearest centroid (a unit
    Gaussian around each class mean: the centroid rule's own posterior)."""
    train_x, train_y, _ = _rows(views["train"], vectors["train"], "diagnosis")
    val_x, val_y, val_ids = _rows(views["val"], vectors["val"], "diagnosis")
    test_x, _, test_ids = _rows(views["test"], vectors["test"], "diagnosis")
    train_x, val_x, test_x = _standardise(train_x, val_x, test_x)
    x = np.concatenate([val_x, test_x])
    if method == "centroid":
        classes = sorted(set(train_y))
        centroids = np.stack([train_x[[v == c for v in train_y]].mean(0) for c in classes])
        p = _softmax(-0.5 * ((x[:, None, :] - centroids[None]) ** 2).sum(-1))
    else:
        model, classes = _logistic_chosen_on_validation(train_x, train_y, val_x, val_y)
        with torch.no_grad():
            p = torch.softmax(model(torch.as_tensor(x, dtype=torch.float32)), 1).numpy()
    return {sid: dict(zip(classes, map(float, row))) for sid, row in zip(val_ids + test_ids, p)}


def lesion_score(probabilities: dict[str, float]) -> float:
    """How likely a slide carries a lesion: one minus its no-lesion probability."""
    return 1.0 - probabilities.get(NO_LESION, 0.0)


def case_prediction(probabilities: Probabilities, case, threshold: float) -> dict[str, str]:
    """The rule's answers to a case: its likeliest lesion slide (1-based) and that slide's likeliest lesion type,
    or none for both when no slide's lesion score reaches `threshold`."""
    scores = [lesion_score(probabilities[sid]) for sid in case.slide_ids]
    k = int(np.argmax(scores))
    if scores[k] < threshold:
        return {"which_slide": NO_LESION, "case_diagnosis": NO_LESION}
    p = probabilities[case.slide_ids[k]]
    lesions = [c for c in p if c != NO_LESION]
    return {"which_slide": str(k + 1), "case_diagnosis": max(lesions, key=p.get) if lesions else NO_LESION}


def case_accuracy(predictions: dict[str, dict[str, str]], cases) -> dict[str, Accuracy]:
    """Per case question, how many cases the predictions got right."""
    from .lesions import CASE_SCORED

    truth = {c.case_id: {"which_slide": str(c.lesion_slide) if c.lesion_slide else NO_LESION,
                         "case_diagnosis": c.diagnosis} for c in cases}
    return {q: Accuracy(sum(predictions[c.case_id][q] == truth[c.case_id][q] for c in cases), len(cases))
            for q in CASE_SCORED}


def case_rule_baseline(probabilities: Probabilities, val_cases: list, test_cases: list) -> dict[str, Accuracy]:
    """The case rule on per-slide probabilities: its threshold chosen on the validation cases (the best mean of the
    two questions' accuracies; ties: the lowest), its accuracy on the test cases."""
    candidates = sorted({max(lesion_score(probabilities[sid]) for sid in c.slide_ids) for c in val_cases}) + [np.inf]
    best, best_score = 0.5, -1.0
    for threshold in candidates if val_cases else [0.5]:
        scored = case_accuracy({c.case_id: case_prediction(probabilities, c, threshold) for c in val_cases}, val_cases)
        score = float(np.mean([a.value for a in scored.values()])) if val_cases else 0.0
        if score > best_score:
            best, best_score = threshold, score
    return case_accuracy({c.case_id: case_prediction(probabilities, c, best) for c in test_cases}, test_cases)


def cases_in(view: SplitView, cases: list) -> list:
    """The cases whose slides the view holds: its split's (splits share no slide), those with features."""
    return [c for c in cases if all(sid in view.features for sid in c.slide_ids)]


def colour_case_baseline(views: dict[str, SplitView], cases: list) -> dict[str, dict[str, Accuracy]]:
    """The case rule on every colour variant (slide-level colour vector × nearest centroid or logistic regression):
    variant → case question → test accuracy. As for slides, the best variant on the test split is the one to quote."""
    per_split = {split: colour_slide_vectors(view) for split, view in views.items()}
    val_cases, test_cases = cases_in(views["val"], cases), cases_in(views["test"], cases)
    variants = {}
    for name in per_split["train"]:
        vectors = {split: per_split[split][name] for split in views}
        for method in ("centroid", "logistic"):
            variants[f"{name} / {method}"] = case_rule_baseline(diagnosis_probabilities(views, vectors, method),
                                                                val_cases, test_cases)
    return variants


def best_variant(variants: dict[str, dict[str, Accuracy]], question: str) -> tuple[str, Accuracy]:
    """The variant with the best test accuracy on `question` (ties: by name), and that accuracy."""
    name = max(variants, key=lambda v: (variants[v][question].value, v))
    return name, variants[name][question]


def mean_pooled_case_baseline(views: dict[str, SplitView], cases: list) -> dict[str, Accuracy]:
    """The case rule on logistic regression over each slide's mean patch feature."""
    vectors = {split: {sid: view.features[sid].features.float().mean(0).numpy() for sid in view.ids}
               for split, view in views.items()}
    return case_rule_baseline(diagnosis_probabilities(views, vectors, "logistic"), cases_in(views["val"], cases),
                              cases_in(views["test"], cases))


def abmil_case_baseline(abmil: AbmilResult, views: dict[str, SplitView], cases: list) -> dict[str, Accuracy]:
    """The case rule on the label-supervised ABMIL's per-slide diagnosis probabilities (the ceiling for cases)."""
    return case_rule_baseline(abmil.diagnosis_probabilities, cases_in(views["val"], cases),
                              cases_in(views["test"], cases))
