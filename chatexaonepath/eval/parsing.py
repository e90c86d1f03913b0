"""The judge's reply → one verdict per criterion, or the reason it cannot be used.

Only the judge's own single verdict counts. A reply may open with a few lines of reasoning, but it
must end with exactly one complete JSON object: a reply holding two candidate objects (an example
or a quoted answer, then the verdict; a fenced verdict, then another object) or an object cut off
at `max_tokens` is unusable — a `judge_error`, never a pass — because nothing can tell which of two
objects is the judge's, and no repair can know what a truncated verdict would have said. Within the
one object, slips that change no content are repaired: Python literals, trailing commas, single
or typographic quotes, "yes"/"fail" words, criteria keyed by number or by name.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Sequence

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .criteria import Criterion

EVALUATOR_FIELD = "addresses_evaluator"
MAX_REPLY_CHARS = 100_000  # a verdict with reasons is a few thousand characters; --judge-max-tokens bounds honest ones
MAX_DEPTH = 16  # the verdict is 3 levels deep ({criteria: {id: {pass, reason}}}); room for a wrapper or two
PARSE_SECONDS = 2.0
_EVALUATOR_KEYS = {"addresses_evaluator", "addresses_the_evaluator", "evaluator_addressed", "addressed_to_evaluator"}


class JudgeOutputError(Exception):
    """The judge's reply is not a usable verdict; the message says why (sent back when re-asking)."""


@dataclass(frozen=True)
class ParsedVerdict:
    """One reply's verdicts ({criterion_id: {"pass", "reason"}}) and whether the answer addresses the evaluator."""

    criteria: dict[str, dict]
    addresses_evaluator: bool | None


_WORDS = {"pass": True, "passed": True, "met": True, "yes": True, "fail": False, "failed": False,
          "not met": False, "no": False}
_BOOLEAN_WORDS = {"true": True, "yes": True, "false": False, "no": False}


