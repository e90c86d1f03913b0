"""Evaluation runs: answers (optional) → concurrent, resumable judgements → summary, report, chart.

Run folder (docs/evaluation.md): `answers.jsonl`, `verdicts.jsonl`, `summary.json`, `report.md`,
`criteria.png`, `eval_config.json` (everything the run was made with) and `errors.jsonl` (items
that could not be answered). Verdicts are appended as each answer is judged, each with the
`input_hash` of what it judged (question, answer, report, criteria, judge settings); a rerun judges
what has no verdict, lost its verdict to a backend failure, or changed since (an item id alone
never matches an old verdict to a new answer), and at the end the file is compacted to one record
per item with acceptance recomputed under the run's rule.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..backends import BackendError, BackendOptions, TextBackend, build_backend
from .agreement import HUMAN_FILE, compute_agreement, latest_grades
from .baselines import case_derangement, paired_difference, parse_baselines
from ..patients import load_patient_map
from .criteria import AcceptanceRule, CriteriaSet, Criterion, EvalError, load_criteria
from ..fileio import atomic_write_json
from .data import JsonlLog, item_images, load_answers, load_test_items
from .excerpts import ReportExcerpter
from .judge import Judge, JudgeBackendFailure, JudgeConfig, JudgeItem
from .leakage import check_training_patients
from .report import _breakdown, acceptance, summarize, write_outputs

if TYPE_CHECKING:  # answers.py imports torch; `eval judge` never needs it
    from .answers import GenerateConfig

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
CONFIG_FILE = "eval_config.json"
# Settings whose change makes existing verdicts incomparable with new ones (the rule is not one:
# acceptance is recomputed from the stored criterion verdicts).
VERDICT_SETTINGS = ("votes", "sampling_temperature", "per_criterion", "seed", "max_report_chars", "chunk_chars",
                    "embedder", "prompt_version", "max_tokens", "structured_output")


@dataclass
class RunResult:
    """Where a run wrote its outputs, and its summary."""

    out_dir: Path
    summary: dict


@dataclass
class JudgeStats:
    """What one `judge_items` call did: verdicts made, and the ids judged again because their input changed."""

    judged: int = 0
    changed: list[str] = field(default_factory=list)


def judge_model(backend: TextBackend) -> str:
    """The judge's identity without its URL (a server may move; the model is what matters)."""
    return backend.name.split("@")[0]


def _check_resume(out_dir: Path, section: str, settings: dict, keys: tuple[str, ...], hint: str) -> None:
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return
    saved = (json.loads(path.read_text()).get(section) or {})
    changed = [f"{k}: {saved[k]!r} → {settings.get(k)!r}" for k in keys if k in saved and saved[k] != settings.get(k)]
    if changed:
        what = {"judge": "verdicts", "generation": "answers"}.get(section, section)
        raise EvalError(f"{out_dir} holds {what} made with other settings ({'; '.join(changed)}); "
                        f"use a new --out, or {hint}.")


