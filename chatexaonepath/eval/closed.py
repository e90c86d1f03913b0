"""`eval closed`: closed-ended benchmark accuracy, with the blind and shuffled baselines.

A checkpoint answers every question through the same code as `eval run` (answers.py: batched,
resumable, decoded like serving), or another system's answers are scored (`--answers`: one
`{"id", "answer"}` per line). Each answer's choice is read from its free text (choices.py) and
scored; the run folder holds `answers.jsonl` (and `answers_blind.jsonl`, `answers_shuffled.jsonl`)
with `choice`, `how` and `correct` on every record, `summary.json`, `report.md`, `closed.png`,
`eval_config.json` and `errors.jsonl`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..fileio import atomic_write_json
from ..patients import load_patient_map
from .baselines import case_derangement, parse_baselines
from .choices import extract_choice
from .closed_data import ClosedItem, load_closed_items
from .closed_report import summarize_closed, write_closed_outputs
from .criteria import EvalError
from .data import JsonlLog, item_images, read_records
from .leakage import check_training_patients

logger = logging.getLogger(__name__)

CONFIG_FILE = "eval_config.json"
Progress = Callable[[str, int, int], None]  # (condition, done, total)
# Settings whose change makes stored answers incomparable with new ones.
ANSWER_SETTINGS = ("data", "instruction", "model", "answers", "max_new_tokens", "repetition_penalty",
                   "no_repeat_ngram_size")


def answers_file(condition: str) -> str:
    """answers.jsonl for the model's own answers, answers_<baseline>.jsonl for a baseline's."""
    return "answers.jsonl" if condition == "model" else f"answers_{condition}.jsonl"


@dataclass
class ClosedConfig:
    """Everything a closed-ended run is made with; saved in `eval_config.json`."""

    data: list[str]
    model: str | None = None  # a checkpoint answers …
    answers: str | None = None  # … or another system's answers are scored
    features: str | None = None
    baselines: list[str] = field(default_factory=list)
    instruction: str = ""  # appended to every question (e.g. "Answer with the option's letter.")
    batch_size: int = 8
    max_new_tokens: int = 32
    stain_norm: str | None = None
    allow_feature_mismatch: bool = False
    repetition_penalty: float | None = None  # None: the app's and chat's default
    no_repeat_ngram_size: int | None = None
    patient_map: str | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        self.baselines = parse_baselines(self.baselines)
        if (self.model is None) == (self.answers is None):
            raise EvalError("Give either --model (a checkpoint answers) or --answers (score another system's "
                            "answers), not both or neither.")
        if self.baselines and self.model is None:
            raise EvalError("--baselines needs --model: the baselines are the same model answering without its slide.")
        if self.model is not None and self.features is None:
            raise EvalError("--model needs --features DIR, the folder of the test slides' features.")

    def generation(self):
        """The GenerateConfig the answering code reads."""
        from .answers import GenerateConfig

        return GenerateConfig(model=str(self.model), data=", ".join(self.data), features=self.features,
                              batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                              stain_norm=self.stain_norm, allow_feature_mismatch=self.allow_feature_mismatch,
                              repetition_penalty=self.repetition_penalty,
                              no_repeat_ngram_size=self.no_repeat_ngram_size)

    def as_dict(self) -> dict:
        return {**asdict(self), "data": [str(Path(d).resolve()) for d in self.data]}


@dataclass
class ClosedResult:
    """Where a closed-ended run wrote its outputs, and its summary."""

    out_dir: Path
    summary: dict


def _saved_config(out_dir: Path) -> dict:
    path = out_dir / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _check_resume(out_dir: Path, config: ClosedConfig) -> None:
    saved = _saved_config(out_dir).get("closed") or {}
    if not saved or not (out_dir / "answers.jsonl").exists():
        return
    current = config.as_dict()
    changed = [f"{k}: {saved.get(k)!r} → {current.get(k)!r}" for k in ANSWER_SETTINGS if saved.get(k) != current.get(k)]
    if changed:
        raise EvalError(f"{out_dir} holds answers made with other settings ({'; '.join(changed)}); use a new --out, "
                        "or delete its answers*.jsonl to answer again.")


def run_closed(config: ClosedConfig, out_dir: str | Path, *, model=None,
               progress: Progress | None = None) -> ClosedResult:
    """Answer (or read) every closed-ended question, score the choices, write the run folder (resumable)."""
    out_dir = Path(out_dir)
    patient_map = load_patient_map(config.patient_map) if config.patient_map else None
    loaded = load_closed_items(config.data, config.features, instruction=config.instruction,
                               require_features=config.model is not None)
    items = loaded.items
    patients = check_training_patients(config.model, [s for i in items for s in item_images(i)], patient_map,
                                       config.strict)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(out_dir, config)
    saved = _saved_config(out_dir)
    atomic_write_json(out_dir / CONFIG_FILE, {**saved, "closed": config.as_dict()})
    extra: dict = {"data": config.data, "instruction": config.instruction, "patients": patients}
    if config.model is not None:
        extra["decoding"] = _answer_with_model(config, items, out_dir, model, patient_map, progress)
        extra["model"] = config.model
    else:
        _copy_answers(Path(config.answers), items, out_dir)
        extra["answers"] = config.answers
    errors = JsonlLog(out_dir / "errors.jsonl").records()
    scored, skipped = {}, []
    for condition in ["model", *config.baselines]:
        reasons = {r["id"]: r for r in errors if r.get("condition", "model") == condition}
        scored[condition], missing = _score(items, out_dir / answers_file(condition), reasons)
        if condition == "model":
            skipped = missing
    summary = summarize_closed(scored, n_items=len(items), skipped=skipped, not_closed=loaded.not_closed,
                               extra={"name": out_dir.resolve().name, **extra})
    write_closed_outputs(out_dir, summary)
    return ClosedResult(out_dir, summary)


def _answer_with_model(config: ClosedConfig, items: list[ClosedItem], out_dir: Path, model, patient_map,
                       progress: Progress | None) -> dict:
    """Generate every missing answer of every condition; returns the decoding settings used."""
    from .answers import answer_conditions

    swap = case_derangement(items, patient_map) if "shuffled" in config.baselines else None
    logs = {c: JsonlLog(out_dir / answers_file(c)) for c in ["model", *config.baselines]}
    return answer_conditions(
        items, config.generation(), logs, model, swap=swap, saved=_saved_config(out_dir).get("decoding"),
        errors=JsonlLog(out_dir / "errors.jsonl"), progress=progress,
        on_decoding=lambda d: atomic_write_json(out_dir / CONFIG_FILE, {**_saved_config(out_dir), "decoding": d}))


def _copy_answers(path: Path, items: list[ClosedItem], out_dir: Path) -> None:
    """Another system's answers → answers.jsonl in the run folder (unknown ids refused, naming the line)."""
    by_id = {i.id: i for i in items}
    records = []
    for number, record in enumerate(read_records(path, "Answers"), 1):
        if not isinstance(record.get("id"), (str, int)) or not isinstance(record.get("answer"), str):
            raise EvalError(f"{path} line {number} needs an 'id' and a text 'answer'.")
        item = by_id.get(str(record["id"]))
        if item is None:
            raise EvalError(f"{path} line {number}: id {record['id']!r} is not a question of the test data.")
        records.append({**item.answer_fields(), "answer": record["answer"], "condition": "model",
                        "answered_by": str(path)})
    JsonlLog(out_dir / "answers.jsonl").rewrite(records)


def _score(items: list[ClosedItem], path: Path, errors: dict) -> tuple[list[dict], list[dict]]:
    """(scored answers, questions without an answer); rewrites the answers file with choice, how, correct."""
    log = JsonlLog(path)
    answers = log.latest()
    scored, missing = [], []
    for item in items:
        record = answers.get(item.id)
        if record is None:
            missing.append({"id": item.id, "error": errors.get(item.id, {}).get("error", "not answered")})
            continue
        choice = extract_choice(record.get("answer") or "", item.options)
        scored.append({**record, "choice": choice.choice, "how": choice.how, "correct": choice.choice == item.answer,
                       "slide": item.slide, "file": item.file, "category": item.category,
                       "subcategory": item.subcategory})
    log.rewrite(scored + [r for i, r in answers.items() if i not in {s["id"] for s in scored}])
    return scored, missing
