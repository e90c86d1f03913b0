"""Closed-ended test sets as the benchmarks ship them → one `ClosedItem` per question.

- WSI-Bench `*_choice_test.json`: LLaVA records whose question lists `A) … B) … C) … D) …` inline and
  whose reference answer is the letter; `*_TF_question_test.json`: the reference is `Yes` / `No`.
  In every LLaVA file `image` may also be a list of 1–8 slides (a case, as `eval run` reads it): the
  question is answered over all of them, each labelled, and the shuffled baseline swaps whole cases.
  `image` is the authors' path (`TCGA-LUSC/<slide>.pt`); the features are found under `--features`
  as that path, or as `<slide>.h5/.pt` in that subfolder or flat.
- SlideBench-VQA CSV (SlideChat): columns `ID, Slide, Tumor, Broad Category, Narrow Category,
  Question, A, B, C, D, Answer`; the answer is a letter or one option's text; features under
  `<Tumor>/<Slide>` or `<Slide>`.
- Any LLaVA JSON/JSONL: every exchange whose question lists lettered options and whose reference is
  one of them, or whose reference is yes/no. Other exchanges are listed as not closed-ended — except
  in a file named like WSI-Bench's closed files, where every question must parse (a refusal naming the
  file and record, never a silently smaller test set).

Malformed input raises EvalError naming the file and the row or record.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..chat.conversation import Turn, turns_from_llava
from ..constants import IMAGE_TOKEN
from ..errors import ChatEXAONEPathError
from ..patients import slide_key
from .choices import LETTERS, NO, YES, letter_answer, split_options, yes_no_answer
from .criteria import EvalError
from .data import read_records, record_images, resolve_features

CSV_REQUIRED = ("ID", "Slide", "Question", "Answer")
STRICT_NAMES = ("_choice", "_tf_question", "_tf")  # WSI-Bench's closed files: every question must parse


@dataclass
class ClosedItem:
    """One closed-ended question: the prompt, its options, the right choice, where it came from."""

    id: str
    file: str  # the data file's name: accuracy is reported per file
    row: str  # "record 12" / "row 7": where it is in that file
    image: str  # the slide as the data names it (a case's first slide)
    features: Path | None  # None when not found (for a case: when any of its slides' is not)
    turns: list[Turn]  # what the model is asked (earlier reference exchanges, then this question)
    question: str  # this question as asked, options included
    options: dict[str, str]  # {letter: text}, or {"Yes": "Yes", "No": "No"}
    answer: str  # the right choice: a letter, "Yes" or "No"
    category: str
    subcategory: str | None = None
    case_features: tuple[Path, ...] = ()  # a case: every slide's features, in order (`features` is the first's)
    case_names: tuple[str, ...] = ()  # how the case's labels name its slides
    absent: str | None = None  # the first slide whose features were not found: the one an error must name

    @property
    def kind(self) -> str:
        return "yes/no" if set(self.options) == {YES, NO} else "choice"

    @property
    def slide(self) -> str:
        """The slide's id: questions are clustered by it in the intervals, and it names the patient."""
        return slide_key(self.image)

    def answer_fields(self) -> dict:
        """What an answer record carries about the question (answers.jsonl)."""
        return {"id": self.id, "file": self.file, "image": self.image, "slide": self.slide,
                "features": str(self.features) if self.features else None, "question": self.question,
                "options": self.options, "reference": self.answer, "kind": self.kind, "category": self.category,
                "subcategory": self.subcategory,
                **({"case": [str(p) for p in self.case_features]} if self.case_features else {})}


@dataclass
class ClosedSet:
    """The closed-ended items of one or more files, and the exchanges that were not closed-ended."""

    items: list[ClosedItem]
    not_closed: list[dict] = field(default_factory=list)  # {file, row, reason}


def load_closed_items(paths: list[str | Path], features_dir: str | Path | None = None, *, instruction: str = "",
                      require_features: bool = True) -> ClosedSet:
    """Every closed-ended question of `paths` (ids prefixed `<file stem>:` when several files are given)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise EvalError("Give at least one --data file.")
    features_dir = Path(features_dir) if features_dir else None
    if features_dir is not None and not features_dir.is_dir():
        raise EvalError(f"Features folder not found: {features_dir}.")
    result = ClosedSet([])
    for path in paths:
        part = _csv_items(path, features_dir) if path.suffix.lower() == ".csv" else _llava_items(path, features_dir)
        if len(paths) > 1:
            for item in part.items:
                item.id = f"{path.stem}:{item.id}"
        result.items += part.items
        result.not_closed += part.not_closed
    _check_unique(result.items)
    if not result.items:
        raise EvalError(f"No closed-ended question (lettered options or a yes/no reference) in "
                        f"{', '.join(map(str, paths))}.")
    if instruction.strip():
        for item in result.items:
            last = item.turns[-1]
            item.turns[-1] = Turn(last.role, f"{last.content}\n{instruction.strip()}")
    if require_features:
        _check_features(result.items, features_dir)
    return result


def _check_unique(items: list[ClosedItem]) -> None:
    seen: dict[str, ClosedItem] = {}
    for item in items:
        if item.id in seen:
            raise EvalError(f"{item.file} {item.row} repeats the id {item.id!r} of {seen[item.id].row}; ids must be "
                            "unique.")
        seen[item.id] = item


def _check_features(items: list[ClosedItem], features_dir: Path | None) -> None:
    missing = [i for i in items if i.features is None]
    if not missing:
        return
    first = missing[0]
    where = f"in {features_dir}" if features_dir else "(give --features DIR)"
    raise EvalError(f"{len(missing)} of {len(items)} questions have no features file {where} (first: slide "
                    f"{first.absent or first.image!r}, {first.file} {first.row}). Extract them with "
                    "`chatexaonepath slide extract`.")


def _category_of(path: Path) -> str:
    """`Diagnosis_choice_test.json` → `Diagnosis_choice`: WSI-Bench's files are its categories."""
    stem = path.stem
    return stem[: -len("_test")] if stem.lower().endswith("_test") else stem