def _save_config(out_dir: Path, **sections: object) -> None:
    path = out_dir / CONFIG_FILE
    config = json.loads(path.read_text()) if path.exists() else {}
    config.update({k: v for k, v in sections.items() if v is not None})
    config["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(path, config)


def verdict_key(item: JudgeItem, judge: Judge) -> str:
    """sha256 of what a verdict is made from: question, answer, report, criteria and the judge's settings."""
    config = judge.config.as_dict()
    content = {"question": item.question, "answer": item.answer, "report": item.report,
               "criteria": judge.criteria.fingerprint(), "judge_model": judge_model(judge.backend),
               "settings": {k: config.get(k) for k in VERDICT_SETTINGS}}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def judge_items(items: list[JudgeItem], judge: Judge, verdicts: JsonlLog, excerpter: ReportExcerpter | None = None,
                *, retry_errors: bool = False, progress: Progress | None = None) -> JudgeStats:
    """Judge every item without a verdict of its current input (concurrently), appending each verdict.

    Raises BackendError when the backend fails before any request succeeded (a wrong URL, key or
    model should stop the run, not fill it with errors).
    """
    existing = verdicts.latest()
    keys = {item.id: verdict_key(item, judge) for item in items}
    changed = [i.id for i in items if i.id in existing and existing[i.id].get("input_hash") != keys[i.id]]
    if changed:
        logger.warning("%d item(s) changed since they were judged in %s (first: %s); they are judged again.",
                       len(changed), verdicts.path.parent, changed[0])

    def needed(item: JudgeItem) -> bool:
        record = existing.get(item.id)
        return (record is None or record.get("input_hash") != keys[item.id] or record.get("error_kind") == "backend"
                or bool(retry_errors and record.get("judge_error")))

    todo = [i for i in items if needed(i)]
    if progress:
        progress(len(items) - len(todo), len(items))
    if not todo:
        return JudgeStats(0, changed)
    excerpter = excerpter or ReportExcerpter(judge.config.max_report_chars, judge.config.chunk_chars,
                                             judge.config.embedder)
    contexts = excerpter.contexts([(i.report_id, i.report, f"{i.question}\n{i.answer}") for i in todo])
    asyncio.run(_judge_all(todo, contexts, keys, judge, verdicts, len(items) - len(todo), len(items), progress))
    return JudgeStats(len(todo), changed)


async def _judge_all(todo: list[JudgeItem], contexts: list, keys: dict[str, str], judge: Judge, verdicts: JsonlLog,
                     done: int, total: int, progress: Progress | None) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for pair in zip(todo, contexts):
        queue.put_nowait(pair)
    failure: list[JudgeBackendFailure] = []
    counter = [done]

    async def worker() -> None:
        while not failure and not queue.empty():
            item, context = queue.get_nowait()
            try:
                record = await judge.judge(item, context.text, context.excerpted)
            except JudgeBackendFailure as e:
                if judge.successful_calls == 0 and not e.request_specific:
                    failure.append(e)
                    return
                logger.warning("Judging %s failed: %s", item.id, e)
                # A request the server rejects (too long, malformed) fails the same way next time.
                kind = "request" if e.request_specific else "backend"
                record = _backend_error_record(item, judge, str(e), context.excerpted, kind)
            except Exception as e:  # noqa: BLE001 - one item's failure (even a RecursionError) must not end the run
                logger.exception("Judging %s failed unexpectedly; recorded as its judge error.", item.id)
                record = _backend_error_record(item, judge, f"{type(e).__name__}: {str(e)[:300]}", context.excerpted,
                                               "internal")
            record["input_hash"] = keys[item.id]
            verdicts.append(record)  # one writer: the event loop runs one coroutine at a time
            counter[0] += 1
            if progress:
                progress(counter[0], total)

    try:
        await asyncio.gather(*(worker() for _ in range(min(judge.config.concurrency, len(todo)))))
    finally:
        await judge.backend.aclose()  # connections belong to this event loop, which ends here
    if failure:
        raise BackendError(str(failure[0]))


def _backend_error_record(item: JudgeItem, judge: Judge, error: str, excerpted: bool, kind: str) -> dict:
    """A verdict the backend never gave: undecided; `backend` ones are retried by the next run."""
    return {"id": item.id, "accepted": None,
            "criteria": {c.id: {"pass": None, "reason": f"judge error: {error}"} for c in judge.criteria.criteria},
            "judge_error": f"{kind}: {error}", "error_kind": kind, "flags": [], "category": item.category,
            "organ": item.organ, "slide": item.slide, "report_excerpted": excerpted, "votes": judge.config.votes, "agreement": None,
            "calls": 0, "judge": judge.backend.name, "seconds": 0.0}


def compact_verdicts(out_dir: Path, items: Sequence[JudgeItem], criteria: CriteriaSet, rule: AcceptanceRule,
                     name: str = "verdicts.jsonl") -> list[dict]:
    """One verdict record per item (acceptance recomputed under `rule`, the item's slide filled in); the
    file is rewritten with them, keeping verdicts of items no longer in the set (not counted)."""
    log = JsonlLog(out_dir / name)
    latest = log.latest()
    records = []
    for item in items:
        record = latest.get(item.id)
        if record is None:
            continue
        if record.get("error_kind") not in ("backend", "request"):
            passes = {cid: v.get("pass") for cid, v in record["criteria"].items()}
            record["accepted"] = False if record.get("flags") else rule.decide(passes, criteria)
        record["slide"] = record.get("slide") or item.slide  # verdicts made before slides were recorded
        records.append(record)
    wanted = {i.id for i in items}
    log.rewrite(records + [r for i, r in latest.items() if i not in wanted])
    return records


def finalize(out_dir: Path, items: Sequence[JudgeItem], criteria: CriteriaSet, rule: AcceptanceRule, *,
             n_items: int | None = None, skipped: Sequence[dict] = (), extra: dict | None = None,
             baselines: dict[str, list[dict]] | None = None) -> dict:
    """Compact verdicts.jsonl and write summary, report, chart; with baselines, their acceptance and the
    slide dependence (model − blind); with human grades, the judge–human agreement."""
    records = compact_verdicts(out_dir, items, criteria, rule)
    summary = summarize(records, criteria, rule, n_items=len(items) if n_items is None else n_items, skipped=skipped,
                        extra={"name": out_dir.resolve().name, **(extra or {})})
    if baselines:
        summary["baselines"] = {name: {**acceptance(b), "per_category": _breakdown(b, "category")}
                                for name, b in baselines.items()}
        decided = {r["id"]: float(r["accepted"]) for r in records if r.get("accepted") is not None}
        slides = {r["id"]: r.get("slide") or r["id"] for r in records}
        for name, key in (("blind", "slide_dependence"), ("shuffled", "shuffled_gap")):
            if name in baselines:
                other = {r["id"]: float(r["accepted"]) for r in baselines[name] if r.get("accepted") is not None}
                summary[key] = paired_difference(decided, other, slides, {r["id"]: r.get("category") for r in records})
    summary["human_agreement"] = human_agreement(out_dir, records, items, criteria)
    write_outputs(out_dir, summary)
    return summary


def human_agreement(out_dir: Path, records: list[dict], items: Sequence[JudgeItem], criteria: CriteriaSet) -> dict | None:
    """Judge–human agreement from the run's human.jsonl (None when nobody graded)."""
    log = JsonlLog(out_dir / HUMAN_FILE)
    if not log.path.exists():
        return None
    return compute_agreement({r["id"]: r for r in records}, {i.id: i.answer for i in items}, latest_grades(log),
                             criteria.ids)


def refresh_report(out_dir: str | Path) -> dict:
    """Recompute a finished judged run's human agreement and rewrite its summary, report and chart (no judge call)."""
    from .compare import load_summary

    out_dir = Path(out_dir)
    summary = load_summary(out_dir)
    config = json.loads((out_dir / CONFIG_FILE).read_text()) if (out_dir / CONFIG_FILE).exists() else {}
    criteria = CriteriaSet(tuple(Criterion(**c) for c in config["criteria"]["criteria"]),
                           config["criteria"].get("precheck_criterion")) if config.get("criteria") else load_criteria()
    items = run_items(out_dir)
    records = list(JsonlLog(out_dir / "verdicts.jsonl").latest().values())
    summary["human_agreement"] = human_agreement(out_dir, records, items, criteria)
    write_outputs(out_dir, summary)
    return summary


def run_items(out_dir: Path) -> list[JudgeItem]:
    """The answers a judged run judged: its answers.jsonl (`eval run`) or the answers file it was given."""
    if (out_dir / "answers.jsonl").exists():
        return load_answers(out_dir / "answers.jsonl")
    config = json.loads((out_dir / CONFIG_FILE).read_text()) if (out_dir / CONFIG_FILE).exists() else {}
    if not config.get("answers"):
        raise EvalError(f"{out_dir} is not a judged run folder (no answers.jsonl, no answers file in {CONFIG_FILE}).")
    return load_answers(config["answers"], config.get("reports"))


def _setup(out_dir: Path, judge_backend: str | TextBackend, criteria: str | Path | CriteriaSet | None,
           rule: str | AcceptanceRule, judge_config: JudgeConfig | None) -> tuple[Judge, dict]:
    criteria = criteria if isinstance(criteria, CriteriaSet) else load_criteria(criteria)
    rule = rule if isinstance(rule, AcceptanceRule) else AcceptanceRule.parse(rule, criteria)
    judge_config = judge_config or JudgeConfig()
    # The judge retries with its own backoff (and counts what failed), so the client does not retry too.
    backend = build_backend(judge_backend, BackendOptions(timeout=judge_config.timeout, max_retries=0)) \
        if isinstance(judge_backend, str) else judge_backend
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**judge_config.as_dict(), "judge_model": judge_model(backend),
                "criteria_fingerprint": criteria.fingerprint()}
    if JsonlLog(out_dir / "verdicts.jsonl").records():
        _check_resume(out_dir, "judge", settings, VERDICT_SETTINGS + ("judge_model", "criteria_fingerprint"),
                      "delete verdicts.jsonl there to judge again")
    _save_config(out_dir, judge={**settings, "backend": backend.name}, acceptance_rule=str(rule),
                 criteria=criteria.as_dict())
    return Judge(backend, criteria, rule, judge_config), {"judge": backend.name, "judge_model": judge_model(backend),
                                                          "judge_config": judge_config.as_dict()}


