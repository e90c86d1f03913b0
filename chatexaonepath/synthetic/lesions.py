"""The lesion cohort: normal tissue of an organ carrying a small lesion, a report each, QA data, masks.

The proof that training learns (bench/learn_lesions.py) and the demo model's training data
(synthetic/demo_model.py). Each slide shows one organ's normal tissue (colon, liver, lymph node); three
in four carry one lesion (adenocarcinoma, squamous cell carcinoma, melanoma; low or high grade) told apart
by its morphology in the organ's own palette (synthetic/lesion_slides.py: colour statistics cannot
find it). Three splits, each holding every organ × diagnosis combination with the grades balanced within
each lesion type: `train` (lesions cover 0.5–3 % of the tissue, in one or two foci), `val` and `test`
(exactly 1 %, one focus). Settings are chosen on `val`; `test` is only scored. Layout of `DIR`:

    slides/<slide_id>.tiff   pyramidal synthetic slides, each with its own stain and scanner look
    masks/<slide_id>.png     the lesion mask at 1/8 of level 0: the lesion's share of each pixel (0–255)
    reports/<slide_id>.txt   one short report per slide (organ, diagnosis, grade, margins), for RAIDER
    labels.csv               slide_id, organ, diagnosis, grade, margins, lesion_fraction, foci, pigment, split
    captions.json            phase-1 data (training slides): "Describe this slide." → organ, finding, grade, margins
    instruct.json            phase-2 data (training slides): diagnosis, organ, grade and margins questions
    val_captions.json        the same two for the validation slides (training validates on them)
    val_instruct.json
    test.json                held-out slides: one conversation per question, first phrasing; then the
                             held-out cases: one conversation per case question, first phrasing
    cases.csv                case_id, organ, split, slides (ids in the case's order, space-separated),
                             lesion_slide (1-based position; empty: none), diagnosis
    cohort.json              the LesionCohortConfig that made it

Cases: within each split, slides of one organ are put together into cases of 2–3 slides of which at most one
carries a lesion (a lesion slide with one or two of the split's lesion-free slides of that organ, and a few
cases of lesion-free slides only). The lesion-free slides are few (a quarter), so one can sit in several cases;
a case never leaves its slides' split. Their phase-2 records (`image` a list of the slides, named `<id>.tiff`
as the app names an uploaded slide) ask "Which slide shows the lesion?" (answered as the slide labels name
the slide: `Slide 2 (les-0007.tiff).`, or that none does) and "What is the diagnosis of this case?", with
paraphrases in training; they follow the single-slide records in instruct.json, val_instruct.json and test.json.

Slide ids (`les-0007`) are in a seeded random order: they reveal nothing. Files are written atomically; a
rerun keeps the slides already written, so an interrupted run resumes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..assets import usable_cores
from ..chat.conversation import slide_label
from ..errors import ChatEXAONEPathError
from ..fileio import atomic_write_json, atomic_write_text, atomic_write_with
from .lesion_slides import GRADES, LESION_TYPES, ORGANS, LesionSpec, make_lesion_slide
from .tissue_cohort import llava_record

logger = logging.getLogger(__name__)

NO_LESION = "none"
SPLITS = ("train", "val", "test")
QUESTIONS = {  # the held-out slides are asked the first phrasing; training uses them all
    "diagnosis": ("What is the diagnosis?", "What lesion does this slide show?", "What is the final diagnosis?"),
    "organ": ("Which organ is this tissue from?", "What organ does this section come from?"),
    "grade": ("What is the grade of the lesion?", "How would you grade this lesion?"),
    "margins": ("Are the margins involved?", "Does the lesion reach the margin?"),
}
CAPTION_PROMPT = "Describe this slide."
# Phase 2 also teaches a short description (organ, finding, grade, margins in two to three sentences) and an
# honest answer to what the slide cannot tell: without them the model answers any other question with one of
# its four attributes, picked as if it knew.
DESCRIBE_QUESTIONS = ("Describe the slide.", "Describe what you see on this slide.", "What does this slide show?",
                      "Give a short description of the slide.")
OTHER_QUESTIONS = ("How old is the patient?", "What treatment would you recommend?", "What is the mitotic count?",
                   "Is the tumour HER2 positive?", "What is the prognosis?", "Was the specimen a biopsy or a resection?")
OUT_OF_SCOPE = ("I cannot tell that from this slide; I can only name its organ, its lesion, the lesion's grade "
                "and whether it reaches the margin.")
CATEGORY_ORDERS = (("diagnosis", "organ", "grade", "margins"), ("diagnosis", "grade", "margins", "organ"),
                   ("organ", "margins", "diagnosis", "grade"), ("grade", "margins", "organ", "diagnosis"))
SCORED = ("diagnosis", "organ", "grade", "margins")  # what bench/learn_lesions.py reports per question
DIAGNOSIS_ANSWERS = {"adenocarcinoma": "Adenocarcinoma.", "squamous cell carcinoma": "Squamous cell carcinoma.",
                     "melanoma": "Melanoma.", NO_LESION: "No lesion; normal tissue."}
FINDINGS = {
    "adenocarcinoma": "crowded, irregular malignant glands lined by stratified atypical nuclei",
    "squamous cell carcinoma": "nests of atypical squamous cells with keratin pearls and intercellular bridges",
    "melanoma": "sheets of atypical epithelioid cells with large nuclei and prominent nucleoli",
}
# Case questions (a case: 2–3 slides of one organ, at most one with a lesion); held-out cases get the first phrasing.
CASE_QUESTIONS = {
    "case_diagnosis": ("What is the diagnosis of this case?", "What is the diagnosis for this case?",
                       "What do these slides show?"),
    "which_slide": ("Which slide shows the lesion?", "On which slide is the lesion?",
                    "Which of these slides carries the lesion?"),
}
CASE_SCORED = tuple(CASE_QUESTIONS)  # what bench/learn_lesions.py reports per case question
NO_SLIDE_ANSWER = "None of the slides shows a lesion."
CASE_SIZES = (2, 3)
ORGAN_FINDINGS = {"colon": "colonic mucosa with regular crypts", "liver": "liver with plates of hepatocytes",
                  "lymph node": "lymph node with sheets of small lymphocytes and germinal centres"}


@dataclass
class LesionCohortConfig:
    """What `synth lesions` draws; saved as cohort.json."""

    # Slides per organ × diagnosis combination in each split (train, val, test): with three organs and four
    # diagnoses (three lesion types and none), (3, 1, 2) is 36 / 12 / 24 slides, a quarter of each without a lesion.
    per_combination: tuple[int, int, int] = (3, 1, 2)
    organs: list[str] = field(default_factory=lambda: list(ORGANS))
    lesions: list[str] = field(default_factory=lambda: list(LESION_TYPES))
    size: int = 3072  # level-0 side at `mpp` (3072 px at 0.5 µm/px: about 90 tissue patches of 256²)
    mpp: float = 0.5
    lesion_area: tuple[float, float] = (0.005, 0.03)  # of the tissue, training slides
    eval_lesion_area: float = 0.01  # of the tissue, every validation and test slide with a lesion
    pigment_share: float = 1 / 3  # melanomas with melanin (never the only cue: the others have none)
    stain_variation: float = 1.0  # how far each slide's stain and scanner stray from the reference (0: none)
    seed: int = 0

    def __post_init__(self) -> None:
        self.lesion_area = tuple(self.lesion_area)
        self.per_combination = tuple(int(n) for n in self.per_combination)
        for name, values, known in (("organ", self.organs, ORGANS), ("lesion", self.lesions, LESION_TYPES)):
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ChatEXAONEPathError(f"Unknown or no {name} {unknown[:1]}; choose from {', '.join(known)}.")
        if len(self.per_combination) != 3 or min(self.per_combination) < 1:
            raise ChatEXAONEPathError(f"Every split needs at least one slide per organ and diagnosis; got "
                                      f"{self.per_combination} (train, validation, test).")
        low, high = self.lesion_area
        if not 0.0 < low <= high < 0.5 or not 0.0 < self.eval_lesion_area < 0.5:
            raise ChatEXAONEPathError(f"Lesion areas must be fractions of the tissue in (0, 0.5), low ≤ high; got "
                                      f"{self.lesion_area} and {self.eval_lesion_area}.")
        if self.stain_variation < 0:
            raise ChatEXAONEPathError(f"--stain-variation must be 0 or more, got {self.stain_variation}.")
        if not 0.0 <= self.pigment_share <= 1.0:
            raise ChatEXAONEPathError(f"--pigment-share must be in [0, 1], got {self.pigment_share}.")
        if self.size * self.mpp < 1024:
            raise ChatEXAONEPathError(f"Slides of {self.size} px at {self.mpp} µm/px are too small for small lesions "
                                      f"among enough patches; use --size {int(1024 / self.mpp)} or more.")

    @property
    def diagnoses(self) -> list[str]:
        """The diagnosis classes: each lesion type, and no lesion."""
        return [*self.lesions, NO_LESION]

    @property
    def slides(self) -> int:
        """How many slides the cohort has."""
        return sum(self.per_combination) * len(self.organs) * len(self.diagnoses)


@dataclass
class LesionSlide:
    """One slide of the cohort and everything true about it."""

    slide_id: str
    organ: str
    diagnosis: str  # a lesion type or NO_LESION
    grade: str | None  # "low" / "high", None without a lesion
    margins: str | None  # "involved" / "clear", None without a lesion
    lesion_fraction: float  # of the tissue; 0 without a lesion
    foci: int
    split: str
    seed: int
    pigment: bool = False

    @property
    def spec(self) -> LesionSpec:
        if self.diagnosis == NO_LESION:
            return LesionSpec(self.organ)
        return LesionSpec(self.organ, self.diagnosis, self.grade, self.lesion_fraction, self.foci,
                          self.margins == "involved", self.pigment)


def plan_lesion_cohort(config: LesionCohortConfig) -> list[LesionSlide]:
    """Who gets what: every organ × diagnosis in every split, grades and margins alternating so that each
    lesion type's grades are balanced within a split (as far as its count allows), ids in a seeded order."""
    rng = np.random.default_rng(config.seed)
    planned, melanomas = [], 0
    for split, count in zip(SPLITS, config.per_combination):
        for o, organ in enumerate(config.organs):
            for d, diagnosis in enumerate(config.diagnoses):
                for k in range(count):
                    lesion = diagnosis != NO_LESION
                    grade = GRADES[(k + o + d) % 2] if lesion else None
                    margins = ("involved" if (k + o + d // 2) % 2 else "clear") if lesion else None
                    if split == "train" and lesion:
                        fraction = float(rng.uniform(*config.lesion_area))
                        foci = 2 if fraction >= 0.015 and rng.random() < 0.5 else 1
                    else:
                        fraction, foci = (config.eval_lesion_area, 1) if lesion else (0.0, 0)
                    pigment = False
                    if diagnosis == "melanoma":  # every third melanoma (of a pigment share of 1/3) has melanin
                        melanomas += 1
                        pigment = (melanomas * config.pigment_share) % 1.0 < config.pigment_share - 1e-9
                    planned.append((organ, diagnosis, grade, margins, fraction, foci, split, pigment))
    order = rng.permutation(len(planned))
    slides = []
    for i, index in enumerate(order):
        organ, diagnosis, grade, margins, fraction, foci, split, pigment = planned[index]
        slides.append(LesionSlide(f"les-{i:04d}", organ, diagnosis, grade, margins, fraction, foci, split,
                                  config.seed * 100_003 + i, pigment))
    return slides


# -- what the reports and the answers say ------------------------------------------------------------------
def answers_for(slide: LesionSlide) -> dict[str, str]:
    """The short answer to each question category (the reference the scoring checks against)."""
    lesion = slide.diagnosis != NO_LESION
    return {
        "diagnosis": DIAGNOSIS_ANSWERS[slide.diagnosis],
        "organ": f"{slide.organ.capitalize()}.",
        "grade": f"{slide.grade.capitalize()} grade." if lesion else "Not applicable; there is no lesion.",
        "margins": ("Involved; the lesion reaches the margin." if slide.margins == "involved" else
                    "Clear; the lesion does not reach the margin.") if lesion else "Not applicable; there is no lesion.",
    }


def caption(slide: LesionSlide) -> str:
    """The phase-1 caption: what the slide shows — organ, finding, grade, margins — in a fixed short form."""
    if slide.diagnosis == NO_LESION:
        return f"{slide.organ.capitalize()}; no lesion, normal tissue."
    return f"{slide.organ.capitalize()}; {slide.diagnosis}, {slide.grade} grade; margins {slide.margins}."


def description(slide: LesionSlide) -> str:
    """The phase-2 answer to "Describe the slide.": organ, finding, grade and margins in plain sentences."""
    organ = f"This is a section of {slide.organ}."
    if slide.diagnosis == NO_LESION:
        return f"{organ} There is no lesion; the tissue is normal."
    article = "an" if slide.diagnosis[0] in "aeiou" else "a"
    margins = ("The margins are involved; the lesion reaches the margin." if slide.margins == "involved" else
               "The margins are clear; the lesion does not reach the margin.")
    return f"{organ} It shows {article} {slide.diagnosis} of {slide.grade} grade. {margins}"


def report_text(slide: LesionSlide) -> str:
    """A short synthetic pathology report: specimen, final diagnosis, grade, margins, microscopy."""
    answers = answers_for(slide)
    if slide.diagnosis == NO_LESION:
        diagnosis, micro = f"{slide.organ.capitalize()}: no lesion identified; normal tissue.", ""
    else:
        diagnosis = f"{slide.organ.capitalize()}: {slide.diagnosis}, {slide.grade} grade."
        micro = (f" A focus of {FINDINGS[slide.diagnosis]} occupies about {slide.lesion_fraction:.1%} of the "
                 f"tissue{' in two foci' if slide.foci == 2 else ''}.")
    return (f"SYNTHETIC PATHOLOGY REPORT (generated, not a patient record)\nSlide: {slide.slide_id}\n\n"
            f"SPECIMEN: {slide.organ.capitalize()}.\n\nFINAL DIAGNOSIS:\n{diagnosis}\n\n"
            f"GRADE: {answers['grade']}\nMARGINS: {answers['margins']}\n\n"
            f"MICROSCOPIC DESCRIPTION:\nSections show {ORGAN_FINDINGS[slide.organ]}.{micro}\n")


def _training_records(slide: LesionSlide) -> tuple[dict, list[dict]]:
    """A slide's caption record and its three QA conversations (two asking every category, one for its
    description and a question it cannot answer)."""
    answers = answers_for(slide)
    caption_record = llava_record(f"{slide.slide_id}-cap", slide.slide_id, [(CAPTION_PROMPT, caption(slide))])
    # Two conversations per slide, each asking every category: one sequence carries the system prompt
    # once for four answers (training time is per token), and each category comes first in one of them.
    qa = []
    for k, order in enumerate((CATEGORY_ORDERS[slide.seed % 2], CATEGORY_ORDERS[2 + slide.seed % 2])):
        turns = [(QUESTIONS[c][(slide.seed + k) % len(QUESTIONS[c])], answers[c]) for c in order]
        qa.append(llava_record(f"{slide.slide_id}-qa{k}", slide.slide_id, turns))
    qa.append(llava_record(f"{slide.slide_id}-qa2", slide.slide_id, [
        (DESCRIBE_QUESTIONS[slide.seed % len(DESCRIBE_QUESTIONS)], description(slide)),
        (OTHER_QUESTIONS[slide.seed % len(OTHER_QUESTIONS)], OUT_OF_SCOPE)]))
    return caption_record, qa


def lesion_records(slides: list[LesionSlide]) -> dict[str, list[dict]]:
    """captions.json, instruct.json, val_captions.json, val_instruct.json and test.json as LLaVA records (each
    split's cases after its slides)."""
    files: dict[str, list[dict]] = {"captions.json": [], "instruct.json": [], "val_captions.json": [],
                                    "val_instruct.json": [], "test.json": []}
    for slide in slides:
        if slide.split == "test":
            answers = answers_for(slide)
            for category in SCORED:
                if category in ("grade", "margins") and slide.diagnosis == NO_LESION:
                    continue
                files["test.json"].append(llava_record(f"{slide.slide_id}-{category}", slide.slide_id,
                                                       [(QUESTIONS[category][0], answers[category])]))
            files["test.json"].append(llava_record(f"{slide.slide_id}-description", slide.slide_id,
                                                   [(DESCRIBE_QUESTIONS[0], description(slide))]))
            continue
        prefix = "val_" if slide.split == "val" else ""
        caption_record, qa = _training_records(slide)
        files[f"{prefix}captions.json"].append(caption_record)
        files[f"{prefix}instruct.json"] += qa
    for case in plan_cases(slides):  # after the single-slide records: their order and meaning stay as they were
        name = "test.json" if case.split == "test" else f"{'val_' if case.split == 'val' else ''}instruct.json"
        files[name] += case_records(case)
    return files


# -- cases ----------------------------------------------------------------------------------------------------
@dataclass
class LesionCase:
    """A case of the cohort: 2–3 slides of one organ and split, at most one of them with a lesion."""

    case_id: str
    organ: str
    split: str
    slide_ids: tuple[str, ...]  # in the case's order: slide 1, 2, …
    lesion_slide: int | None  # 1-based position of the slide with the lesion; None: no slide has one
    diagnosis: str  # the lesion slide's diagnosis, or NO_LESION

    @property
    def names(self) -> list[str]:
        """The slides as the case's `image` list and the slide labels name them (`les-0007.tiff`, as the app names
        a slide file), so training sees the labels the app shows the LLM."""
        return [f"{sid}.tiff" for sid in self.slide_ids]


def plan_cases(slides: list[LesionSlide]) -> list[LesionCase]:
    """The cases of a cohort, per split and organ: each lesion slide with one or two (alternately) of the lesion-free
    slides of its organ and split, its position cycling through the case; and up to as many cases of lesion-free
    slides only as there are lesion-free slides (distinct sets of 2–3). Drawn from the slides' own seeds, so a
    cohort always gets the same cases; ids in a seeded order (they reveal nothing)."""
    from itertools import combinations

    rng = np.random.default_rng([int(s.seed) for s in slides] or [0])
    planned: list[tuple] = []
    positions = {size: 0 for size in CASE_SIZES}  # per case size, where the next lesion goes: positions balance
    for split in SPLITS:
        organs = dict.fromkeys(s.organ for s in slides if s.split == split)
        for organ in organs:
            mine = sorted((s for s in slides if s.split == split and s.organ == organ), key=lambda s: s.slide_id)
            normal = [s.slide_id for s in mine if s.diagnosis == NO_LESION]
            lesion = [s for s in mine if s.diagnosis != NO_LESION]
            if normal:
                for j, slide in enumerate(lesion):
                    size = min(CASE_SIZES[j % len(CASE_SIZES)], 1 + len(normal))
                    others = [normal[i] for i in rng.choice(len(normal), size - 1, replace=False)]
                    at = positions[size] % size
                    positions[size] += 1
                    planned.append((organ, split, tuple(others[:at] + [slide.slide_id] + others[at:]), at + 1,
                                    slide.diagnosis))
            sets = [c for size in sorted(CASE_SIZES, reverse=True) for c in combinations(normal, size)]
            for chosen in sets[:len(normal)]:
                order = rng.permutation(len(chosen))
                planned.append((organ, split, tuple(chosen[i] for i in order), None, NO_LESION))
    ids = rng.permutation(len(planned))
    return [LesionCase(f"case-{ids[i]:04d}", *plan) for i, plan in enumerate(planned)]


def case_answers(case: LesionCase) -> dict[str, str]:
    """The short answer to each case question: the lesion slide named as its label names it (or none), and the
    case's diagnosis in the words the single-slide diagnosis uses."""
    which = (slide_label(case.lesion_slide, case.names[case.lesion_slide - 1]).rstrip(":") + "."
             if case.lesion_slide else NO_SLIDE_ANSWER)
    return {"which_slide": which, "case_diagnosis": DIAGNOSIS_ANSWERS[case.diagnosis]}


def _case_record(record_id: str, case: LesionCase, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA record about a case: `image` lists its slides, one `<image>` for them all (SlideChat's layout)."""
    return {**llava_record(record_id, case.names[0], turns), "image": case.names}


def case_records(case: LesionCase) -> list[dict]:
    """A held-out case: one record per case question, first phrasing. Else two conversations, each asking both
    questions (each question first in one of them), the phrasings rotating with the case."""
    answers = case_answers(case)
    if case.split == "test":
        return [_case_record(f"{case.case_id}-{q}", case, [(CASE_QUESTIONS[q][0], answers[q])]) for q in CASE_SCORED]
    k = int(case.case_id.rsplit("-", 1)[1])
    return [_case_record(f"{case.case_id}-qa{n}", case,
                         [(CASE_QUESTIONS[q][(k + n) % len(CASE_QUESTIONS[q])], answers[q]) for q in order])
            for n, order in enumerate((CASE_SCORED, CASE_SCORED[::-1]))]


CASE_FIELDS = ("case_id", "organ", "split", "slides", "lesion_slide", "diagnosis")


def _write_cases(path: Path, cases: list[LesionCase]) -> None:
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(CASE_FIELDS)
    for c in sorted(cases, key=lambda c: c.case_id):
        writer.writerow([c.case_id, c.organ, c.split, " ".join(c.slide_ids), c.lesion_slide or "", c.diagnosis])
    atomic_write_text(path, table.getvalue())


def read_lesion_cases(path: str | Path) -> list[LesionCase]:
    """cases.csv → its cases, by id."""
    with open(path, newline="") as f:
        return [LesionCase(row["case_id"], row["organ"], row["split"], tuple(row["slides"].split()),
                           int(row["lesion_slide"]) if row["lesion_slide"] else None, row["diagnosis"])
                for row in csv.DictReader(f)]


LABEL_FIELDS = ("slide_id", "organ", "diagnosis", "grade", "margins", "lesion_fraction", "foci", "pigment", "split")


def _write_labels(path: Path, slides: list[LesionSlide]) -> None:
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(LABEL_FIELDS)
    for s in slides:
        writer.writerow([s.slide_id, s.organ, s.diagnosis, s.grade or "", s.margins or "", f"{s.lesion_fraction:.4f}",
                         s.foci, "yes" if s.pigment else "", s.split])
    atomic_write_text(path, table.getvalue())


def read_lesion_labels(path: str | Path) -> dict[str, dict[str, str]]:
    """labels.csv → {slide_id: row} (strings, as written)."""
    with open(path, newline="") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


def _write_mask(path: Path, mask: np.ndarray) -> None:
    import cv2

    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), mask):
            raise ChatEXAONEPathError(f"Could not write the lesion mask {path.name}.")

    atomic_write_with(path, write)  # a temp name unique per writer: two builds may share a cohort folder


def read_lesion_mask(path: str | Path) -> np.ndarray:
    """masks/<slide_id>.png → uint8 lesion fractions at 1/MASK_DOWNSAMPLE of level 0 (0: none, 255: all lesion)."""
    import cv2

    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ChatEXAONEPathError(f"Could not read the lesion mask {path}.")
    return mask


def _slide_paths(out: Path, slide: LesionSlide) -> tuple[Path, Path]:
    return out / "slides" / f"{slide.slide_id}.tiff", out / "masks" / f"{slide.slide_id}.png"


def _paint(out: Path, slide: LesionSlide, config: LesionCohortConfig) -> None:
    path, mask_path = _slide_paths(out, slide)
    _, mask = make_lesion_slide(path, slide.spec, (config.size, config.size), config.mpp, slide.seed,
                                stain_variation=config.stain_variation)
    _write_mask(mask_path, mask)  # last: a slide with its mask is complete


def drawing_threads(jobs: int) -> int:
    """How many slides to paint at once: one per core (at most 8), never more than there are slides."""
    return max(1, min(usable_cores(), 8, jobs))


def make_lesion_cohort(out: str | Path, config: LesionCohortConfig,
                       progress: Callable[[int, int], None] | None = None, threads: int | None = None) -> dict[str, Path]:
    """Write the cohort into `out` (slides already there are kept); returns the main paths.

    Missing slides are painted `threads` at a time (default: one per core). Threads, not processes:
    painting is numpy, OpenCV and compression, which release the GIL, and a thread needs no fresh
    interpreter (a spawned process re-imports whatever program called this, the app included).
    """
    out = Path(out)
    for sub in ("slides", "masks", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    previous = out / "cohort.json"
    settings = json.loads(json.dumps(asdict(config)))
    if previous.is_file() and json.loads(previous.read_text()) != settings:
        raise ChatEXAONEPathError(f"{out} holds a cohort made with other settings; choose another --out.")
    slides = plan_lesion_cohort(config)
    for slide in slides:
        atomic_write_text(out / "reports" / f"{slide.slide_id}.txt", report_text(slide))
    todo = [slide for slide in slides if not all(p.is_file() for p in _slide_paths(out, slide))]
    done = len(slides) - len(todo)
    if progress is not None:
        progress(done, len(slides))
    pool = ThreadPoolExecutor(max_workers=threads or drawing_threads(len(todo)))
    try:
        for future in as_completed([pool.submit(_paint, out, slide, config) for slide in todo]):
            future.result()
            done += 1
            if progress is not None:
                progress(done, len(slides))
    finally:  # the first failure (or Ctrl-C) stops the rest; the slides finished so far are kept
        pool.shutdown(wait=True, cancel_futures=True)
    for name, records in lesion_records(slides).items():
        atomic_write_json(out / name, records)
    _write_labels(out / "labels.csv", slides)
    _write_cases(out / "cases.csv", plan_cases(slides))
    atomic_write_json(previous, settings)
    logger.info("Lesion cohort in %s: %d slides (%d held out)", out, len(slides), sum(s.split == "test" for s in slides))
    return {name: out / name for name in ("slides", "masks", "reports", "labels.csv", "captions.json",
                                          "instruct.json", "val_captions.json", "val_instruct.json", "test.json",
                                          "cases.csv", "cohort.json")}
