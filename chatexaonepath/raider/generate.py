"""RAIDER generation: for each (report, question), retrieved chunks → a short, constrained answer.

The question bank and the resumable, concurrent loop that applies the answer rules (rules.py): every finished (report, question) is appended to a log and flushed, so a killed run
loses only what was in flight, and a rerun asks only what is missing — or what was answered from
another version of its report. records.py turns the log into training data.

Answers are never reused across versions of a report (the index's `report_versions`, recorded
with every answer) or across settings that shape them (the log's header, `answer_settings`).
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..backends import BackendError
from ..errors import ChatEXAONEPathError
from ..fileio import read_yaml
from .chunking import SECTION_PATTERNS
from .rules import (  # noqa: F401 - the rules are part of generation's public names
    ANSWER_RULES, CAPTION_MAX_WORDS, CAPTION_RULES, DATA_RULE, MAX_WORDS, NOT_MENTIONED, answer_messages,
    answer_problems, caption_messages, normalize_answer, unsupported_words,
)

if TYPE_CHECKING:
    from ..backends import TextBackend
    from .index import ChunkIndex

logger = logging.getLogger(__name__)

PROMPT_VERSION = "raider-answer-v2"


def _code_version(path: Path) -> str:
    """A hash of a module's code without its comments and docstrings (editing prose changes nothing)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:12]


# The answer checks' own version: a logged answer checked under other rules is checked again on resume
# (and a rejected one asked again, which costs requests: hence code only, not prose).
RULES_VERSION = _code_version(Path(__file__).parent / "rules.py")
# What retrieval looks for when writing a slide's caption (phase-1 data).
CAPTION_QUERY = "final diagnosis, tumour type and grade, main microscopic findings"
# Phase-1 instructions; one per slide, chosen by the slide id so reruns give the same data.
CAPTION_INSTRUCTIONS = (
    "Describe this slide.",
    "Summarise the findings in this whole-slide image.",
    "Give a brief pathology description of this slide.",
    "What does this slide show? Answer as a short report.",
)
# Where a caption is looked for in a headed report: never its header of titles, identifiers and disclaimers.
CAPTION_SECTIONS = ("diagnosis", "synoptic", "microscopic", "comment")


@dataclass(frozen=True)
class Question:
    """One phrasing of a question in a category."""

    category: str
    text: str
    # The report sections the answer is retrieved from (chunking.SECTION_PATTERNS names); empty: all of them.
    # A headed report's other text (its header of titles, identifiers and disclaimers, the gross description
    # for a grade) is then never an excerpt, so a small answerer cannot pick its words up.
    sections: tuple[str, ...] = ()


def load_questions(path: str | Path | None = None) -> list[Question]:
    """The question bank: `path`, or the default `questions.yaml` shipped with the package."""
    raw = read_yaml(path, __package__, "questions.yaml", "Question bank")
    categories = raw.get("categories") if isinstance(raw, dict) else None
    if not isinstance(categories, list) or not categories:
        raise ChatEXAONEPathError(f"{path or 'questions.yaml'} needs a non-empty 'categories' list.")
    questions = []
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not category.get("id") or not category.get("questions"):
            raise ChatEXAONEPathError(f"Category {i} of {path or 'questions.yaml'} needs an 'id' and 'questions'.")
        sections = category.get("sections") or []
        if not isinstance(sections, list) or not all(isinstance(x, str) and x.strip() for x in sections):
            raise ChatEXAONEPathError(f"Category {category['id']!r} of {path or 'questions.yaml'}: 'sections' must be a "
                                      "list of section names (diagnosis, microscopic, margins, …).")
        section_names = tuple(x.strip().lower() for x in sections)
        # A misspelt name would match no chunk and silently search the whole report: refuse it.
        if unknown := [x for x in section_names if x not in SECTION_PATTERNS]:
            raise ChatEXAONEPathError(f"Category {category['id']!r} of {path or 'questions.yaml'}: unknown section "
                                      f"{unknown[0]!r}; use {', '.join(SECTION_PATTERNS)}.")
        questions += [Question(str(category["id"]), str(q).strip(), section_names)
                      for q in category["questions"] if str(q).strip()]
    return questions