def judge_answers_file(answers: str | Path, out_dir: str | Path, judge_backend: str | TextBackend, *,
                       reports: str | Path | None = None, criteria: str | Path | CriteriaSet | None = None,
                       rule: str | AcceptanceRule = "major", judge_config: JudgeConfig | None = None,
                       retry_errors: bool = False, progress: Progress | None = None) -> RunResult:
    """`eval judge`: judge any system's answers file into a run folder (resumable)."""
    out_dir = Path(out_dir)
    items = load_answers(answers, reports)
    judge, extra = _setup(out_dir, judge_backend, criteria, rule, judge_config)
    _save_config(out_dir, answers=str(Path(answers).resolve()), reports=str(Path(reports).resolve()) if reports else None)
    stats = judge_items(items, judge, JsonlLog(out_dir / "verdicts.jsonl"), retry_errors=retry_errors,
                        progress=progress)
    summary = finalize(out_dir, items, judge.criteria, judge.rule,
                       extra={**extra, "answers": str(answers), "usage": judge.backend.usage.as_dict(),
                              "n_rejudged_changed": len(stats.changed), "rejudged_changed": stats.changed})
    return RunResult(out_dir, summary)


def run_eval(generate_config: "GenerateConfig", out_dir: str | Path, judge_backend: str | TextBackend, *,
             criteria: str | Path | CriteriaSet | None = None, rule: str | AcceptanceRule = "major",
             judge_config: JudgeConfig | None = None, model=None, retry_errors: bool = False,
             answer_progress: Callable[[str, int, int], None] | None = None, judge_progress: Progress | None = None,
             baselines: str | Sequence[str] = (), patient_map: str | Path | None = None,
             strict: bool = False) -> RunResult:
    """`eval run`: answers with a checkpoint for every test item, then judgements (both resumable).

    `baselines` (blind, shuffled) answers and judges every item again without its slide, and the
    summary reports their acceptance and the slide dependence. Test patients are checked against the
    checkpoint's training patients (a warning; `strict` refuses).
    """
    from .answers import answer_conditions

    out_dir = Path(out_dir)
    baselines = parse_baselines(baselines)
    patient_map = load_patient_map(patient_map) if patient_map else None
    items = load_test_items(generate_config.data, generate_config.features, generate_config.reports)
    patients = check_training_patients(generate_config.model, [s for i in items for s in item_images(i)],
                                       patient_map, strict)
    judge, extra = _setup(out_dir, judge_backend, criteria, rule, judge_config)  # fail fast on a bad judge spec
    logs = {c: JsonlLog(out_dir / ("answers.jsonl" if c == "model" else f"answers_{c}.jsonl"))
            for c in ["model", *baselines]}
    if logs["model"].records():
        _check_resume(out_dir, "generation", generate_config.as_dict(),
                      ("model", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size"),
                      "delete answers.jsonl there to answer again")
    _save_config(out_dir, generation=generate_config.as_dict())
    saved = json.loads((out_dir / CONFIG_FILE).read_text()).get("decoding")
    swap = case_derangement(items, patient_map) if "shuffled" in baselines else None
    decoded = answer_conditions(items, generate_config, logs, model, swap=swap, saved=saved,
                                errors=JsonlLog(out_dir / "errors.jsonl"), progress=answer_progress,
                                on_decoding=lambda d: _save_config(out_dir, decoding=d))
    answered = logs["model"].latest()
    errors = {r["id"]: r for r in JsonlLog(out_dir / "errors.jsonl").records() if r.get("condition", "model") == "model"}
    skipped = [{"id": i.id, "error": errors.get(i.id, {}).get("error", "not answered")}
               for i in items if i.id not in answered]
    judged, stats = {}, None
    for condition, log in logs.items():
        name = "verdicts.jsonl" if condition == "model" else f"verdicts_{condition}.jsonl"
        judge_set = [i for i in load_answers(log.path) if i.id in {t.id for t in items}] if log.latest() else []
        result = judge_items(judge_set, judge, JsonlLog(out_dir / name), retry_errors=retry_errors,
                             progress=judge_progress)
        stats = result if condition == "model" else stats
        judged[condition] = judge_set if condition == "model" else \
            compact_verdicts(out_dir, judge_set, judge.criteria, judge.rule, name)
    sources = {s: sum(1 for i in items if i.report_source == s) for s in ("record", "file", "reference")}
    extra = {**extra, "model": generate_config.model, "data": generate_config.data, "report_sources": sources,
             "usage": judge.backend.usage.as_dict(), "n_rejudged_changed": len(stats.changed),
             "rejudged_changed": stats.changed, "decoding": decoded, "patients": patients}
    summary = finalize(out_dir, judged["model"], judge.criteria, judge.rule, n_items=len(items), skipped=skipped,
                       extra=extra, baselines={c: v for c, v in judged.items() if c != "model"})
    return RunResult(out_dir, summary)
