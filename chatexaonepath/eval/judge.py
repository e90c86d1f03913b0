"""The LLM judge: one candidate answer, the report, the question → a verdict per criterion.

Hardening against the paper's judge (unstable, the seven criteria blurred into one, strict about
trivia, and open to an answer that instructs it):
  - one JSON verdict per reply, asked for with a JSON schema where the server supports structured
    output (`response_format`), validated; a reply with no verdict, several candidate objects or a
    cut-off one is re-asked, and what still fails is a `judge_error` — never a pass or a fail
    (parsing.py);
  - `votes` samples at temperature > 0 with a majority per criterion and the agreement reported;
    `per_criterion` asks one criterion per call, so the judge cannot blur them;
  - the candidate answer is data: fenced with a per-call random boundary, escaped, the rubric
    restated after it (prompt.py); the judge says in its own field whether the answer addresses the
    evaluator, and a deterministic pre-check (`precheck_flags`) fails the pre-check criterion and
    the answer when it finds steering text, whatever the judge replies.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Sequence

from ..backends import BackendError, Messages, TextBackend
from .criteria import AcceptanceRule, CriteriaSet, Criterion, EvalError
from .parsing import EVALUATOR_FIELD, JudgeOutputError, ParsedVerdict, parse_verdicts
from .precheck import precheck_flags
from .prompt import judge_messages, response_format

__all__ = ["Judge", "JudgeBackendFailure", "JudgeConfig", "JudgeItem", "JudgeOutputError", "PROMPT_VERSION",
           "judge_messages", "parse_verdicts"]

logger = logging.getLogger(__name__)

PROMPT_VERSION = "judge-v2"
JUDGE_FLAG = "judge:addresses_evaluator"


class JudgeBackendFailure(Exception):
    """The backend failed on a request after the retries; `request_specific` when only this request is at fault."""

    def __init__(self, message: str, request_specific: bool = False) -> None:
        super().__init__(message)
        self.request_specific = request_specific


# --- the judge ----------------------------------------------------------------------------------------
@dataclass
class JudgeConfig:
    """How the judge is asked; saved in every run folder (`eval_config.json`)."""

    votes: int = 1  # samples per verdict; >1 samples at temperature > 0 and takes the majority
    temperature: float | None = None  # None: 0 for one vote, 0.7 for several
    per_criterion: bool = False  # one call per criterion instead of one call for all
    concurrency: int = 8  # answers judged at once, and requests in flight at most
    timeout: float = 120.0  # seconds per request
    retries: int = 3  # re-sends after a timeout, connection error or server error
    backoff: float = 1.0  # seconds before the first re-send, doubled each time (with jitter)
    max_repairs: int = 2  # re-asks after an unusable reply, with the reason
    max_tokens: int = 768
    structured_output: bool = True  # send the verdict's JSON schema as `response_format` where the server takes it
    seed: int = 0  # vote i is sampled with seed + i (servers that honour seeds are reproducible)
    max_report_chars: int = 6000  # longer reports are replaced by their most relevant passages
    chunk_chars: int = 600
    embedder: str = "embedded"  # sentence-transformers model ranking the passages of long reports
    prompt_version: str = PROMPT_VERSION

    def __post_init__(self) -> None:
        if self.votes < 1:
            raise EvalError(f"--votes must be 1 or more, got {self.votes}.")
        if self.votes > 1 and self.temperature is not None and self.temperature <= 0:
            raise EvalError(f"--votes {self.votes} needs a temperature above 0 (got {self.temperature}); "
                            "identical greedy samples would only repeat one verdict.")
        if self.concurrency < 1 or self.retries < 0 or self.max_repairs < 0 or self.timeout <= 0:
            raise EvalError("--concurrency and --timeout must be positive, --retries and --max-repairs 0 or more.")
        if self.max_report_chars < 200:
            raise EvalError(f"--max-report-chars must be at least 200, got {self.max_report_chars}.")

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.7 if self.votes > 1 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "sampling_temperature": self.sampling_temperature}


@dataclass
class JudgeItem:
    """What the judge needs about one answer (report text already resolved)."""

    id: str
    question: str
    answer: str
    report: str
    report_id: str | None = None
    category: str | None = None
    organ: str | None = None
    slide: str | None = None  # the slide asked about: questions are clustered by it in the intervals


class Judge:
    """Judges items concurrently through a text backend; one `judge()` call → one verdict record."""

    def __init__(self, backend: TextBackend, criteria: CriteriaSet, rule: AcceptanceRule,
                 config: JudgeConfig | None = None) -> None:
        self.backend, self.criteria, self.rule = backend, criteria, rule
        self.config = config or JudgeConfig()
        self.successful_calls = 0
        self._slots: asyncio.Semaphore | None = None
        # None: not known yet (tried, and dropped for the run if the server refuses it); False: never sent.
        self._structured: bool | None = None if self.config.structured_output and \
            getattr(backend, "supports_response_format", None) is not False else False

    async def judge(self, item: JudgeItem, report: str, excerpted: bool = False) -> dict:
        """The verdict record of one item; raises JudgeBackendFailure when the backend keeps failing."""
        started = time.perf_counter()
        groups = [[c] for c in self.criteria.criteria] if self.config.per_criterion else [list(self.criteria.criteria)]
        samples = await asyncio.gather(*(self._sample(item, report, excerpted, group, vote)
                                         for group in groups for vote in range(self.config.votes)))
        flags = precheck_flags(item.answer)
        addressed = [s[0].addresses_evaluator for s in samples if s[0] is not None]
        # Ties flag the answer: a judge that is unsure whether it is being addressed should not be outvoted.
        judge_says = None if not addressed else sum(addressed) * 2 >= len(addressed)
        if judge_says:
            flags.append(JUDGE_FLAG)
        criteria, agreements, errors = {}, [], {}
        for c in self.criteria.criteria:
            votes = [s[0].criteria[c.id] for s in samples if s[0] is not None and c.id in s[0].criteria]
            if not votes:
                error = next(s[1] for s in samples if s[0] is None and (not self.config.per_criterion or c.id in s[2]))
                criteria[c.id] = {"pass": None, "reason": f"judge error: {error}"}
                errors.setdefault(error, []).append(c.id)
                continue
            criteria[c.id] = self._majority(votes)
            agreements.append(criteria[c.id].get("agreement", 1.0))
        self._apply_precheck(criteria, flags)
        accepted = False if flags else self.rule.decide({k: v["pass"] for k, v in criteria.items()}, self.criteria)
        return {
            "id": item.id, "accepted": accepted, "criteria": criteria,
            "judge_error": _error_summary(errors, len(self.criteria.criteria)),
            "error_kind": "output" if errors else None,
            "flags": flags, EVALUATOR_FIELD: judge_says, "category": item.category, "organ": item.organ,
            "slide": item.slide,
            "report_excerpted": excerpted, "votes": self.config.votes,
            "agreement": sum(agreements) / len(agreements) if self.config.votes > 1 and agreements else None,
            "calls": sum(s[3] for s in samples), "judge": self.backend.name,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _majority(self, votes: list[dict]) -> dict:
        passes = sum(1 for v in votes if v["pass"])
        # A tie is not a pass: acceptance must be earned (use an odd --votes to avoid ties).
        verdict = passes * 2 > len(votes)
        reason = next(v["reason"] for v in votes if v["pass"] == verdict)
        out = {"pass": verdict, "reason": reason}
        if self.config.votes > 1:
            out.update(agreement=max(passes, len(votes) - passes) / len(votes), votes=[v["pass"] for v in votes])
            if passes * 2 == len(votes):
                out["reason"] = f"votes tied {passes}-{passes}; counted as a fail. {reason}"
        return out

    def _apply_precheck(self, criteria: dict, flags: list[str]) -> None:
        target = self.criteria.precheck_criterion
        if not flags or target is None:
            return
        judged = criteria[target]
        if flags == ["empty_answer"]:
            why = "the answer is empty"
        elif flags == [JUDGE_FLAG]:
            why = "the judge found text addressed to the evaluator"
        else:
            why = "the answer contains text addressed to the evaluator"
        criteria[target] = {"pass": False, "reason": f"Pre-check: {', '.join(flags)} ({why}); failed whatever the "
                            "judge's verdict on this criterion.", "judge_pass": judged.get("pass")}

    async def _sample(self, item: JudgeItem, report: str, excerpted: bool, group: list[Criterion],
                      vote: int) -> tuple[ParsedVerdict | None, str | None, list[str], int]:
        """(verdict, None, ids, calls) or (None, why unusable, ids, calls) for one sample of one group."""
        messages = judge_messages(self.criteria, group, report, item.question, item.answer, excerpted)
        temperature = self.config.sampling_temperature
        problem = None
        for attempt in range(self.config.max_repairs + 1):
            reply = await self._call(messages, temperature, self.config.seed + vote + 1000 * attempt, group)
            try:
                return parse_verdicts(reply, group, self.criteria.criteria), None, [c.id for c in group], attempt + 1
            except JudgeOutputError as e:
                problem = str(e)
            except Exception as e:  # noqa: BLE001 - any parser failure (RecursionError…) is an unusable reply
                problem = f"the reply could not be parsed ({type(e).__name__})"
            logger.info("Judge reply for %s unusable (%s); %s", item.id, problem,
                        "re-asking" if attempt < self.config.max_repairs else "giving up")
            messages = messages[:2] + [
                {"role": "assistant", "content": reply[-4000:]},
                {"role": "user", "content": f"Your reply could not be used: {problem}. Reply again with only the "
                                            f"one JSON object for {', '.join(c.id for c in group)}, each with a "
                                            f'one-sentence "reason" and a boolean "pass", and "{EVALUATOR_FIELD}".'}]
        return None, f"unusable judge reply after {self.config.max_repairs + 1} attempt(s): {problem}", \
            [c.id for c in group], self.config.max_repairs + 1

    async def _call(self, messages: Messages, temperature: float, seed: int, group: list[Criterion]) -> str:
        if self._slots is None:
            # An in-process model generates one reply at a time; queued requests would only run into
            # the timeout while they wait for it.
            limit = getattr(self.backend, "max_concurrency", None) or self.config.concurrency
            self._slots = asyncio.Semaphore(min(limit, self.config.concurrency))
        for attempt in range(self.config.retries + 1):
            try:
                reply = await self._send(messages, temperature, seed, group)
                self.successful_calls += 1
                return reply
            except (BackendError, asyncio.TimeoutError) as e:
                message, retryable, request_specific = _classify(e, self.config.timeout)
                if not retryable or attempt == self.config.retries:
                    raise JudgeBackendFailure(message, request_specific) from e
                delay = self.config.backoff * 2 ** attempt * (0.5 + random.random())
                logger.info("Judge request failed (%s); retrying in %.1f s", message, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _send(self, messages: Messages, temperature: float, seed: int, group: list[Criterion]) -> str:
        """One request, with the verdict schema while the server has not refused it."""
        gen = dict(temperature=temperature, max_tokens=self.config.max_tokens, seed=seed)
        structured = self._structured is not False
        async with self._slots:
            try:
                # wait_for is the hard limit; the local backend also stops its generation when cancelled.
                return await asyncio.wait_for(self.backend.acomplete(
                    messages, **gen, **({"response_format": response_format(group)} if structured else {})),
                    self.config.timeout)
            except BackendError as e:
                if not structured or not _classify(e, self.config.timeout)[2]:
                    raise
                first = e
            # The server rejected the request as such (400/422): perhaps the schema. Once more without it.
            try:
                reply = await asyncio.wait_for(self.backend.acomplete(messages, **gen), self.config.timeout)
            except BackendError:
                raise first from None
        if self._structured is None:
            logger.warning("The judge server refused structured output (%s); asking for JSON in free text.", first)
        self._structured = False
        return reply


def _error_summary(errors: dict[str, list[str]], n_criteria: int) -> str | None:
    """One line per distinct problem, naming the criteria it left without a verdict."""
    if not errors:
        return None
    return "; ".join(f"{message} ({'all criteria' if len(ids) == n_criteria else ', '.join(ids)})"
                     for message, ids in errors.items())


def _classify(error: Exception, timeout: float) -> tuple[str, bool, bool]:
    """(message, worth retrying, the fault of this request only) for a failed backend call."""
    if isinstance(error, asyncio.TimeoutError):
        return f"no reply within {timeout:g} s", True, False
    import openai

    cause = error.__cause__
    status = getattr(cause, "status_code", None)
    # A dropped connection is worth another try mid-run; a server that never answered stops the run anyway.
    retryable = bool(getattr(error, "retryable", False)) or isinstance(cause, openai.APIConnectionError)
    return str(error), retryable, status in (400, 413, 422)