@dataclass
class GenerateConfig:
    """How `raider generate` asks: retrieval depth, retries, concurrency and sampling."""

    k: int = 4  # chunks retrieved per (report, question), from that report only
    max_attempts: int = 3  # answers tried per question; each retry tells the LLM what was wrong
    concurrency: int = 1  # requests in flight at once
    timeout: float = 120.0  # seconds per request (HTTP backends)
    request_retries: int = 2  # per request, with exponential backoff (the openai client's)
    temperature: float = 0.0
    retry_temperature: float = 0.7  # a greedy model would repeat the same mistake
    max_tokens: int = 48
    phrasings: int = 1  # phrasings asked per category and report (0: all); chosen by the report id
    captions: bool = True  # also write one caption per report for phase 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("k", "max_attempts", "concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise ChatEXAONEPathError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.phrasings < 0 or self.request_retries < 0 or self.timeout <= 0:
            raise ChatEXAONEPathError("phrasings and request retries must be ≥ 0 and the timeout > 0.")


@dataclass(frozen=True)
class Task:
    """One request: a question (or the caption) for one report."""

    report_id: str
    category: str  # question category, or "caption"
    question: str
    sections: tuple[str, ...] = ()  # where the excerpts come from (Question.sections)

    @property
    def key(self) -> str:
        """The log key: a (report, question) pair is asked once, whatever the run."""
        return f"{self.report_id}\t{self.question}"

    @property
    def is_caption(self) -> bool:
        return self.category == CAPTION

    @property
    def max_words(self) -> int:
        return CAPTION_MAX_WORDS if self.is_caption else MAX_WORDS

    @property
    def asked(self) -> str:
        """The question the answer is checked against ("" for a caption, which answers no question)."""
        return "" if self.is_caption else self.question


CAPTION = "caption"


def _pick(items: list, n: int, salt: str) -> list:
    """`n` items chosen by a stable hash of `salt` (all of them when n is 0)."""
    if n == 0 or n >= len(items):
        return list(items)
    ranked = sorted(items, key=lambda q: hashlib.sha256(f"{salt}\x00{q.text}".encode()).hexdigest())
    return ranked[:n]


def plan_tasks(report_ids: Iterable[str], questions: list[Question], config: GenerateConfig) -> list[Task]:
    """Every request of a run, in a stable order: per report, its caption, then its questions."""
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    tasks = []
    for report_id in report_ids:
        if config.captions:
            tasks.append(Task(report_id, CAPTION, CAPTION_QUERY, CAPTION_SECTIONS))
        for category, phrasings in by_category.items():
            tasks += [Task(report_id, category, q.text, q.sections)
                      for q in _pick(phrasings, config.phrasings, report_id)]
    return tasks


class ResultLog:
    """The append-only JSONL log of finished requests: the run's memory across kills.

    Line 1 is a header with the settings that shape answers; a rerun with different ones is
    refused rather than mixing two kinds of answer in one dataset. Every record is flushed and
    fsynced before the next is taken, and a torn last line (a kill mid-write) is ignored.
    """

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.settings = Path(path), settings
        self.records: dict[str, dict] = {}
        if self.path.exists() and self.path.stat().st_size:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                f.write(json.dumps({"header": settings}) + "\n")
        self._file = open(self.path, "a")

    def _load(self) -> None:
        lines = self.path.read_text().split("\n")
        try:
            header = json.loads(lines[0])["header"]
        except (ValueError, KeyError, TypeError) as e:
            raise ChatEXAONEPathError(f"{self.path} is not a RAIDER log; remove it or choose another --out.") from e
        changed = sorted(k for k in self.settings if header.get(k) != self.settings[k])
        if changed:
            raise ChatEXAONEPathError(
                f"{self.path} was made with other settings ({', '.join(f'{k}={header.get(k)!r}' for k in changed)}); "
                "use another --out, or --fresh to start over.")
        torn = 0
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.records[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                torn += 1
                logger.warning("%s:%d is damaged (a run killed while writing?); that request is asked again.",
                               self.path, number)
        if lines[-1].strip():
            # A kill mid-write left no newline: start the next record on a fresh line.
            with open(self.path, "a") as f:
                f.write("\n")

    def append(self, record: dict) -> None:
        """Store one finished request durably."""
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["key"]] = record

    def close(self) -> None:
        self._file.close()


