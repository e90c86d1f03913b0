"""A synthetic cohort: slides of known tissue classes, a short report each, caption and QA data, a split.

It is the proof that training learns: after `slide extract` on `slides/`, phase 1 on `captions.json`
and phase 2 on `instruct.json`, the chat answer to "What is the diagnosis?" on the held-out slides
(`test.json`) should name the right class. Layout of `DIR` (docs/training.md):

    slides/<slide_id>.tiff   pyramidal synthetic H&E slides (synthetic/slides.py)
    reports/<slide_id>.txt   one short report per slide (RAIDER ingests these; mapped to slides by stem)
    labels.csv               slide_id,class,split
    captions.json            phase-1 data (training slides): "Describe this slide." → caption
    instruct.json            phase-2 data (training slides): diagnosis questions → the class
    test.json                held-out slides: "What is the diagnosis?" → the class
    cohort.json              the CohortConfig that made it

Slide ids (`syn-0007`) do not reveal the class. Files are written atomically, and a rerun keeps the
slides already written, so an interrupted run resumes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ChatEXAONEPathError
from ..fileio import atomic_write_text
from .slides import make_synthetic_slide

logger = logging.getLogger(__name__)

DIAGNOSIS_QUESTION = "What is the diagnosis?"
CAPTION_PROMPT = "Describe this slide."
# Other phrasings for the instruction set; the test always asks DIAGNOSIS_QUESTION.
QUESTION_BANK = ("What tissue type does this slide show?", "Which tissue dominates this section?",
                 "What is the most likely diagnosis?")


@dataclass(frozen=True)
class ClassText:
    """How reports and answers talk about one tissue class."""

    answer: str  # the short diagnosis, naming the class
    finding: str  # what the microscope shows


CLASS_TEXT = {
    "tumor": ClassText("Tumor.", "solid sheets of crowded, enlarged, hyperchromatic nuclei"),
    "stroma": ClassText("Stroma.", "fibrous connective tissue with sparse spindle-shaped nuclei"),
    "normal": ClassText("Normal tissue.", "regular glands lined by small, uniform nuclei"),
    "necrosis": ClassText("Necrosis.", "granular debris with small pyknotic and fragmented nuclei"),
    "lymphoid": ClassText("Lymphoid tissue.", "dense sheets of small, round, dark lymphocytes"),
    "adipose": ClassText("Adipose tissue.", "large empty fat vacuoles separated by thin septa"),
}


MIN_SIDE_UM = 384.0


@dataclass
class CohortConfig:
    """What `synth cohort` draws; saved as cohort.json."""

    slides: int = 60
    # Adipose is left out by default: its pale fat vacuoles often fall under the tissue detector's threshold.
    classes: list[str] = field(default_factory=lambda: ["tumor", "stroma", "normal", "necrosis", "lymphoid"])
    size: int = 1024  # level-0 width and height in pixels (≈ 12 tissue patches of 256² at 0.5 µm/px)
    mpp: float = 0.5  # level-0 µm/px
    test_fraction: float = 0.25  # of each class's slides, held out
    questions_per_slide: int = 2  # instruction records per training slide
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in CLASS_TEXT]
        if unknown:
            raise ChatEXAONEPathError(f"Unknown tissue class {unknown[0]!r}; choose from {', '.join(CLASS_TEXT)}.")
        if len(set(self.classes)) < 2:
            raise ChatEXAONEPathError("A cohort needs at least 2 different tissue classes (3 or more to be a test).")
        if self.slides < 2 * len(self.classes):
            raise ChatEXAONEPathError(f"--slides {self.slides} is too few for {len(self.classes)} classes; "
                                      f"give at least {2 * len(self.classes)} (two per class: train and test).")
        if not 0.0 < self.test_fraction < 1.0:
            raise ChatEXAONEPathError(f"--test-fraction must be between 0 and 1, got {self.test_fraction}.")
        if self.size * self.mpp < MIN_SIDE_UM:  # less tissue than the default detector keeps (0.05 mm²)
            raise ChatEXAONEPathError(f"Slides of {self.size} px at {self.mpp} µm/px are too small to hold detectable "
                                      f"tissue; use --size {int(MIN_SIDE_UM / self.mpp)} or more.")
        if self.questions_per_slide < 1:
            raise ChatEXAONEPathError(f"--questions must be at least 1, got {self.questions_per_slide}.")


@dataclass
class CohortSlide:
    """One slide of the cohort."""

    slide_id: str
    tissue: str
    split: str  # "train" or "test"
    seed: int


def plan_cohort(config: CohortConfig) -> list[CohortSlide]:
    """Which slide gets which class and split: classes in turn, the last slides of each class held out."""
    slides = [CohortSlide(f"syn-{i:04d}", config.classes[i % len(config.classes)], "train", config.seed * 100_003 + i)
              for i in range(config.slides)]
    for tissue in config.classes:
        members = [s for s in slides if s.tissue == tissue]
        held_out = min(len(members) - 1, max(1, round(config.test_fraction * len(members))))
        for slide in members[len(members) - held_out:]:
            slide.split = "test"
    return slides


def report_text(slide: CohortSlide) -> str:
    """A short synthetic pathology report that names the class."""
    text = CLASS_TEXT[slide.tissue]
    return (f"SYNTHETIC PATHOLOGY REPORT (generated, not a patient record)\n"
            f"Slide: {slide.slide_id}\n\n"
            f"FINAL DIAGNOSIS:\n{text.answer}\n\n"
            f"MICROSCOPIC DESCRIPTION:\nThe section shows {text.finding}.\n")


def caption(tissue: str) -> str:
    """The phase-1 caption of a slide of `tissue`: the diagnosis and the finding."""
    text = CLASS_TEXT[tissue]
    return f"{text.answer[:-1]}: {text.finding}."


def llava_record(record_id: str, slide_id: str, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA-format record of (question, answer) turns about a slide; `<image>` opens the first question."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations += [{"from": "human", "value": f"<image>\n{question}" if i == 0 else question},
                          {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": slide_id, "conversations": conversations}


def cohort_records(slides: list[CohortSlide], questions_per_slide: int) -> dict[str, list[dict]]:
    """captions.json, instruct.json and test.json as lists of LLaVA records."""
    captions, instruct, test = [], [], []
    for slide in slides:
        answer = CLASS_TEXT[slide.tissue].answer
        if slide.split == "test":
            test.append(llava_record(f"{slide.slide_id}-dx", slide.slide_id, [(DIAGNOSIS_QUESTION, answer)]))
            continue
        captions.append(llava_record(f"{slide.slide_id}-cap", slide.slide_id,
                                     [(CAPTION_PROMPT, caption(slide.tissue))]))
        questions = (DIAGNOSIS_QUESTION, *QUESTION_BANK)
        for q in range(questions_per_slide):
            turns = [(questions[(q + slide.seed) % len(questions)] if q else DIAGNOSIS_QUESTION, answer)]
            if q == 1:  # some multi-turn conversations, as RAIDER data has them
                turns.append(("Describe the main finding.", f"The section shows {CLASS_TEXT[slide.tissue].finding}."))
            instruct.append(llava_record(f"{slide.slide_id}-q{q}", slide.slide_id, turns))
    return {"captions.json": captions, "instruct.json": instruct, "test.json": test}


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


MAX_DRAWS = 5


def draw_slide(path: Path, slide: CohortSlide, config: CohortConfig) -> None:
    """Draw one slide; redraw the rare one whose tissue the default extraction settings miss.

    Pale classes (normal glands, fat) sometimes fall under the tissue detector's threshold on small
    slides; the cohort is meant to go through `slide extract` with its defaults, so every slide must.
    """
    from ..errors import NoTissueError
    from ..vision_tower.patching import patch_grid
    from ..vision_tower.slide import open_slide
    from ..vision_tower.tissue import segment_tissue

    for attempt in range(MAX_DRAWS):
        make_synthetic_slide(path, slide.tissue, (config.size, config.size), config.mpp,
                             slide.seed + attempt * 1_000_003)
        try:
            with open_slide(path) as opened:
                patch_grid(opened, segment_tissue(opened))
            return
        except NoTissueError:
            logger.info("%s: no tissue detected on draw %d, drawing again", slide.slide_id, attempt + 1)
    path.unlink(missing_ok=True)
    raise ChatEXAONEPathError(f"Could not draw a {slide.tissue} slide whose tissue the detector finds in {MAX_DRAWS} "
                              f"tries; use a larger --size (got {config.size}).")


def make_cohort(out: str | Path, config: CohortConfig,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Path]:
    """Write the cohort into `out` (slides already there are kept); returns the main paths."""
    out = Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    previous = out / "cohort.json"
    if previous.is_file() and json.loads(previous.read_text()) != asdict(config):
        raise ChatEXAONEPathError(f"{out} holds a cohort made with other settings; choose another --out.")
    slides = plan_cohort(config)
    for done, slide in enumerate(slides, 1):
        path = out / "slides" / f"{slide.slide_id}.tiff"
        if not path.is_file():  # written atomically: a file that exists is complete
            draw_slide(path, slide, config)
        _write_text(out / "reports" / f"{slide.slide_id}.txt", report_text(slide))
        if progress is not None:
            progress(done, len(slides))
    for name, records in cohort_records(slides, config.questions_per_slide).items():
        _write_text(out / name, json.dumps(records, indent=1))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["slide_id", "class", "split"])
    writer.writerows([s.slide_id, s.tissue, s.split] for s in slides)
    _write_text(out / "labels.csv", table.getvalue())
    _write_text(previous, json.dumps(asdict(config), indent=2))
    logger.info("Cohort in %s: %d slides (%d held out), classes %s", out, len(slides),
                sum(s.split == "test" for s in slides), ", ".join(config.classes))
    return {name: out / name for name in ("slides", "reports", "labels.csv", "captions.json", "instruct.json",
                                          "test.json", "cohort.json")}


def read_labels(path: str | Path) -> dict[str, tuple[str, str]]:
    """labels.csv → {slide_id: (class, split)}."""
    with open(path, newline="") as f:
        return {row["slide_id"]: (row["class"], row["split"]) for row in csv.DictReader(f)}


# -- scoring --------------------------------------------------------------------------------------------------
def named_classes(answer: str, classes: list[str]) -> set[str]:
    """The classes an answer names (as whole words, case-insensitive)."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    return {c for c in classes if c in words}


