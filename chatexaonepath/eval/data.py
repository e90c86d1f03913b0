"""Evaluation inputs and the run folder's record files.

- Test data: LLaVA-format JSON/JSONL; every gpt turn is a reference answer to the human turn
  before it, so a record with three exchanges gives three test items.
- The report each item is judged against (first match wins): the record's `report` text; its
  `report_id` as `REPORTS/<report_id>.txt`; `REPORTS/<slide id>.txt` for the record's `image`; else
  the record's own reference answers, marked `report_source: "reference"`.
- Answers files (`answers.jsonl`, or any system's answers for `eval judge`): `id`, `question`,
  `answer`, and `report` text or a `report_id` resolved in the reports folder.
- `JsonlLog`: append + flush per record, so a killed job loses only what was in flight.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..chat.conversation import Turn, turns_from_llava
from ..constants import IMAGE_TOKEN, MAX_CASE_SLIDES
from ..errors import ChatEXAONEPathError
from .criteria import EvalError
from ..fileio import atomic_write_text
from ..patients import slide_key
from ..raider.ingest import report_id_problem
from ..vision_tower.features import FEATURE_SUFFIXES
from .judge import JudgeItem

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm",
                  ".png", ".jpg", ".jpeg"}


# --- files --------------------------------------------------------------------------------------------
class JsonlLog:
    """An append-only JSONL file of records keyed by `id`; the last record of an id wins."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict]:
        """Every complete record; a line cut off by a kill is dropped (and removed before the next append)."""
        if not self.path.exists():
            return []
        records = []
        with self.path.open("rb") as f:
            data = f.read()
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("%s line %d is incomplete (a killed run); it will be redone.", self.path, number)
                continue
            if isinstance(record, dict) and "id" in record:
                records.append(record)
        return records

    def latest(self) -> dict[str, dict]:
        """id → its last record."""
        return {str(r["id"]): r for r in self.records()}

    def _trim_partial_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):  # a record cut off mid-line: drop it, or the next one is glued to it
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict, durable: bool = False) -> None:
        """Write one record as one line and flush it to the OS (survives a killed process).

        The line goes out in a single O_APPEND write, so writers in several processes (two reviewers'
        servers) never interleave within a line; `durable` also fsyncs it (survives a power cut).
        """
        if not getattr(self, "_checked", False):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._trim_partial_tail()
            self._checked = True
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replace the file atomically (compaction: one record per id)."""
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_records(path: Path, what: str) -> list[dict]:
    """The objects of a JSON list or a JSONL file; malformed input raises EvalError naming the file and line."""
    if not path.exists():
        raise EvalError(f"{what} file not found: {path}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}).") from e
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise EvalError(f"{path} line {number} is not valid JSON ({e.msg}).") from e
            if not isinstance(records[-1], dict):
                raise EvalError(f"{path} line {number} is not a JSON object.")
    else:
        try:
            records = json.loads(text)
        except ValueError as e:
            raise EvalError(f"{path} is not valid JSON: {e.msg} at line {getattr(e, 'lineno', '?')}, "
                            f"column {getattr(e, 'colno', '?')}.") from e
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None) \
            if isinstance(records, list) else 0
        if bad is not None:
            raise EvalError(f"{path} must hold a list of JSON objects; record {bad + 1} is not one.")
    if not records:
        raise EvalError(f"{path} holds no records.")
    return records


def _field(record: dict, name: str) -> str | None:
    value = record.get(name)
    if value is None and isinstance(record.get("metadata"), dict):
        value = record["metadata"].get(name)
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _unique(ids: list[str], where: Path) -> None:
    seen, duplicates = set(), []
    for i in ids:
        (duplicates.append(i) if i in seen else seen.add(i))
    if duplicates:
        raise EvalError(f"{where} has duplicate ids ({', '.join(sorted(set(duplicates))[:5])}); ids must be unique.")


# --- test data ----------------------------------------------------------------------------------------
@dataclass
class TestItem:
    """One question of the test set: the prompt turns, the reference answer and the report."""

    __test__ = False  # not a pytest class, despite the name

    id: str
    record_id: str
    image: str
    features: Path | None  # None when no features file was found
    turns: list[Turn]  # the reference conversation so far, ending with this question
    question: str
    reference: str
    report: str
    report_id: str | None
    report_source: str  # record | file | reference
    category: str | None = None
    organ: str | None = None
    case_features: tuple[Path, ...] = ()  # a case: every slide's features, in order (`features` is the first's)
    case_names: tuple[str, ...] = ()  # how the case's labels name its slides

    @property
    def slide(self) -> str:
        """The slide's id (its file name without suffix): what questions are clustered by."""
        return slide_key(self.image)

    def answer_fields(self) -> dict:
        """The fields an answer record carries about this item (docs/evaluation.md, answers.jsonl)."""
        return {"id": self.id, "record_id": self.record_id, "image": self.image, "slide": self.slide,
                "features": str(self.features), "question": self.question, "reference": self.reference,
                "report": self.report, "report_id": self.report_id, "report_source": self.report_source,
                "category": self.category, "organ": self.organ,
                **({"case": [str(p) for p in self.case_features]} if self.case_features else {})}


