"""The whole pipeline on one machine, end to end: `chatexaonepath quickstart --out DIR`.

synthetic lesion cohort (slides of colon, liver or lymph node carrying small lesions, a report each;
synthetic/lesions.py) → feature extraction → RAIDER on the training reports (the embedded LLM) →
phase 1 → phase 2 → evaluation (on held-out slides: the diagnosis, organ and grade accuracy and the
localisation AUC of the heatmap, as bench/learn_lesions.py measures them; the seven-criteria judge
only when `judge` names a capable model) → a model folder the app and the chat open. Every stage
resumes, so a rerun after a kill goes on where it stopped; each writes where its own command would.

    DIR/cohort/      slides/, masks/, reports/, labels.csv, captions.json, instruct.json, test.json
    DIR/features/    <slide_id>.h5 (+ thumbnails/)
    DIR/raider/      reports.jsonl …, db/, questions.yaml, instructions.json (+ .summary.json, .log.jsonl …)
    DIR/runs/p1/     phase-1 checkpoint
    DIR/model/       phase-2 checkpoint: `chatexaonepath app --model DIR/model`
    DIR/eval/        answers.jsonl, verdicts.jsonl, summary.json, report.md, criteria.png
    DIR/quickstart.json  the config and each stage's outcome
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .synthetic.demo_model import DemoBuildConfig
from .errors import ChatEXAONEPathError
from .fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# RAIDER's questions for the synthetic reports, which state the organ, a diagnosis, a grade and the margins only.
QUICKSTART_QUESTIONS = """\
# Questions RAIDER asks of the synthetic lesion reports (organ, diagnosis, grade, margins; nothing more).
version: 1
categories:
  - id: diagnosis
    sections: [diagnosis, synoptic, comment, microscopic]
    questions:
      - What is the diagnosis?
      - What lesion does the section show?
  - id: organ
    sections: [specimen, diagnosis, gross, synoptic, clinical]
    questions:
      - Which organ is this tissue from?
  - id: grade
    sections: [diagnosis, synoptic, microscopic, comment]
    questions:
      - What is the grade of the lesion?
  - id: margins
    sections: [margins, synoptic, diagnosis, comment]
    questions:
      - Are the margins involved?
"""
RAIDER_CATEGORIES = ["diagnosis", "organ", "grade", "margins"]
JUDGE_SKIPPED = ("skipped: the embedded 135M LLM cannot write the judge's verdicts (on this quickstart it produced "
                 "only judge errors); pass --judge openai:MODEL@URL or ollama:MODEL to run the seven-criteria judge")

StageFn = Callable[[str, int | None, int | None], None]  # (stage, done, total) → progress display


@dataclass
class QuickstartConfig:
    """Sizes and models of the quickstart: the demo build's cohort and recipe, plus RAIDER (17 min on 2 bf16 cores)."""

    # The demo model's cohort (train / validation / test slides per organ × diagnosis) and slide size.
    split_sizes: tuple[int, int, int] = DemoBuildConfig.split_sizes
    size: int = DemoBuildConfig.size  # slide side in level-0 pixels at 0.5 µm/px (~90 patches a slide)
    encoder: str | None = None  # exaonepath when its weights are found, else random-vit-b16
    llm: str = "embedded"
    raider_llm: str = "local:embedded"
    judge: str | None = None  # None: the judge stage is skipped (JUDGE_SKIPPED says why)
    phase1_epochs: float = DemoBuildConfig.phase1_epochs  # the demo's, measured on 32 slides of this size
    phase2_epochs: float = DemoBuildConfig.phase2_epochs
    judge_items: int = 6  # held-out answers the judge reads
    seed: int = 0
    cohort: dict = field(default_factory=dict)  # further LesionCohortConfig settings (organs, lesions…), as the demo's


def _done(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "tower.safetensors").is_file()


def _trained_on(directory: Path, data: list[Path]) -> bool:
    """True when the run in `directory` (finished, else its last checkpoint) was on exactly these data files.

    `data` is every file the run read, its validation files included (they are in the run's data_sha256).
    """
    from transformers.trainer_utils import get_last_checkpoint

    from .train.data import data_files_sha256
    from .train.trainer import TRAINING_ARGS

    if not _done(directory):
        last = get_last_checkpoint(str(directory)) if directory.is_dir() else None
        if last is None:
            return False
        directory = Path(last)
    try:
        return json.loads((directory / TRAINING_ARGS).read_text())["data"]["data_sha256"] == data_files_sha256(data)
    except (OSError, ValueError, KeyError, TypeError):  # an older or damaged checkpoint: train it again
        return False


