"""The demo model: trained once on the synthetic lesion cohort, cached, served by `make demo`.

`ensure_demo_model()` returns a ready demo model from the user cache, building it first when the
cache has none for this code and data version: lesion cohort (synthetic/lesions.py) → features with the
patch encoder the app serves → phase 1 → phase 2 (the slides' questions and the cases' "which slide shows the
lesion?" and "what is the diagnosis of this case?") → a validation check → a check on the held-out slides and
cases (per-question accuracy with its interval and how many distinct answers each question got, the case
questions among them, the description's facts, localisation AUC of the heatmap), written to `demo.json` beside
the checkpoint.

The validation check decides whether a build learned: diagnosis accuracy on the validation slides of at least
0.8, and no question answered the same way for 80 % or more of them (a collapse to one answer). A build that
fails it trains again with the next seed (same cohort, same features), at most `retries` times; one that still
fails is kept, marked failed in demo.json, and served with a red banner. The example slide is fixed before
any scoring: the held-out lesion slide with the largest lesion (ties by id), whatever the model answers there.
`bench/learn_lesions.py` runs the same `build_demo_model` with a larger cohort and reports the figures with
their controls.

    <cache>/demo-model/<key>/build.json the settings, written first
                             cohort/   the lesion cohort (slides, masks, reports, data)
                             features/ their features
                             p1/ model/ the phase-1 and phase-2 checkpoints (`--model …/model` works too)
                             retry-1/ retry-2/ the same for the next seeds, when a build failed its check
                             demo.json what it is, the figures measured, the example slide; written last

The key hashes the package version, the source of the modules that draw the cohort, extract its features
and run this build, the build settings, the features' and training's precision and the patch encoder's
weights: a change to any of them builds anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..assets import user_cache_dir
from ..errors import ChatEXAONEPathError
from ..fileio import atomic_write_json

if TYPE_CHECKING:
    from ..train.data import DataConfig
    from ..train.phases import PhaseConfig

logger = logging.getLogger(__name__)

DEMO_FORMAT = 3  # bump when the build changes in a way the hashed sources do not show (3: cases in the cohort)
CARD_FILE = "demo.json"
BUILD_FILE = "build.json"  # the settings of a build, written when it starts
# What the demo model is, in the words the banner and the model card use.
DEMO_DESCRIPTION = ("a demo model trained on synthetic slides; it knows only these synthetic organs and lesions; "
                    "not a medical device")

ProgressFn = Callable[[str, int | None, int | None], None]  # (stage, done, total)


@dataclass
class DemoBuildConfig:
    """How big the demo's cohort is and how long it trains (docs/learning.md: what the defaults take and score)."""

    # Slides per organ × diagnosis in train / validation / test (synthetic/lesions.py): 36 / 12 / 24 slides of
    # about 90 tissue patches; the features are most of the build's time.
    split_sizes: tuple[int, int, int] = (3, 1, 2)
    size: int = 3072  # level-0 side at 0.5 µm/px: about 90 tissue patches of 256² per slide
    llm: str = "embedded"
    encoder: str | None = None  # None: what the app serves (EXAONEPath when its weights are found, else random)
    precision: str = "auto"  # features and training: auto (bf16 where the CPU or GPU runs it), fp32, bf16
    # Phase 1 (the LLM frozen) trains the tower on the captions; its epochs are an upper bound: the checkpoint
    # kept is the one the validation slides' captions score best (exact match, then loss).
    phase1_epochs: float = 40.0
    phase1_lr: float = 2e-3
    # Phase 1 sees a random 48 of each training slide's ~90 patches per step (a new draw each epoch): when the
    # most lesion-like patch is left out, attention has to find the others, so the heatmap learns the whole
    # lesion rather than its single strongest patch.
    phase1_max_patches: int | None = 48
    phase2_epochs: float = 4.0
    phase2_lr: float = 1e-3
    phase2_tower_lr: float = 3e-4
    batch_size: int = 2
    validate_every: int = 2  # epochs between validations (each one decodes the validation answers)
    patience: int = 4  # validations without a better score before a phase stops early (0: never)
    check: bool = True  # score the held-out slides into demo.json
    # The validation check a build must pass (diagnosis accuracy on the validation slides, and the largest share
    # of them any one answer may take); a failed build trains again with the next seed, at most `retries` times.
    pass_diagnosis: float = 0.8
    max_answer_share: float = 0.8
    retries: int = 2
    seed: int = 0
    cohort: dict = field(default_factory=dict)  # further LesionCohortConfig settings