def _llava_items(path: Path, features_dir: Path | None) -> ClosedSet:
    strict = any(mark in path.stem.lower() for mark in STRICT_NAMES)
    out = ClosedSet([])
    for number, record in enumerate(read_records(path, "Test data"), 1):
        where = f"record {number}"
        record_id = str(record.get("id") or f"{path.stem}-{number}")
        images = record_images(record, f"{path} {where} ({record_id})")
        try:
            turns = turns_from_llava(record.get("conversations"))
        except ChatEXAONEPathError as e:
            raise EvalError(f"{path} {where} ({record_id}): {e}") from e
        pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
        if not pairs:
            raise EvalError(f"{path} {where} ({record_id}) has no gpt reply to use as the answer key.")
        resolved = [resolve_features(image, features_dir, path.parent) for image in images]
        case = tuple(resolved) if len(images) > 1 and all(resolved) else ()
        names = tuple(Path(image).name for image in images) if len(images) > 1 else ()
        metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
        for n, (human, gpt) in enumerate(pairs):
            item_id = record_id if len(pairs) == 1 else f"{record_id}#{n + 1}"
            options, answer, problem = _closed_answer(human.content, gpt.content)
            if problem:
                if strict:
                    raise EvalError(f"{path} {where} ({item_id}): {problem}.")
                out.not_closed.append({"file": path.name, "row": where, "id": item_id, "reason": problem})
                continue
            message = record["conversations"][2 * n]
            category = message.get("category") or record.get("category") or metadata.get("category") \
                or _category_of(path)
            out.items.append(ClosedItem(
                id=item_id, file=path.name, row=where, image=images[0],
                features=resolved[0] if all(resolved) else None, turns=turns[: 2 * n + 1],
                question=human.content.replace(IMAGE_TOKEN, "").strip(), options=options, answer=answer,
                category=str(category), case_features=case, case_names=names,
                absent=next((image for image, r in zip(images, resolved) if r is None), None)))
    return out


def _closed_answer(question: str, reference: str) -> tuple[dict[str, str], str, str | None]:
    """(options, right choice, None) for a closed-ended exchange, else ({}, "", why it is not one)."""
    _, options = split_options(question.replace(IMAGE_TOKEN, ""))
    if options:
        letter = letter_answer(reference, options)
        if letter is None:
            return {}, "", (f"its answer {reference.strip()[:60]!r} is not one of its options "
                            f"{', '.join(options)}")
        return options, letter, None
    yes_no = yes_no_answer(reference)
    if yes_no is not None:
        return {YES: YES, NO: NO}, yes_no, None
    return {}, "", "its question lists no lettered options and its answer is not yes or no"


def _csv_items(path: Path, features_dir: Path | None) -> ClosedSet:
    if not path.is_file():
        raise EvalError(f"Test data file not found: {path}.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalError(f"{path} is not a readable CSV ({e}).") from e
    if not rows:
        raise EvalError(f"{path} is empty; SlideBench-VQA files start with a header row "
                        "(ID, Slide, Tumor, Broad Category, Narrow Category, Question, A, B, C, D, Answer).")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in CSV_REQUIRED if c not in header]
    letters = [c for c in LETTERS if c in header]
    if missing or len(letters) < 2:
        raise EvalError(f"{path} row 1 (the header) lacks {', '.join(missing) or 'option columns A, B, …'}; "
                        "SlideBench-VQA has ID, Slide, Tumor, Broad Category, Narrow Category, Question, A, B, C, D, "
                        "Answer.")
    out = ClosedSet([])
    for number, cells in enumerate(rows[1:], 2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise EvalError(f"{path} row {number} has {len(cells)} cells; the header has {len(header)}.")
        row = dict(zip(header, (c.strip() for c in cells)))
        empty = [c for c in CSV_REQUIRED if not row[c]]
        if empty:
            raise EvalError(f"{path} row {number} has an empty {', '.join(empty)}.")
        options = {letter: row[letter] for letter in letters if row[letter]}
        answer = letter_answer(row["Answer"], options)
        if len(options) < 2 or answer is None:
            raise EvalError(f"{path} row {number}: the answer {row['Answer'][:60]!r} is not one of its options "
                            f"{', '.join(options) or '(none)'}.")
        listed = "\n".join(f"{letter}) {text}" for letter, text in options.items())
        question = f"{row['Question']}\n{listed}"
        tumor = row.get("Tumor") or None
        out.items.append(ClosedItem(
            id=row["ID"], file=path.name, row=f"row {number}", image=row["Slide"],
            features=resolve_features(row["Slide"], features_dir, path.parent, subfolders=(tumor,) if tumor else ()),
            turns=[Turn("user", f"{IMAGE_TOKEN}\n{question}")], question=question, options=options, answer=answer,
            category=row.get("Broad Category") or _category_of(path), subcategory=row.get("Narrow Category") or None))
    if not out.items:
        raise EvalError(f"{path} has a header but no rows.")
    return out
