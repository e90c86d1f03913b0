"""RAIDER generation: for each (report, question), retrieved chunks → a short, constrained answer.

This module holds the question bank, the answer prompt and the answer rules; the resumable,
concurrent generation loop builds on them (RAIDER issue).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from ..errors import ChatEXAONEPathError

PROMPT_VERSION = "raider-answer-v1"
MAX_WORDS = 10
NOT_MENTIONED = "not mentioned in the report"
ANSWER_RULES = (
    f"Answer in at most {MAX_WORDS} words. Use only the report excerpts. Do not give measurements, numbers "
    f"with units, specimen or block identifiers, or dates. If the excerpts do not say, answer exactly: "
    f"{NOT_MENTIONED}."
)
# Measurements and identifiers the answers must not carry (they cannot be seen on the slide).
_MEASUREMENT = re.compile(r"\d+(\.\d+)?\s*(x\s*\d+(\.\d+)?\s*)*(mm|cm|µm|um|m|g|kg|mg|ml|%)\b", re.IGNORECASE)
_DATE = re.compile(r"\b\d{1,4}[/-]\d{1,2}[/-]\d{1,4}\b|\b(19|20)\d{2}\b")
# Accession numbers (S19-12345) and block/part/cassette labels; not TNM codes such as "T2 N0".
_SPECIMEN = re.compile(r"\b([A-Z]{1,3}\d{2}-\d{3,}|(block|cassette|part|slide)\s+[A-Z]?\d*[A-Z]?\b)", re.IGNORECASE)
_REFUSAL = re.compile(r"\b(i (cannot|can't|am unable)|as an ai|i'm sorry|i do not have access)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Question:
    """One phrasing of a question in a category."""

    category: str
    text: str


def load_questions(path: str | Path | None = None) -> list[Question]:
    """The question bank: `path`, or the default `questions.yaml` shipped with the package."""
    try:
        if path is None:
            raw = yaml.safe_load(resources.files(__package__).joinpath("questions.yaml").read_text())
        else:
            raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as e:
        raise ChatEXAONEPathError(f"Question bank not found: {path}.") from e
    except yaml.YAMLError as e:
        raise ChatEXAONEPathError(f"{path} is not valid YAML: {str(e).splitlines()[0]}.") from e
    categories = raw.get("categories") if isinstance(raw, dict) else None
    if not isinstance(categories, list) or not categories:
        raise ChatEXAONEPathError(f"{path or 'questions.yaml'} needs a non-empty 'categories' list.")
    questions = []
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not category.get("id") or not category.get("questions"):
            raise ChatEXAONEPathError(f"Category {i} of {path or 'questions.yaml'} needs an 'id' and 'questions'.")
        questions += [Question(str(category["id"]), str(q).strip()) for q in category["questions"] if str(q).strip()]
    return questions


def answer_messages(question: str, excerpts: list[str]) -> list[dict[str, str]]:
    """The chat messages that ask the LLM for one constrained answer from retrieved excerpts."""
    context = "\n\n".join(f"[{i + 1}] {text.strip()}" for i, text in enumerate(excerpts))
    return [
        {"role": "system", "content": "You extract facts from pathology reports. " + ANSWER_RULES},
        {"role": "user", "content": f"Report excerpts:\n{context}\n\nQuestion: {question}\nAnswer:"},
    ]


def answer_problems(answer: str) -> list[str]:
    """Why an answer breaks the rules (empty list when it is acceptable)."""
    text = answer.strip().strip('"').strip()
    problems = []
    if not text:
        return ["empty answer"]
    if len(text.split()) > MAX_WORDS:
        problems.append(f"{len(text.split())} words, more than {MAX_WORDS}")
    if _MEASUREMENT.search(text):
        problems.append("contains a measurement")
    if _DATE.search(text):
        problems.append("contains a date or year")
    if _SPECIMEN.search(text):
        problems.append("contains a specimen or block identifier")
    if _REFUSAL.search(text):
        problems.append("is a refusal, not an answer")
    return problems