@dataclass
class DemoModel:
    """A built demo model: its checkpoint, its example slide and what it measured."""

    folder: Path
    card: dict

    @property
    def model_dir(self) -> Path:
        return self.folder / self.card.get("model", "model")

    @property
    def failed(self) -> bool:
        """True when no seed passed the validation check: its answers do not reflect the slide."""
        return not (self.card.get("validation") or {}).get("passed", True)

    def failure(self) -> str | None:
        """The red banner's sentence for a build that failed its check, else None."""
        if not self.failed:
            return None
        tries = len(self.card.get("attempts") or []) or 1
        return (f"This demo build failed its own check ({tries} seed{'s' if tries > 1 else ''} tried): its answers "
                f"do not reflect the slide. Rebuild it (README: if the demo build fails its check) or load a "
                f"trained model with --model")

    @property
    def example_slide(self) -> Path:
        return self.folder / "cohort" / "slides" / f"{self.card['example']['slide']}.tiff"

    def warning(self) -> str:
        """What the banner says about it: exactly what it is, and that it is not a medical device."""
        c = self.card
        return (f"this is a demo model trained on synthetic slides; it knows only these synthetic organs "
                f"({', '.join(c['organs'])}) and lesions ({', '.join(c['lesions'])}); not a medical device")

    @staticmethod
    def questions() -> list[str]:
        """The questions it was trained to answer, one per kind (the page offers them as examples)."""
        from .lesions import QUESTIONS

        return [phrasings[0] for phrasings in QUESTIONS.values()]

    def describe(self) -> str:
        """One line for the model card: what it was trained on and how it scored on held-out slides."""
        c, check = self.card, self.card.get("check") or {}
        figures = ""
        if check:
            parts = []
            for category, q in check.get("questions", {}).items():
                low, high = q["interval"]
                parts.append(f"{category.replace('_', ' ')} {q['correct']}/{q['asked']} ({q['accuracy']:.2f}, 95 % CI "
                             f"{low:.2f}–{high:.2f}; {q['distinct_answers']} distinct answer"
                             f"{'s' if q['distinct_answers'] != 1 else ''})")
            cases = check.get("held_out_cases") or 0
            figures = (f"; on the {check['held_out_slides']} held-out test slides"
                       f"{f' and {cases} held-out cases of 2–3 of them' if cases else ''}: " + ", ".join(parts) +
                       f"; heatmap localisation AUC {check['localisation_auc']:.2f} (strict)")
        precision = c.get("precision") or {}
        ran = f"; features {precision['features']}, training {precision['training']}" if precision else ""
        return (f"{DEMO_DESCRIPTION} — {c['train_slides']} training slides of {', '.join(c['organs'])} with "
                f"{', '.join(c['lesions'])} (low/high grade) or no lesion{figures}{ran}")


_SOURCES = ("demo_model.py", "lesions.py", "scores.py", "lesion_slides.py", "slides.py")
# What turns a slide into features: a change to the tissue mask or the patch grid gives other features.
_EXTRACTION_SOURCES = ("tissue.py", "patching.py", "extraction.py", "encoder.py", "stain.py")