@dataclass
class RunStats:
    """What one `generate` call did (the log holds everything ever done)."""

    asked: int = 0
    skipped: int = 0  # already in the log
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)


def task_answer(task: Task, reply: str) -> str:
    """The answer to `task` in a model's reply (or in an answer logged under older rules), normalised."""
    return normalize_answer(reply, task.max_words, question=task.asked)


def task_problems(task: Task, answer: str, excerpts: str) -> list[str]:
    """Why `answer` breaks the rules for `task`, given the excerpts (joined) it was made from."""
    problems = answer_problems(answer, task.max_words, excerpts=excerpts, question=task.asked)
    if task.is_caption and answer == NOT_MENTIONED:
        problems.append("a caption must describe the report")
    return problems


async def _ask(task: Task, index: "ChunkIndex", backend: "TextBackend", config: GenerateConfig,
               version: str | None) -> dict:
    """Retrieve, ask, validate and retry one task; returns its log record."""
    started = time.perf_counter()
    hits = index.retrieve(task.report_id, task.question, k=config.k, sections=task.sections)
    excerpts = [h.text for h in hits]
    messages = caption_messages(excerpts) if task.is_caption else answer_messages(task.question, excerpts)
    max_words = task.max_words
    attempts = []
    answer, problems = "", ["not asked"]
    # A backend that can limit its reply to given words (the local one) answers in the excerpts' words only.
    joined = "\n".join(excerpts)
    vocabulary = {"vocabulary": "\n".join([joined, NOT_MENTIONED, task.asked])} \
        if getattr(backend, "supports_vocabulary", False) else {}
    for attempt in range(config.max_attempts):
        temperature = config.temperature if attempt == 0 else max(config.temperature, config.retry_temperature)
        raw = await backend.acomplete(messages, temperature=temperature, max_tokens=config.max_tokens,
                                      seed=config.seed + attempt, **vocabulary)
        answer = task_answer(task, raw)
        problems = task_problems(task, answer, joined)
        attempts.append({"answer": answer, "problems": problems})
        if not problems:
            break
        messages = messages + [
            {"role": "assistant", "content": raw},
            {"role": "user", "content": f"That breaks the rules: {'; '.join(problems)}. Answer again, following "
                                        f"the rules, in at most {max_words} words."}]
    status = "rejected" if problems else ("not_mentioned" if answer == NOT_MENTIONED else "ok")
    return {"key": task.key, "report_id": task.report_id, "report_version": version, "category": task.category,
            "question": task.question, "sections": list(task.sections), "status": status, "answer": answer,
            "attempts": attempts, "rules_version": RULES_VERSION,
            "chunks": [{"id": h.chunk_id, "score": round(h.score, 4), "section": h.section} for h in hits],
            "backend": backend.name, "prompt_version": PROMPT_VERSION,
            "seconds": round(time.perf_counter() - started, 3)}


async def _run_tasks(tasks: list[Task], index: "ChunkIndex", backend: "TextBackend", config: GenerateConfig,
                     log: ResultLog, versions: dict[str, str], on_record: Callable[[dict], None] | None) -> None:
    pending = iter(tasks)  # shared by the workers; safe, since they all run on one event loop
    failure: list[BaseException] = []

    async def worker() -> None:
        for task in pending:
            if failure:
                return
            try:
                record = await _ask(task, index, backend, config, versions.get(task.report_id))
            except BackendError as e:
                failure.append(e)
                return
            log.append(record)
            if on_record:
                on_record(record)

    try:
        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, max(len(tasks), 1)))))
    finally:
        await backend.aclose()
    if failure:
        raise failure[0]


def answer_settings(backend: "TextBackend", index: "ChunkIndex", config: GenerateConfig) -> dict:
    """What shapes an answer besides its report and question: a log made with other values is not reused."""
    return {"backend": backend.name, "k": config.k, "prompt_version": PROMPT_VERSION, "embedder": index.embedder.name,
            "max_attempts": config.max_attempts, "temperature": config.temperature,
            "retry_temperature": config.retry_temperature, "max_tokens": config.max_tokens, "seed": config.seed,
            "vocabulary": "excerpts" if getattr(backend, "supports_vocabulary", False) else "free"}