class Quickstart:
    """Runs the stages in order; each is skipped or resumed when its outputs are already there."""

    def __init__(self, out: str | Path, config: QuickstartConfig, on_progress: StageFn | None = None) -> None:
        self.out, self.config = Path(out), config
        self.on_progress = on_progress or (lambda stage, done, total: None)
        self.results: dict[str, Any] = {}
        self._retrained = False  # a training stage ran in this call (the ones after it are then stale)
        self.cohort, self.features = self.out / "cohort", self.out / "features"
        self.raider, self.p1, self.model, self.eval = (self.out / "raider", self.out / "runs" / "p1",
                                                       self.out / "model", self.out / "eval")

    def run(self) -> dict[str, Any]:
        """All stages; returns (and saves in quickstart.json) what each produced and how long it took."""
        self.out.mkdir(parents=True, exist_ok=True)
        for name, stage in (("cohort", self.make_cohort), ("features", self.extract), ("raider", self.run_raider),
                            ("phase 1", self.train_phase1), ("phase 2", self.train_phase2),
                            ("evaluation", self.evaluate)):
            started = time.perf_counter()
            self.on_progress(name, None, None)
            self.results[name] = stage() | {"seconds": round(time.perf_counter() - started, 1)}
            self._save()
        return self.results

    def _save(self) -> None:
        atomic_write_json(self.out / "quickstart.json", {"config": asdict(self.config), "stages": self.results})

    def make_cohort(self) -> dict:
        from .synthetic.lesions import LesionCohortConfig, make_lesion_cohort

        config = LesionCohortConfig(per_combination=tuple(self.config.split_sizes), size=self.config.size,
                                    seed=self.config.seed, **self.config.cohort)
        make_lesion_cohort(self.cohort, config, progress=lambda done, total: self.on_progress("cohort", done, total))
        return {"slides": config.slides, "diagnoses": config.diagnoses}

    def extract(self) -> dict:
        from .vision_tower.batch import extract_slides
        from .vision_tower.encoder import build_encoder_or_random
        from .vision_tower.extraction import ExtractConfig, FeatureExtractor

        encoder = build_encoder_or_random(self.config.encoder)
        config = ExtractConfig(encoder=encoder.name, seed=self.config.seed)
        extractor = FeatureExtractor(config, encoder)
        slides = sorted((self.cohort / "slides").glob("*.tiff"))
        done = {"n": 0}

        def on_slide_start(slide, total):
            done["n"] += 1
            self.on_progress("features", done["n"], len(slides))

        summary = extract_slides([self.cohort / "slides"], self.features, config, on_slide_start=on_slide_start,
                                 extractor=extractor)
        if summary.failed:
            raise ChatEXAONEPathError(f"{len(summary.failed)} synthetic slides failed to extract; see "
                                      f"{summary.errors_file}.")
        return {"encoder": encoder.name, "encoder_weights": encoder.weights_source,
                "patches": sum(max(r.num_patches, 0) for r in summary.results)}

    def run_raider(self) -> dict:
        from .backends import build_backend
        from .raider.chunking import chunk_report
        from .raider.generate import GenerateConfig, generate_answers, load_questions
        from .raider.index import ChunkIndex, Embedder
        from .raider.ingest import read_reports, write_ingested
        from .raider.records import OutputPaths, RecordOptions, write_outputs
        from .synthetic.lesions import read_lesion_labels

        labels = read_lesion_labels(self.cohort / "labels.csv")
        # Only the training slides' reports: a test report in the training data would leak the answer.
        train_reports = [self.cohort / "reports" / f"{sid}.txt" for sid, row in labels.items()
                         if row["split"] == "train"]
        reports, unreadable = read_reports(train_reports)
        mapped = write_ingested(self.raider, reports, unreadable, sorted(labels))
        index = ChunkIndex(self.raider / "db", Embedder())
        index.add([c for r in reports for c in chunk_report(r.report_id, r.text)])
        questions_file = atomic_write_text(self.raider / "questions.yaml", QUICKSTART_QUESTIONS)
        questions = load_questions(questions_file)
        paths = OutputPaths.for_out(self.raider / "instructions.json")
        backend = build_backend(self.config.raider_llm)
        report_ids = sorted(r.report_id for r in reports)
        total = {"n": 0}
        # No captions: phase 1 trains on the cohort's finding-only captions (see _train), so RAIDER's would go
        # unused, and they are its slowest requests (30 words, and the small answerer mostly needs three tries).
        log, stats = generate_answers(
            index, backend, questions, paths.log, GenerateConfig(max_tokens=32, seed=self.config.seed, captions=False),
            report_ids,
            on_plan=lambda n, done: total.update(n=n, done=done),
            on_record=lambda record: (total.update(done=total["done"] + 1),
                                      self.on_progress("raider", total["done"], total["n"])))
        # One conversation per slide: the system prompt once for all its answers (training time is per token).
        summary = write_outputs(paths, list(log.records.values()), mapped["mapping"], RecordOptions(multi_turn=True),
                                RAIDER_CATEGORIES, {"backend": backend.name})
        return {key: summary[key] for key in ("generated", "not_mentioned", "rejected", "instruction_records",
                                              "caption_records")}

    def _train(self, phase: int) -> dict:
        from .synthetic.demo_model import recipe_data_config, recipe_phase_config, step_progress
        from .train.phases import train_phase

        # The demo model's recipe (docs/demo_model.md), measured to find the lesion on a CPU.
        recipe = DemoBuildConfig(llm=self.config.llm, phase1_epochs=self.config.phase1_epochs,
                                 phase2_epochs=self.config.phase2_epochs, seed=self.config.seed)
        config = recipe_phase_config(recipe, phase, self.p1 if phase == 1 else self.model, self.p1)
        # Phase 1 trains on the cohort's captions; phase 2 adds RAIDER's answers about the training reports. Both
        # keep the checkpoint the validation slides score best (never the held-out test slides).
        data = [self.cohort / "captions.json"] if phase == 1 else [self.cohort / "instruct.json",
                                                                   self.raider / "instructions.json"]
        val_data = [self.cohort / ("val_captions.json" if phase == 1 else "val_instruct.json")]
        out = Path(config.out)
        data = [p for p in data if json.loads(p.read_text())]
        # A run's data_sha256 covers its validation files too. Phase 2 starts from phase 1, so a phase 1
        # trained anew makes any phase 2 stale too.
        current = _trained_on(out, [*data, *val_data]) and not (phase == 2 and self._retrained)
        if current and _done(out):
            return {"skipped": "already trained"}
        if out.exists() and not current:
            # RAIDER's answers (or phase 1) changed since this was trained: serving it would not match them.
            logger.warning("Phase %d in %s was trained on other data; training it again.", phase, out)
            shutil.rmtree(out)
        self._retrained = True
        data_config = recipe_data_config(recipe, phase, data, self.features, val_data, skip_missing=True)
        result = train_phase(config, data_config, resume=out.is_dir(),
                             callbacks=[step_progress(f"phase {phase}", self.on_progress)])
        return {"steps": result.global_step, "train_loss": result.train_loss,
                "best_eval_loss": result.best_eval_loss, "records": result.train_records}

    def train_phase1(self) -> dict:
        return self._train(1)

    def train_phase2(self) -> dict:
        return self._train(2)

    def evaluate(self) -> dict:
        from .chat.modeling import ChatEXAONEPathForCausalLM
        from .synthetic.scores import CohortView, score_lesion_cohort

        model = ChatEXAONEPathForCausalLM.from_pretrained(self.model)
        view = CohortView.load(self.cohort, self.features)
        self.on_progress("evaluation", 0, len(view.ids))
        score = score_lesion_cohort(model, view,
                                    on_slide=lambda done, total: self.on_progress("evaluation", done, total))
        atomic_write_json(self.out / "held_out_answers.json", score.answers)
        outcome = {f"{category}_accuracy": value for category, value in score.accuracy.items()}
        outcome |= {"localisation_auc": score.localisation_auc, "localisation_auc_lenient": score.localisation_auc_lenient,
                    "held_out_slides": len(view.ids)}
        if self.config.judge is None:
            logger.warning("Judge %s.", JUDGE_SKIPPED)
            return outcome | {"judge": JUDGE_SKIPPED}
        return outcome | self._judge(model)

    def _judge(self, model) -> dict:
        from .eval.answers import GenerateConfig
        from .eval.judge import JudgeConfig
        from .eval.run import run_eval

        test = json.loads((self.cohort / "test.json").read_text())
        subset = atomic_write_json(self.eval / "test_subset.json", test[: self.config.judge_items])
        result = run_eval(
            GenerateConfig(model=str(self.model), data=str(subset), features=str(self.features),
                           reports=str(self.cohort / "reports"), max_new_tokens=32),
            self.eval, self.config.judge, judge_config=JudgeConfig(concurrency=1, max_tokens=384), model=model,
            judge_progress=lambda n, total: self.on_progress("evaluation", n, total))
        summary = result.summary
        return {"judged": summary.get("n"), "acceptance_rate": summary.get("acceptance_rate"),
                "judge_errors": summary.get("n_judge_errors")}