def demo_key(config: DemoBuildConfig, encoder_sha256: str, precision: str = "fp32/fp32") -> str:
    """The cache key: package version, the sources that shape the cohort and the build, settings, encoder.

    `precision` is the features' and the training's resolved precision (`build_precision`): a cache
    shared between machines must not serve a model trained on bf16 features to one that extracts fp32.
    """
    from .. import __version__

    digest = hashlib.sha256(f"{__version__}|{DEMO_FORMAT}|{encoder_sha256}|{precision}|".encode())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    package = Path(__file__).parent
    tower = package.parent / "vision_tower"
    for path in [*(package / name for name in _SOURCES), *(tower / name for name in _EXTRACTION_SOURCES)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_precision(extractor) -> str:
    """"<features>/<training>", as resolved on this machine (auto is bf16 where the CPU or GPU runs it)."""
    from ..train.phases import PhaseConfig, resolve_precision, training_device

    phase = PhaseConfig(phase=1, out="")
    return f"{extractor.precision}/{resolve_precision(phase, training_device(phase))}"


def demo_root() -> Path:
    """Where demo models are cached: `<user cache>/demo-model/`."""
    return user_cache_dir() / "demo-model"


def load_ready(folder: Path) -> DemoModel | None:
    """The demo model in `folder` when its build finished (demo.json is written last), else None."""
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        return None
    try:
        return DemoModel(folder, json.loads(card_path.read_text()))
    except (OSError, json.JSONDecodeError):
        return None


def ensure_demo_model(config: DemoBuildConfig | None = None, *, root: str | Path | None = None,
                      progress: ProgressFn | None = None, extractor=None) -> DemoModel:
    """The cached demo model for this code and data version; built first (minutes) when there is none.

    Builds of other versions in `root` are removed once the new one is ready. `extractor` is the
    `FeatureExtractor` to make the features with (default: the one the app would serve).
    """
    config = config or DemoBuildConfig()
    root = Path(root) if root is not None else demo_root()
    extractor = extractor or _default_extractor(config)
    folder = root / demo_key(config, extractor.encoder.weights_sha256, build_precision(extractor))
    ready = load_ready(folder)
    if ready is not None:
        logger.info("Demo model found in %s", folder)
        return ready
    demo = build_demo_model(folder, config, progress=progress, extractor=extractor)
    for other in root.iterdir():  # older versions: never used again
        if other.is_dir() and other != folder:
            shutil.rmtree(other, ignore_errors=True)
    return demo


STAGE_TEXT = {"cohort": "drawing the synthetic lesion slides", "features": "extracting patch features",
              "phase 1": "training phase 1 (the tower)", "phase 2": "training phase 2 (LoRA and the tower)",
              "validation": "checking the validation slides", "check": "scoring the held-out slides"}
STAGE_UNITS = {"cohort": "slides", "features": "slides", "phase 1": "steps", "phase 2": "steps",
               "validation": "slides", "check": "slides"}


def stage_text(stage: str) -> str:
    """The progress line of a stage; a retry's stages say which seed they train and why."""
    base, _, seed = stage.partition(" · seed ")
    text = STAGE_TEXT.get(base, base)
    return f"{text} — again with seed {seed}: the last seed failed the validation check" if seed else text


def expected_build_time() -> str:
    """How long the first build takes here, as measured on 2-core CPUs (docs/demo_model.md), or on a GPU."""
    import torch

    if torch.cuda.is_available():
        return "a few minutes on this GPU"
    from ..vision_tower.cpu_inference import oneDNN_bf16_available

    if oneDNN_bf16_available():
        return "6 to 12 minutes on 2 CPU cores with bfloat16, as this CPU has; less with more cores"
    return "20 to 35 minutes on 2 CPU cores without bfloat16, as this CPU is; less with more cores or a GPU"


@contextmanager
def build_progress(quiet: bool = False) -> Iterator[ProgressFn]:
    """A `ProgressFn` for `ensure_demo_model` that says what is happening and shows a bar per stage.

    Nothing is shown unless a build starts (a cached demo model reports no progress).
    """
    from ..progress import console, progress_bar

    state: dict = {"bar": None, "task": None, "stage": None}
    with ExitStack() as stack:
        def on_progress(stage: str, done: int | None, total: int | None) -> None:
            if state["bar"] is None:
                if not quiet:
                    console.print(f"[bold]Building the demo model[/] (first run only; {expected_build_time()}): "
                                  f"synthetic lesion slides → patch features → two-phase training on them. "
                                  f"It is cached in {demo_root()}; later starts take seconds.", highlight=False)
                state["bar"] = stack.enter_context(progress_bar(quiet))
            bar = state["bar"]
            if stage != state["stage"]:
                state["stage"] = stage
                state["task"] = bar.add_task(stage_text(stage), total=total,
                                             unit=STAGE_UNITS.get(stage.partition(" · ")[0], "it"))
            bar.update(state["task"], completed=done or 0, total=total)

        yield on_progress


def _default_extractor(config: DemoBuildConfig):
    from ..vision_tower.encoder import build_encoder_or_random
    from ..vision_tower.extraction import ExtractConfig, FeatureExtractor

    encoder = build_encoder_or_random(config.encoder)
    return FeatureExtractor(ExtractConfig(encoder=encoder.name, seed=config.seed, precision=config.precision), encoder)


def cohort_config(config: DemoBuildConfig):
    """The LesionCohortConfig a demo build draws."""
    from .lesions import LesionCohortConfig

    return LesionCohortConfig(per_combination=tuple(config.split_sizes), size=config.size, seed=config.seed,
                              **config.cohort)


def build_demo_model(folder: str | Path, config: DemoBuildConfig, *, progress: ProgressFn | None = None,
                     extractor=None) -> DemoModel:
    """Cohort → features → phase 1 → phase 2 → held-out check, in `folder`; each stage resumes if interrupted.

    A folder that already holds a finished build of these settings is returned as it is (whether or not
    this call would check it), so scoring a cached demo build never rewrites its model card; one built
    with other settings is refused, since its stages would be taken as done.
    """
    folder = Path(folder)
    wanted = _settings(asdict(config))
    ready = load_ready(folder)
    if ready is not None:
        if _settings(ready.card.get("build") or {}) != wanted:
            raise ChatEXAONEPathError(f"{folder.name} holds a demo build with other settings; build into another "
                                      f"folder.")
        return ready
    # An unfinished build records its settings first: resuming one made with others would take its
    # finished stages (a phase 1 of other epochs, say) as this build's.
    started = folder / BUILD_FILE
    try:
        previous = json.loads(started.read_text()) if started.is_file() else None
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous is not None and _settings(previous) != wanted:
        raise ChatEXAONEPathError(f"{folder.name} holds an unfinished demo build with other settings; build into "
                                  f"another folder, or remove it.")
    if previous is None and folder.is_dir() and any(folder.iterdir()):
        raise ChatEXAONEPathError(f"{folder.name} is not empty and holds no demo build; build into another folder.")
    atomic_write_json(started, asdict(config))
    report = progress or (lambda stage, done, total: None)
    extractor = extractor or _default_extractor(config)
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        started = time.perf_counter()
        report(name, None, None)
        result = fn()
        timings[name] = round(time.perf_counter() - started, 1)
        return result

    cohort = cohort_config(config)
    timed("cohort", lambda: _make_cohort(folder / "cohort", cohort, report))
    patches = timed("features", lambda: _extract(folder, extractor, report))
    example = _pick_example(folder)  # before any scoring: the rule must not see the model's answers
    attempts = []
    for attempt in range(1 + config.retries):
        seed = config.seed + attempt
        run = folder if attempt == 0 else folder / f"retry-{attempt}"
        tag = "" if attempt == 0 else f" · seed {seed}"
        if attempt:
            logger.warning("The demo build with seed %d failed its validation check; training again with seed %d.",
                           seed - 1, seed)
        seeded = DemoBuildConfig(**{**asdict(config), "seed": seed})
        p1 = timed(f"phase 1{tag}", lambda: _train(folder, run, seeded, 1, report, tag))
        p2 = timed(f"phase 2{tag}", lambda: _train(folder, run, seeded, 2, report, tag))
        validation = timed(f"validation{tag}", lambda: _validate(folder, run, config, report, tag))
        attempts.append({"seed": seed, "model": str((run / "model").relative_to(folder)), "phase1": p1,
                         "phase2": p2, "validation": validation})
        if validation["passed"]:
            break
    chosen = attempts[-1]
    check = timed("check", lambda: _check(folder, folder / chosen["model"], report)) if config.check else None
    card = _card(folder, config, cohort, extractor, patches, attempts, check, timings, example)
    atomic_write_json(folder / CARD_FILE, card)
    logger.info("Demo model built in %s (%.0f s)", folder, sum(timings.values()))
    return DemoModel(folder, json.loads((folder / CARD_FILE).read_text()))  # as a later start reads it


def _settings(build: dict) -> dict:
    """The settings that make a build what it is (whether it is checked changes nothing in it), as JSON has them
    (a tuple read back from build.json is a list)."""
    return json.loads(json.dumps({k: v for k, v in build.items() if k != "check"}))


def _make_cohort(out: Path, cohort, report: ProgressFn) -> None:
    from .lesions import make_lesion_cohort

    make_lesion_cohort(out, cohort, progress=lambda done, total: report("cohort", done, total))


def _extract(folder: Path, extractor, report: ProgressFn) -> int:
    from ..vision_tower.batch import extract_slides

    slides = sorted((folder / "cohort" / "slides").glob("*.tiff"))
    state = {"slides": 0}

    def on_slide_start(slide, n_patches):
        state["slides"] += 1  # counted in slides: the patch total is known only slide by slide
        report("features", state["slides"] - 1, len(slides))
        return None

    summary = extract_slides([folder / "cohort" / "slides"], folder / "features", extractor.config,
                             on_slide_start=on_slide_start, extractor=extractor)
    if summary.failed:
        raise ChatEXAONEPathError(f"{len(summary.failed)} of {len(slides)} synthetic slides failed to extract; "
                                  f"see {summary.errors_file}.")
    report("features", len(slides), len(slides))
    return sum(r.num_patches if r.num_patches >= 0 else _patches_in(folder / "features" / f"{r.slide_id}.h5")
               for r in summary.results)


def _patches_in(path: Path) -> int:
    """The patches of a features file: a slide extracted by an earlier, interrupted run is skipped, not counted."""
    from ..vision_tower.features import read_features

    return len(read_features(path).features)


def recipe_phase_config(recipe: DemoBuildConfig, phase: int, out: Path, init: Path | None = None) -> PhaseConfig:
    """The PhaseConfig of `phase` under the demo recipe (the quickstart trains with it too)."""
    from ..train.phases import PhaseConfig

    common = dict(batch_size=recipe.batch_size, gradient_accumulation=1, warmup_ratio=0.1, report_to="none",
                  save_total_limit=1, logging_steps=10, seed=recipe.seed, precision=recipe.precision,
                  patience=recipe.patience, validate_every=recipe.validate_every)
    if phase == 1:
        return PhaseConfig(phase=1, out=str(out), llm=recipe.llm, epochs=recipe.phase1_epochs,
                           learning_rate=recipe.phase1_lr, **common)
    return PhaseConfig(phase=2, out=str(out), init=str(init), epochs=recipe.phase2_epochs,
                       learning_rate=recipe.phase2_lr, tower_learning_rate=recipe.phase2_tower_lr, **common)


def recipe_data_config(recipe: DemoBuildConfig, phase: int, data: list[Path], features: Path,
                       val_data: list[Path] | None = None, **extra) -> DataConfig:
    """The DataConfig of `phase` under the demo recipe: phase 1 subsamples each slide, phase 2 sees it whole;
    the validation slides' records (never the test slides') choose the checkpoint."""
    from ..train.data import DataConfig

    return DataConfig(data=[str(p) for p in data], features_dir=str(features),
                      val_data=[str(p) for p in val_data or []], val_fraction=0.0,
                      max_patches=recipe.phase1_max_patches if phase == 1 else None, seed=recipe.seed, **extra)


def step_progress(stage: str, report: ProgressFn):
    """A Trainer callback that reports each optimiser step of `stage` as (stage, step, max steps)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report(stage, state.global_step, state.max_steps)

    return Progress()


SCORED_QUESTIONS = ("diagnosis", "organ", "grade", "margins")  # lesions.SCORED, without importing it at start-up
CASE_QUESTIONS_SCORED = ("case_diagnosis", "which_slide")  # lesions.CASE_SCORED, likewise
PHASE_DATA = {1: ("captions.json", "val_captions.json"), 2: ("instruct.json", "val_instruct.json")}


def _train(folder: Path, run: Path, config: DemoBuildConfig, phase: int, report: ProgressFn, tag: str = "") -> dict:
    from ..train.phases import train_phase

    out = run / ("p1" if phase == 1 else "model")
    if (out / "config.json").is_file() and (out / "training_args.json").is_file():
        return json.loads((out / "training_args.json").read_text()).get("result", {})
    train_file, val_file = (folder / "cohort" / name for name in PHASE_DATA[phase])
    phase_config = recipe_phase_config(config, phase, out, run / "p1")
    data = recipe_data_config(config, phase, [train_file], folder / "features", [val_file])
    result = train_phase(phase_config, data, resume=out.is_dir(),
                         callbacks=[step_progress(f"phase {phase}{tag}", report)])
    return {"steps": result.global_step, "train_loss": result.train_loss, "records": result.train_records,
            "selection": result.selection}


def answer_spread(answers: list[dict]) -> dict[str, dict]:
    """Per question: how many slides were asked, how many distinct answers they got, the commonest's share."""
    from collections import Counter

    spread = {}
    for category in dict.fromkeys(a["category"] for a in answers):
        given = Counter(" ".join(a["answer"].lower().split()) for a in answers if a["category"] == category)
        asked = sum(given.values())
        spread[category] = {"asked": asked, "distinct_answers": len(given),
                            "top_share": max(given.values()) / asked if asked else 0.0}
    return spread


def validation_verdict(accuracy: dict[str, float], spread: dict[str, dict], config: DemoBuildConfig) -> list[str]:
    """Why a build fails its validation check, one reason per failed rule; empty when it passes."""
    reasons = []
    if accuracy.get("diagnosis", 0.0) < config.pass_diagnosis:
        reasons.append(f"diagnosis accuracy {accuracy.get('diagnosis', 0.0):.2f} < {config.pass_diagnosis:.2f}")
    for category, s in spread.items():
        if s["asked"] > 1 and s["top_share"] >= config.max_answer_share:
            reasons.append(f"one answer to {s['top_share']:.0%} of the {category} questions")
    return reasons


def _validate(folder: Path, run: Path, config: DemoBuildConfig, report: ProgressFn, tag: str = "") -> dict:
    """Score the validation slides (the test slides stay unseen) and say whether the build learned."""
    from ..chat.modeling import ChatEXAONEPathForCausalLM
    from .scores import CohortView, score_lesion_cohort

    stage = f"validation{tag}"
    model = ChatEXAONEPathForCausalLM.from_pretrained(run / "model")
    view = CohortView.load(folder / "cohort", folder / "features", split="val")
    report(stage, 0, len(view.ids))
    score = score_lesion_cohort(model, view, on_slide=lambda done, total: report(stage, done, total))
    spread = answer_spread(score.answers)
    reasons = validation_verdict(score.accuracy, spread, config)
    if reasons:
        logger.warning("Validation check failed: %s.", "; ".join(reasons))
    return {"slides": len(view.ids), "accuracy": score.accuracy, "answers": spread, "passed": not reasons,
            "reasons": reasons}


def _check(folder: Path, model_dir: Path, report: ProgressFn) -> dict:
    """Score the held-out slides, and the held-out cases after them (the check's bar counts both)."""
    from ..chat.modeling import ChatEXAONEPathForCausalLM
    from ..eval.stats import wilson_interval
    from .scores import DESCRIPTION, CaseView, CohortView, score_cases, score_lesion_cohort

    model = ChatEXAONEPathForCausalLM.from_pretrained(model_dir)
    view = CohortView.load(folder / "cohort", folder / "features")
    cases = CaseView.load(folder / "cohort", folder / "features") if _has_cases(folder, "test") else None
    total = len(view.ids) + (len(cases.cases) if cases else 0)
    report("check", 0, total)
    score = score_lesion_cohort(model, view, categories=(*SCORED_QUESTIONS, DESCRIPTION),
                                on_slide=lambda done, _: report("check", done, total))
    case_answers = score_cases(model, cases, on_case=lambda done, _: report("check", len(view.ids) + done, total)
                               ).answers if cases else []
    questions = {}
    for answers in (score.answers, case_answers):  # the case questions next to the slide questions
        for category, s in answer_spread(answers).items():
            correct = sum(a["correct"] for a in answers if a["category"] == category)
            questions[category] = {"asked": s["asked"], "correct": correct, "accuracy": correct / s["asked"],
                                   "interval": list(wilson_interval(correct, s["asked"])),
                                   "distinct_answers": s["distinct_answers"], "top_share": s["top_share"]}
    facts = [f for a in score.answers if a["category"] == DESCRIPTION for f in a["facts"].values()]
    return {"held_out_slides": len(view.ids), "held_out_cases": len(cases.cases) if cases else 0,
            "accuracy": score.accuracy | {q: questions[q]["accuracy"] for q in CASE_QUESTIONS_SCORED if q in questions},
            "questions": questions, "description_facts": sum(facts) / len(facts) if facts else None,
            "localisation_auc": score.localisation_auc, "localisation_auc_lenient": score.localisation_auc_lenient,
            "per_slide_auc": score.per_slide_auc, "answers": score.answers, "case_answers": case_answers}


def _has_cases(folder: Path, split: str) -> bool:
    """Whether the build's cohort has cases of `split` (a cohort with too few lesion-free slides may have none)."""
    from .lesions import read_lesion_cases

    path = folder / "cohort" / "cases.csv"
    return path.is_file() and any(c.split == split for c in read_lesion_cases(path))


def _pick_example(folder: Path) -> dict:
    """The example slide, by a rule that never sees the model: the held-out lesion slide whose lesion is largest
    (ties by id). Picking the slide a check scored best would hide a model that gives every slide one answer."""
    from .lesions import NO_LESION, read_lesion_labels

    rows = read_lesion_labels(folder / "cohort" / "labels.csv")
    candidates = sorted(sid for sid, row in rows.items() if row["split"] == "test" and row["diagnosis"] != NO_LESION)
    if not candidates:
        raise ChatEXAONEPathError("The demo cohort has no held-out slide with a lesion; give it more slides.")
    chosen = min(candidates, key=lambda sid: (-float(rows[sid]["lesion_fraction"]), sid))
    row = rows[chosen]
    return {"slide": chosen, "organ": row["organ"], "diagnosis": row["diagnosis"], "grade": row["grade"],
            "lesion_fraction": float(row["lesion_fraction"])}


def _card(folder, config, cohort, extractor, patches, attempts, check, timings, example) -> dict:
    from .lesions import read_lesion_labels

    rows = read_lesion_labels(folder / "cohort" / "labels.csv")
    chosen = attempts[-1]
    training = _training_precision(folder / chosen["model"])
    return {"what": DEMO_DESCRIPTION, "format": DEMO_FORMAT, "build": asdict(config), "cohort": asdict(cohort),
            "organs": list(cohort.organs), "lesions": list(cohort.lesions),
            "train_slides": sum(r["split"] == "train" for r in rows.values()),
            "test_slides": sum(r["split"] == "test" for r in rows.values()), "patches": patches,
            "encoder": extractor.encoder.name, "encoder_weights": extractor.encoder.weights_source,
            "precision": {"features": extractor.precision, "training": training},
            "model": chosen["model"], "seed": chosen["seed"], "attempts": attempts,
            "validation": chosen["validation"], "phase1": chosen["phase1"], "phase2": chosen["phase2"],
            "check": check, "example": example, "seconds": timings}


def _training_precision(model_dir: Path) -> str | None:
    """The precision a checkpoint trained in, as its training_args.json records it."""
    try:
        args = json.loads((model_dir / "training_args.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return args.get("precision") or (args.get("phase_config") or {}).get("precision")