def diagnosis_correct(answer: str, truth: str, classes: list[str]) -> bool:
    """Right when the answer names the true class and no other one."""
    return named_classes(answer, classes) == {truth}


@dataclass
class DiagnosisScore:
    """How often the chat answer to the diagnosis question names the right class."""

    accuracy: float
    answers: list[dict]  # {"slide", "truth", "answer", "correct"} per held-out slide


def ask_about_features(model, features_path: str | Path, question: str, max_new_tokens: int = 16) -> str:
    """The chat answer (greedy, through ChatSession, as `chatexaonepath chat` gives it) about a features file."""
    from ..chat.session import ChatSession
    from ..vision_tower.features import read_features

    session = ChatSession(model, max_new_tokens=max_new_tokens)
    session.use_features(read_features(features_path), features_path)
    return session.ask(question).text


def score_diagnoses(model, cohort_dir: str | Path, features_dir: str | Path, split: str = "test") -> DiagnosisScore:
    """Ask DIAGNOSIS_QUESTION about every slide of `split`; right when the answer names the true class only."""
    cohort_dir, features_dir = Path(cohort_dir), Path(features_dir)
    config = CohortConfig(**json.loads((cohort_dir / "cohort.json").read_text()))
    answers = []
    for slide_id, (truth, slide_split) in read_labels(cohort_dir / "labels.csv").items():
        path = features_dir / f"{slide_id}.h5"
        if slide_split != split or not path.is_file():
            continue
        answer = ask_about_features(model, path, DIAGNOSIS_QUESTION)
        answers.append({"slide": slide_id, "truth": truth, "answer": answer,
                        "correct": diagnosis_correct(answer, truth, config.classes)})
    if not answers:
        raise ChatEXAONEPathError(f"No {split} slide of {cohort_dir} has features in {features_dir}.")
    return DiagnosisScore(sum(a["correct"] for a in answers) / len(answers), answers)