REASK_WARNINGS = {
    "edited": "%d answers were made from another version of their report (%d reports edited); they are asked again.",
    # An edited question bank, or a log from before sections.
    "moved": "%d answers (%d reports) were retrieved from other report sections than the question bank now names; "
             "they are asked again.",
    "rules": "%d answers (%d reports) were checked under other answer rules and do not pass the current ones; they "
             "are asked again.",
}


def _reask_reason(log: ResultLog, task: Task, version: str | None, index: "ChunkIndex",
                  config: GenerateConfig) -> str | None:
    """Why the logged answer to `task` cannot be reused (a REASK_WARNINGS key), or None when it can.

    An answer checked under other rules is normalised and checked again on the excerpts it was made
    from (retrieval only, no LLM); one that passes is logged as it now reads, so a resume re-checks
    nothing twice. A rejected one is asked again, as the new rules may accept what the old refused.
    """
    record = log.records[task.key]
    if record.get("report_version") != version:
        return "edited"
    if record.get("sections") != list(task.sections):
        return "moved"
    if record.get("rules_version") == RULES_VERSION:
        return None
    if record.get("status") == "rejected":
        return "rules"
    answer = task_answer(task, record.get("answer", ""))
    hits = index.retrieve(task.report_id, task.question, k=config.k, sections=task.sections)
    if task_problems(task, answer, "\n".join(h.text for h in hits)):
        return "rules"
    status = "not_mentioned" if answer == NOT_MENTIONED else "ok"
    log.append(record | {"answer": answer, "status": status, "rules_version": RULES_VERSION})
    return None


def current_records(log: ResultLog, versions: dict[str, str], report_ids: Iterable[str]) -> list[dict]:
    """The log's records for `report_ids` that were answered from the report's current version."""
    wanted = set(report_ids)
    return [r for r in log.records.values()
            if r["report_id"] in wanted and r.get("report_version") == versions.get(r["report_id"])]


def generate_answers(index: "ChunkIndex", backend: "TextBackend", questions: list[Question], log_path: Path,
                     config: GenerateConfig, report_ids: list[str] | None = None,
                     on_record: Callable[[dict], None] | None = None,
                     on_plan: Callable[[int, int], None] | None = None) -> tuple[ResultLog, RunStats]:
    """Ask every (report, question) not yet in the log at `log_path`; returns the log and this run's stats.

    `report_ids` defaults to every report in the index. `on_plan(total, already_done)` is called
    once before asking, `on_record(record)` after each answer is stored. A backend failure stops
    the run after the requests in flight, keeping every stored answer, and is re-raised.
    """
    log = ResultLog(log_path, answer_settings(backend, index, config))
    report_ids = index.report_ids() if report_ids is None else report_ids
    versions = index.report_versions()
    tasks = plan_tasks(report_ids, questions, config)
    reasons = {t.key: why for t in tasks if t.key in log.records
               and (why := _reask_reason(log, t, versions.get(t.report_id), index, config))}
    for why, text in REASK_WARNINGS.items():
        if keys := [k for k, r in reasons.items() if r == why]:
            logger.warning(text, len(keys), len({log.records[k]["report_id"] for k in keys}))
    todo = [t for t in tasks if t.key not in log.records or t.key in reasons]
    stats = RunStats(asked=len(todo), skipped=len(tasks) - len(todo))
    if on_plan:
        on_plan(len(tasks), stats.skipped)
    logger.info("%d requests planned for %d reports; %d already in %s.", len(tasks), len(report_ids),
                stats.skipped, log_path)
    started = time.perf_counter()
    before = backend.usage.as_dict()
    try:
        asyncio.run(_run_tasks(todo, index, backend, config, log, versions, on_record))
    except BackendError as e:
        done = sum(t.key in log.records for t in todo)
        raise BackendError(f"{e} ({done} of {len(todo)} answers of this run are saved in {log_path}; "
                           "rerun the same command to go on.)") from e
    finally:
        log.close()
        stats.seconds = time.perf_counter() - started
        stats.usage = {k: v - before.get(k, 0) for k, v in backend.usage.as_dict().items()}
    return log, stats
