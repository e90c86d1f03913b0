"""The whole pipeline on one machine, end to end: `chatexaonepath quickstart --out DIR`.

synthetic cohort (slides + reports) → feature extraction → RAIDER on the training reports (the
embedded LLM) → phase 1 → phase 2 → evaluation (the diagnosis accuracy on held-out slides, and
the seven-criteria judge) → a model folder the app and the chat open. Every stage resumes, so a
rerun after a kill goes on where it stopped; each writes where the stage's own command would.

    DIR/cohort/      slides/, reports/, labels.csv, captions.json, instruct.json, test.json
    DIR/features/    <slide_id>.h5 (+ thumbnails/)
    DIR/raider/      reports.jsonl …, db/, questions.yaml, instructions.json (+ .captions.json …)
    DIR/runs/p1/     phase-1 checkpoint
    DIR/model/       phase-2 checkpoint: `chatexaonepath app --model DIR/model`
    DIR/eval/        answers.jsonl, verdicts.jsonl, summary.json, report.md, criteria.png
    DIR/quickstart.json  the config and each stage's outcome
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ChatEXAONEPathError
from .fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# RAIDER's questions for the synthetic reports, which state a diagnosis and a microscopic finding only.
QUICKSTART_QUESTIONS = """\
# Questions RAIDER asks of the synthetic reports (they hold a diagnosis and a finding, nothing more).
version: 1
categories:
  - id: diagnosis
    questions:
      - What is the diagnosis?
      - What is the final diagnosis for this slide?
      - What does the section show under the microscope?
"""

StageFn = Callable[[str, int | None, int | None], None]  # (stage, done, total) → progress display


@dataclass
class QuickstartConfig:
    """Sizes and models of the quickstart; the defaults finish within about 30 minutes on 2 CPU cores."""

    slides: int = 40
    size: int = 1024  # slide side in level-0 pixels at 0.5 µm/px (bench/learn_synthetic.py's setting)
    classes: list[str] = field(default_factory=lambda: ["tumor", "stroma", "normal", "necrosis", "lymphoid"])
    encoder: str | None = None  # exaonepath when its weights are found, else random-vit-b16
    llm: str = "embedded"
    raider_llm: str = "local:embedded"
    judge: str = "local:embedded"
    phase1_epochs: float = 4.0
    phase2_epochs: float = 2.0
    judge_items: int = 6  # held-out answers the judge reads (a 135M judge is slow and weak; see docs)
    seed: int = 0


def _done(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "tower.safetensors").is_file()


class Quickstart:
    """Runs the stages in order; each is skipped or resumed when its outputs are already there."""

    def __init__(self, out: str | Path, config: QuickstartConfig, on_progress: StageFn | None = None) -> None:
        self.out, self.config = Path(out), config
        self.on_progress = on_progress or (lambda stage, done, total: None)
        self.results: dict[str, Any] = {}
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
        from .train.cohort import CohortConfig, make_cohort

        config = CohortConfig(slides=self.config.slides, classes=list(self.config.classes), size=self.config.size,
                              seed=self.config.seed)
        make_cohort(self.cohort, config, progress=lambda done, total: self.on_progress("cohort", done, total))
        return {"slides": config.slides, "classes": config.classes}

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
        from .train.cohort import read_labels

        labels = read_labels(self.cohort / "labels.csv")
        # Only the training slides' reports: a test report in the training data would leak the answer.
        train_reports = [self.cohort / "reports" / f"{sid}.txt" for sid, (_, split) in labels.items()
                         if split == "train"]
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
        log, stats = generate_answers(
            index, backend, questions, paths.log, GenerateConfig(max_tokens=32, seed=self.config.seed), report_ids,
            on_plan=lambda n, done: total.update(n=n, done=done),
            on_record=lambda record: (total.update(done=total["done"] + 1),
                                      self.on_progress("raider", total["done"], total["n"])))
        summary = write_outputs(paths, list(log.records.values()), mapped["mapping"], RecordOptions(),
                                ["diagnosis"], {"backend": backend.name})
        return {key: summary[key] for key in ("generated", "not_mentioned", "rejected", "instruction_records",
                                              "caption_records")}

    def _train(self, phase: int) -> dict:
        from .train.data import DataConfig
        from .train.phases import PhaseConfig, train_phase

        raider = self.raider / "instructions.json"
        # The settings bench/learn_synthetic.py found to learn on this cohort within minutes on a CPU.
        common = dict(batch_size=4, gradient_accumulation=1, warmup_ratio=0.1, report_to="none", save_total_limit=1,
                      seed=self.config.seed)
        if phase == 1:
            data = [self.cohort / "captions.json", raider.with_name("instructions.captions.json")]
            config = PhaseConfig(phase=1, out=str(self.p1), llm=self.config.llm, epochs=self.config.phase1_epochs,
                                 learning_rate=2e-3, **common)
        else:
            data = [self.cohort / "instruct.json", raider]
            config = PhaseConfig(phase=2, out=str(self.model), init=str(self.p1), epochs=self.config.phase2_epochs,
                                 tower_learning_rate=1e-3, **common)
        out = Path(config.out)
        if _done(out):
            return {"skipped": "already trained"}
        data_config = DataConfig(data=[str(p) for p in data if json.loads(p.read_text())],
                                 features_dir=str(self.features), skip_missing=True, seed=self.config.seed)

        from transformers import TrainerCallback

        on_progress = self.on_progress
        name = f"phase {phase}"

        class Progress(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                on_progress(name, state.global_step, state.max_steps)

        result = train_phase(config, data_config, resume=out.is_dir(), callbacks=[Progress()])
        return {"steps": result.global_step, "train_loss": result.train_loss,
                "best_eval_loss": result.best_eval_loss, "records": result.train_records}

    def train_phase1(self) -> dict:
        return self._train(1)

    def train_phase2(self) -> dict:
        return self._train(2)

    def evaluate(self) -> dict:
        from .chat.modeling import ChatEXAONEPathForCausalLM
        from .eval.answers import GenerateConfig
        from .eval.judge import JudgeConfig
        from .eval.run import run_eval
        from .train.cohort import score_diagnoses

        model = ChatEXAONEPathForCausalLM.from_pretrained(self.model)
        score = score_diagnoses(model, self.cohort, self.features)
        atomic_write_json(self.out / "diagnosis_answers.json", score.answers)
        test = json.loads((self.cohort / "test.json").read_text())
        subset = atomic_write_json(self.eval / "test_subset.json", test[: self.config.judge_items])
        result = run_eval(
            GenerateConfig(model=str(self.model), data=str(subset), features=str(self.features),
                           reports=str(self.cohort / "reports"), max_new_tokens=32),
            self.eval, self.config.judge, judge_config=JudgeConfig(concurrency=1, max_tokens=384), model=model,
            judge_progress=lambda n, total: self.on_progress("evaluation", n, total))
        summary = result.summary
        return {"diagnosis_accuracy": score.accuracy, "held_out_slides": len(score.answers),
                "judged": summary.get("n"), "acceptance_rate": summary.get("acceptance_rate"),
                "judge_errors": summary.get("n_judge_errors")}