def slide_stem(image: str) -> str:
    """`TCGA-XX-0001.svs` → `TCGA-XX-0001`; ids with dots that are not slide suffixes are kept whole."""
    path = Path(image)
    return path.stem if path.suffix.lower() in SLIDE_SUFFIXES else path.name


def resolve_features(image: str, features_dir: Path | None, data_dir: Path,
                     subfolders: tuple[str, ...] = ()) -> Path | None:
    """The features file of a record's `image`: a .h5/.pt path, or a slide id in the features folder.

    Shipped data names files as they were on its authors' disks (`TCGA-LUSC/<slide>.pt`); the same
    slide extracted here may be `<slide>.h5`, flat or in that subfolder, so those are looked for too
    (`subfolders`: other folders under the features folder to look in, e.g. SlideBench's tumour type).
    """
    path = Path(image)
    candidates: list[Path] = []
    if path.suffix.lower() in FEATURE_SUFFIXES:
        candidates += [path] if path.is_absolute() else [*([features_dir / path] if features_dir else []),
                                                         data_dir / path, path]
    if features_dir is not None:
        names = dict.fromkeys([path.name, slide_stem(image), slide_key(image)])
        parent = [] if path.is_absolute() or str(path.parent) in ("", ".") else [str(path.parent)]
        folders = [features_dir / f for f in (*subfolders, *parent)] + [features_dir]
        candidates += [folder / f"{name}{suffix}" for folder in folders for name in names for suffix in FEATURE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def load_test_items(data: str | Path, features_dir: str | Path | None = None,
                    reports_dir: str | Path | None = None) -> list[TestItem]:
    """Test items of a LLaVA-format file, one per gpt turn; features and reports resolved (not loaded)."""
    data = Path(data)
    features_dir = Path(features_dir) if features_dir else None
    reports_dir = Path(reports_dir) if reports_dir else None
    if features_dir is not None and not features_dir.is_dir():
        raise EvalError(f"Features folder not found: {features_dir}.")
    if reports_dir is not None and not reports_dir.is_dir():
        raise EvalError(f"Reports folder not found: {reports_dir}.")
    items: list[TestItem] = []
    absent: list[str] = []
    for index, record in enumerate(read_records(data, "Test data")):
        record_id = _field(record, "id") or f"item{index:05d}"
        images = record_images(record, f"Record {record_id} of {data}")
        image = images[0]
        try:
            turns = turns_from_llava(record.get("conversations"))
        except ChatEXAONEPathError as e:
            raise EvalError(f"Record {record_id} of {data}: {e}") from e
        pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
        if not pairs:
            raise EvalError(f"Record {record_id} of {data} has no gpt reply to use as a reference answer.")
        report, report_id, source = _record_report(record, image, reports_dir, pairs)
        resolved = [resolve_features(i, features_dir, data.parent) for i in images]
        absent += [i for i, r in zip(images, resolved) if r is None][:1]  # a case names its missing slide
        case = tuple(resolved) if len(images) > 1 and all(resolved) else ()
        names = tuple(Path(i).name for i in images) if len(images) > 1 else ()
        for n, (human, gpt) in enumerate(pairs):
            message = record["conversations"][2 * n]
            items.append(TestItem(
                id=record_id if len(pairs) == 1 else f"{record_id}#{n + 1}", record_id=record_id, image=image,
                features=resolved[0] if all(resolved) else None, turns=turns[: 2 * n + 1],
                question=human.content.replace(IMAGE_TOKEN, "").strip(), reference=gpt.content.strip(),
                report=report, report_id=report_id, report_source=source,
                category=message.get("category") or _field(record, "category"), organ=_field(record, "organ"),
                case_features=case, case_names=names))
    _unique([i.id for i in items], data)
    missing = [i for i in items if i.features is None]
    if missing:
        where = f"in {features_dir}" if features_dir else "(give --features DIR)"
        raise EvalError(f"{len(missing)} of {len(items)} test items have no features file {where} "
                        f"(first: image {absent[0]!r}); extract them with `chatexaonepath slide extract`.")
    sources = {s: sum(i.report_source == s for i in items) for s in ("record", "file", "reference")}
    if sources["reference"]:
        logger.warning("%d test item(s) have no report (no 'report', 'report_id' or REPORTS/<slide id>.txt): "
                       "they are judged against their record's reference answers.", sources["reference"])
    return items


def record_images(record: dict, where: str) -> list[str]:
    """A record's slides: `image` as one id or path, or a list of 1–8 of them (a case); `where` names the record
    in the one-sentence refusal (e.g. "Record r1 of test.json")."""
    image = record.get("image")
    images = [str(i).strip() for i in image] if isinstance(image, list) else [_field(record, "image")]
    if not images or not all(images):
        raise EvalError(f"{where} has no 'image' (a slide id or a features path, or a list of them for a case).")
    if len(images) > MAX_CASE_SLIDES:
        raise EvalError(f"{where} lists {len(images)} slides; a case has at most {MAX_CASE_SLIDES}.")
    return images


def item_images(item) -> list[str]:
    """Every slide a test item (or closed-ended item) asks about, by name: its case's slides, else its one slide
    (a case's patients are all checked against training, not only its first slide's)."""
    return list(getattr(item, "case_names", ()) or ()) or [item.image]


def _record_report(record: dict, image: str, reports_dir: Path | None, pairs: list) -> tuple[str, str | None, str]:
    text = record.get("report")
    if isinstance(text, str) and text.strip():
        return text, _field(record, "report_id"), "record"
    report_id = _field(record, "report_id")
    if report_id is not None:
        return read_report(report_id, reports_dir), report_id, "file"
    if reports_dir is not None and (reports_dir / f"{slide_stem(image)}.txt").exists():
        return read_report(slide_stem(image), reports_dir), slide_stem(image), "file"
    lines = ["Reference answers taken from the report:"]
    lines += [f"Q: {q.content.replace(IMAGE_TOKEN, '').strip()}\nA: {a.content.strip()}" for q, a in pairs]
    return "\n".join(lines), None, "reference"


def read_report(report_id: str, reports_dir: Path | None) -> str:
    """The text of `REPORTS/<report_id>.txt`."""
    if reports_dir is None:
        raise EvalError(f"A record names report_id {report_id!r} but no --reports folder was given.")
    problem = report_id_problem(report_id)
    if problem:  # before the filesystem answers with a raw "File name too long"
        raise EvalError(problem)
    path = reports_dir / f"{report_id}.txt"
    if not path.exists():
        raise EvalError(f"Report {report_id!r} not found: {path} does not exist.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EvalError(f"Report {path} is empty.")
    return text


# --- answers files ------------------------------------------------------------------------------------
def load_answers(path: str | Path, reports_dir: str | Path | None = None) -> list[JudgeItem]:
    """Judge items from an answers JSONL (`id`, `question`, `answer`, and `report` or `report_id`)."""
    path = Path(path)
    reports_dir = Path(reports_dir) if reports_dir else None
    if reports_dir is not None and not reports_dir.is_dir():
        raise EvalError(f"Reports folder not found: {reports_dir}.")
    items, cache = [], {}
    for number, record in enumerate(read_records(path, "Answers"), 1):
        absent = [k for k in ("id", "question", "answer") if not isinstance(record.get(k), (str, int))]
        if absent:
            raise EvalError(f"Record {number} of {path} lacks {', '.join(absent)} (each needs id, question, answer).")
        report = record.get("report")
        report_id = _field(record, "report_id")
        if not (isinstance(report, str) and report.strip()):
            if report_id is None:
                raise EvalError(f"Record {record['id']} of {path} has neither 'report' text nor a 'report_id'.")
            if report_id not in cache:
                cache[report_id] = read_report(report_id, reports_dir)
            report = cache[report_id]
        slide = _field(record, "slide") or _field(record, "image")
        items.append(JudgeItem(str(record["id"]), str(record["question"]).replace(IMAGE_TOKEN, "").strip(),
                               str(record["answer"]), report, report_id, _field(record, "category"),
                               _field(record, "organ"), slide_key(slide) if slide else None))
    _unique([i.id for i in items], path)
    return items