class CriterionVerdict(BaseModel):
    """The schema of one criterion's verdict: {"reason": str, "pass": bool}."""

    model_config = ConfigDict(extra="ignore")
    passed: bool = Field(validation_alias=AliasChoices("pass", "passed", "pass_", "result", "verdict"))
    reason: str = Field(default="", validation_alias=AliasChoices("reason", "reasoning", "rationale", "explanation"))

    @field_validator("passed", mode="before")
    @classmethod
    def _words(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in _WORDS:
            return _WORDS[value.strip().lower()]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            raise ValueError("must be true or false, not a score")
        return value

    @field_validator("reason", mode="before")
    @classmethod
    def _text(cls, value: object) -> object:
        return "" if value is None else value


def _object_spans(text: str) -> tuple[list[tuple[int, int]], int | None]:
    """(start, end) of every top-level {…} group, strings respected, and where an unclosed one starts.

    Raises JudgeOutputError when brackets nest deeper than MAX_DEPTH or the scan outlasts PARSE_SECONDS.
    """
    spans, i = [], 0
    deadline = time.monotonic() + PARSE_SECONDS
    while (start := text.find("{", i)) != -1:
        depth, nesting, j, quoted = 0, 0, start, False
        while j < len(text):
            if j & 0x3FFF == 0 and time.monotonic() > deadline:
                raise JudgeOutputError(f"the reply could not be read within {PARSE_SECONDS:g} s")
            ch = text[j]
            if quoted:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    quoted = False
            elif ch == '"':
                quoted = True
            elif ch in "{[":
                depth += ch == "{"
                nesting += 1
                if nesting > MAX_DEPTH:
                    raise JudgeOutputError(f"the JSON nests deeper than {MAX_DEPTH} levels; a verdict is 3 levels deep")
            elif ch in "}]":
                nesting -= 1
                if ch == "}":
                    depth -= 1
                    if depth == 0:
                        break
            j += 1
        if j >= len(text):
            return spans, start
        spans.append((start, j + 1))
        i = j + 1
    return spans, None


def _decode(body: str) -> object:
    """The object in `body`, after the slips that change no content are fixed (hand-written: no
    library repairs these without also inventing content)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # depth is checked before, but a parser failure is never the run's end
        pass
    fixed = body.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'")
    fixed = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", fixed)))
    fixed = re.sub(r",\s*([}\]])", r"\1", fixed)  # trailing commas
    for candidate in (fixed, re.sub(r"'([^'\n]*)'(\s*[:,}\]])", r'"\1"\2', fixed)):  # single-quoted keys/values
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            continue
    raise JudgeOutputError("the JSON object is not valid JSON")


def final_object(reply: str) -> object:
    """The reply's one JSON object, which must end it; raises JudgeOutputError for none, several or a cut-off one."""
    if len(reply or "") > MAX_REPLY_CHARS:
        raise JudgeOutputError(f"the reply is {len(reply):,} characters long; a verdict needs at most "
                               f"{MAX_REPLY_CHARS:,}")
    text = (reply or "").strip()
    if not text:
        raise JudgeOutputError("the reply was empty")
    spans, unclosed = _object_spans(text)
    if unclosed is not None:
        raise JudgeOutputError("the verdict is cut off (a JSON object is never closed); reply with the complete "
                               "object only")
    candidates = [(a, b) for a, b in spans if ":" in text[a:b]]
    if not candidates:
        raise JudgeOutputError("the reply holds no JSON object")
    if len(candidates) > 1:
        raise JudgeOutputError(f"the reply holds {len(candidates)} JSON objects; reply with exactly one verdict "
                               "object and quote no other")
    start, end = candidates[0]
    if text[end:].strip().strip("`").strip():
        raise JudgeOutputError("there is text after the JSON object; the verdict must end the reply")
    return _decode(text[start:end])


def _norm(key: object) -> str:
    return re.sub(r"[\s\-]+", "_", str(key).strip().lower())


def _key_aliases(criteria: Sequence[Criterion], numbering: Sequence[Criterion]) -> dict[str, str]:
    aliases = {}
    for n, c in enumerate(numbering, 1):
        if c in criteria:
            for key in (c.id, c.name, str(n), f"c{n}", f"criterion{n}", f"criterion_{n}"):
                aliases[_norm(key)] = c.id
    return aliases


def _evaluator_field(obj: dict, required: bool) -> tuple[dict, bool | None]:
    """(the object without the field, the field's value)."""
    keys = [k for k in obj if _norm(k) in _EVALUATOR_KEYS]
    if not keys:
        if required:
            raise JudgeOutputError(f'the JSON lacks "{EVALUATOR_FIELD}" (true or false)')
        return obj, None
    value = obj[keys[0]]
    if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
        value = _BOOLEAN_WORDS[value.strip().lower()]
    if not isinstance(value, bool):
        raise JudgeOutputError(f'"{EVALUATOR_FIELD}" must be true or false, not {json.dumps(value)[:40]}')
    return {k: v for k, v in obj.items() if k not in keys}, value


def validate_verdict(obj: object, criteria: Sequence[Criterion], numbering: Sequence[Criterion],
                     require_evaluator_field: bool = True) -> ParsedVerdict:
    """Check one decoded object against the verdict schema; raises JudgeOutputError with the problem."""
    if not isinstance(obj, dict):
        raise JudgeOutputError("the verdict must be a JSON object keyed by criterion id")
    obj, addressed = _evaluator_field(obj, require_evaluator_field)
    for wrapper in ("criteria", "verdicts", "results", "verdict"):
        if isinstance(obj.get(wrapper), dict) and len(obj) == 1:
            obj = obj[wrapper]
            break
    if len(criteria) == 1 and ("pass" in obj or "passed" in obj):
        obj = {criteria[0].id: obj}
    aliases = _key_aliases(criteria, numbering)
    by_id = {aliases[_norm(k)]: v for k, v in obj.items() if _norm(k) in aliases}
    missing = [c.id for c in criteria if c.id not in by_id]
    if missing:
        raise JudgeOutputError(f"the JSON lacks the criteria {', '.join(missing)}")
    verdicts, problems = {}, []
    for c in criteria:
        value = by_id[c.id]
        if isinstance(value, bool):
            value = {"pass": value}
        try:
            parsed = CriterionVerdict.model_validate(value)
        except ValidationError as e:
            problems.append(f'{c.id}: {e.errors()[0]["msg"].lower()} ({json.dumps(value)[:60]})')
            continue
        verdicts[c.id] = {"pass": parsed.passed, "reason": " ".join(parsed.reason.split())[:500]}
    if problems:
        raise JudgeOutputError('"pass" must be true or false and "reason" a string: ' + "; ".join(problems))
    return ParsedVerdict(verdicts, addressed)


def parse_verdicts(reply: str, criteria: Sequence[Criterion], numbering: Sequence[Criterion] | None = None,
                   require_evaluator_field: bool = True) -> ParsedVerdict:
    """The verdicts in a judge reply that ends with exactly one complete JSON object; else JudgeOutputError."""
    return validate_verdict(final_object(reply), criteria, numbering or criteria, require_evaluator_field)
