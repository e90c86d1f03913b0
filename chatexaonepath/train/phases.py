"""The two training phases on the Hugging Face Trainer (accelerate underneath: DDP, FSDP, DeepSpeed).

Phase 1 (alignment): the LLM is frozen (no gradients, bf16 on GPU); the aggregator and projector learn
to turn a slide into tokens the LLM reads, on caption data. Phase 2 (instruction tuning) starts from
phase 1's checkpoint, wraps the LLM's q, k, v, o projections with LoRA (r=64, α=16, dropout 0.05)
and trains them with the tower, with the system prompt in every sample.

Every checkpoint (`<out>/checkpoint-N/` while training, `<out>/` at the end) is a ChatEXAONEPath
`save_pretrained` folder — config, tower weights, LoRA adapter, tokenizer — plus `training_args.json`
(phase and data configs, Trainer arguments, data hashes, result), so `--model <out>` loads it directly.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from ..chat.conversation import DEFAULT_SYSTEM_PROMPT, PromptBuilder
from ..chat.modeling import LORA_TARGETS, TOWER_WEIGHTS, ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from ..chat.provenance import check_features
from ..chat.typicality import Typicality
from ..vision_tower.features import read_features
from ..errors import ChatEXAONEPathError
from ..patients import patients_of, record_train_patients, seen_in_training, split_by_patient
from .data import (
    DataConfig, DataError, LoadedRecords, SlideCollator, SlideConversationDataset, data_summary, feature_statistics,
    features_dim, features_provenance, load_records,
)
from .trainer import TRAINING_ARGS, EpochCallback, LogCallback, TowerTrainer, finalize
from .validation import SELECT_BY, SELECTION_METRIC, SelectionCallback, resolve_select_by, short_answers

logger = logging.getLogger(__name__)

# LLaVA-1.5's recipe, which the paper follows: projector pre-training at 1e-3, LoRA tuning at 2e-4.
DEFAULT_LR = {1: 1e-3, 2: 2e-4}


@dataclass
class PhaseConfig:
    """One training phase: which model, how to optimise it, where to write it; saved with each checkpoint."""

    phase: int  # 1 (alignment, LLM frozen) or 2 (LoRA instruction tuning)
    out: str
    llm: str = "embedded"  # phase 1: the base LLM (hub id, path or `embedded`)
    init: str | None = None  # phase 2: the phase-1 checkpoint to start from
    num_visual_tokens: int = 1  # K; the paper uses one WSI token
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # in every phase-2 sample; the checkpoint records what it trained with
    phase1_system_prompt: bool = False  # phase 1 trains on bare captions (no system prompt), as LLaVA's pre-training
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    learning_rate: float | None = None  # None: 1e-3 in phase 1, 2e-4 in phase 2
    tower_learning_rate: float | None = None  # None: the same as learning_rate
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # per device
    gradient_accumulation: int = 4
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (the LLM's dtype; autocast for the tower on GPU)
    device: str = "auto"  # auto | cpu (forces CPU on a GPU machine)
    save_steps: int = 0  # 0: a checkpoint per epoch; N: every N steps (and at each epoch end with validation)
    validate_every: int = 1  # epochs between validations (each decodes the short validation answers)
    patience: int = 3  # with validation: stop after this many validations without a better score (0: never)
    select_by: str = "auto"  # the checkpoint kept: auto (loss in phase 1, exact match in phase 2), loss, exact_match
    save_total_limit: int = 2
    logging_steps: int = 10
    report_to: str = "auto"  # auto (TensorBoard when installed), none, tensorboard, wandb, or a comma list
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.phase not in (1, 2):
            raise ChatEXAONEPathError(f"phase must be 1 or 2, got {self.phase}.")
        if self.phase == 2 and not self.init:
            raise ChatEXAONEPathError("Phase 2 starts from a phase-1 checkpoint: pass --init runs/p1.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ChatEXAONEPathError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}.")
        if self.device not in ("auto", "cpu"):
            raise ChatEXAONEPathError(f"--device must be auto or cpu, got {self.device!r}.")
        for name in ("batch_size", "gradient_accumulation", "num_visual_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise ChatEXAONEPathError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.select_by not in SELECT_BY:
            raise ChatEXAONEPathError(f"--select-by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}.")
        if self.validate_every < 1:
            raise ChatEXAONEPathError(f"--validate-every must be at least 1 epoch, got {self.validate_every}.")
        if self.patience < 0:
            raise ChatEXAONEPathError(f"--patience must be 0 (never stop early) or more, got {self.patience}.")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.phase]
        self.lora_targets = list(self.lora_targets)


@dataclass
class TrainResult:
    """What a finished phase produced."""

    out: Path
    global_step: int
    train_loss: float | None
    best_eval_loss: float | None  # the validation loss of the checkpoint kept (None without validation)
    eval_losses: list[float]
    train_records: int
    val_records: int
    skipped_missing: int
    truncated: int
    seconds: float
    selection: dict = field(default_factory=dict)  # how the checkpoint was chosen (validation.py), {} without


# -- small named steps -----------------------------------------------------------------------------------
def training_device(config: PhaseConfig) -> torch.device:
    """The device this process trains on (its local GPU under torchrun/accelerate)."""
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_precision(config: PhaseConfig, device: torch.device) -> str:
    """fp32, bf16 or fp16: `auto` is bf16 on GPUs that have it and on CPUs that run it natively (llm.py).

    It is the frozen LLM's dtype and, below fp32, the autocast dtype of the tower and the LoRA weights,
    whose master copies stay fp32.
    """
    if config.precision == "fp16" and device.type != "cuda":
        raise ChatEXAONEPathError("--precision fp16 needs a GPU; use bf16 or fp32 on a CPU.")
    if config.precision != "auto":
        return config.precision
    from ..llm import choose_dtype

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(choose_dtype("auto", device), "fp32")


def build_model(config: PhaseConfig, train_records: list, device: torch.device,
                provenance: dict | None = None) -> ChatEXAONEPathForCausalLM:
    """Phase 1: a new tower around the base LLM, standardising features with the training bags' statistics.

    Phase 2: the phase-1 checkpoint (its feature statistics kept), with LoRA added; its data must be features
    made like phase 1's. The config records the system prompt the phase trains with and the features'
    `provenance` (`features_provenance`).
    """
    dtype = resolve_precision(config, device)
    in_dim = features_dim(train_records)
    if config.phase == 1:
        model_config = ChatEXAONEPathConfig(
            llm_name_or_path=config.llm, num_visual_tokens=config.num_visual_tokens, aggregator={"in_dim": in_dim},
            system_prompt=config.system_prompt if config.phase1_system_prompt else None,
            feature_provenance=provenance)
        model = ChatEXAONEPathForCausalLM.build(model_config, dtype=dtype, device=str(device))
        mean, std = feature_statistics(train_records, seed=config.seed)
        model.tower.set_feature_statistics(mean.to(model.device), std.to(model.device))
        return model
    init = Path(config.init)
    if not (init / "config.json").is_file() or not (init / TOWER_WEIGHTS).is_file():
        raise ChatEXAONEPathError(f"--init {init} is not a ChatEXAONEPath checkpoint (no config.json and "
                                  f"{TOWER_WEIGHTS}); pass the --out folder of a finished phase 1.")
    model = ChatEXAONEPathForCausalLM.from_pretrained(init, dtype=dtype, device=str(device), trainable=True)
    if model.config.aggregator["in_dim"] != in_dim:
        raise ChatEXAONEPathError(f"--init {init} takes {model.config.aggregator['in_dim']}-d patch features but the "
                                  f"data has {in_dim}-d ones; use features from the same encoder as phase 1.")
    if not model.config.tower_trained:
        logger.warning("%s has an untrained tower; phase 2 normally starts from phase 1's output.", init)
    if model.config.feature_provenance is None:
        model.config.feature_provenance = provenance
    else:
        check_features(model.config.feature_provenance, provenance or {}, "the phase-2 features have")
    model.config.system_prompt = config.system_prompt
    if model.config.lora is None:
        model.enable_lora(config.lora_r, config.lora_alpha, config.lora_dropout, tuple(config.lora_targets))
    else:
        logger.warning("%s already has a LoRA adapter; training it further (its r/α/targets are kept).", init)
    return model


def freeze_for_phase(model: ChatEXAONEPathForCausalLM, phase: int) -> dict[str, int]:
    """Phase 1: only the tower learns. Phase 2: the tower and the LoRA adapter. Returns parameter counts."""
    model.llm.requires_grad_(False)
    if phase == 2:
        for name, param in model.llm.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    model.tower.requires_grad_(True)
    counts = {"tower": sum(p.numel() for p in model.tower.parameters()),
              "llm_trainable": sum(p.numel() for p in model.llm.parameters() if p.requires_grad),
              "llm_total": sum(p.numel() for p in model.llm.parameters())}
    logger.info("Phase %d trains %s tower + %s LLM parameters (of %s)", phase, f"{counts['tower']:,}",
                f"{counts['llm_trainable']:,}", f"{counts['llm_total']:,}")
    return counts


def prompt_builder(model: ChatEXAONEPathForCausalLM) -> PromptBuilder:
    """The inference prompt builder with the system prompt the config records (`build_model` set it)."""
    return PromptBuilder(model.tokenizer, num_image_tokens=model.config.num_visual_tokens,
                         image_token=model.config.image_token, system_prompt=model.config.system_prompt,
                         style=model.config.prompt_style)


def report_targets(name: str) -> list[str]:
    """`auto` → TensorBoard when installed (W&B only when named or configured); plain logs always."""
    import importlib.util

    if name != "auto":
        return [] if name == "none" else [t.strip() for t in name.split(",") if t.strip()]
    targets = []
    if importlib.util.find_spec("tensorboard") is not None:
        targets.append("tensorboard")
    if importlib.util.find_spec("wandb") is not None and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
        targets.append("wandb")
    return targets


def training_arguments(config: PhaseConfig, device: torch.device, has_validation: bool) -> TrainingArguments:
    """Trainer arguments for a phase: schedule, checkpoints, validation and best-checkpoint selection."""
    by_steps = config.save_steps > 0
    strategy = "steps" if by_steps else "epoch"
    # Autocast the fp32 tower and LoRA weights to the LLM's precision (on CPUs too: bf16 halves the tower's cost).
    resolved = resolve_precision(config, device)
    mixed = {"bf16": resolved == "bf16", "fp16": resolved == "fp16"}
    return TrainingArguments(
        output_dir=config.out, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation,
        num_train_epochs=config.epochs, max_steps=config.max_steps, learning_rate=config.learning_rate,
        lr_scheduler_type=config.scheduler, warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, save_strategy=strategy, save_steps=config.save_steps or 500,
        eval_strategy=strategy if has_validation else "no", eval_steps=config.save_steps or None,
        # The best checkpoint is tracked (and kept from rotation) by the selection score (validation.py: exact
        # match on short answers, ties broken by the loss; else the loss); finalize() copies its files into
        # --out, which works alike for DDP, FSDP and DeepSpeed (Trainer's load_best_model_at_end does not).
        metric_for_best_model=SELECTION_METRIC if has_validation else None, greater_is_better=True,
        save_total_limit=config.save_total_limit, logging_steps=config.logging_steps, logging_first_step=True,
        report_to=report_targets(config.report_to), disable_tqdm=True, prediction_loss_only=True,
        remove_unused_columns=False, dataloader_num_workers=config.num_workers, seed=config.seed,
        data_seed=config.seed, use_cpu=device.type == "cpu", ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device.type == "cpu" and int(os.environ.get("WORLD_SIZE", 1)) > 1 else None, **mixed,
    )


# -- the phase ------------------------------------------------------------------------------------------------
def check_output_dir(config: PhaseConfig, resume: bool, run_info: dict) -> None:
    """Refuse to mix runs: an --out with checkpoints needs --resume, and --resume needs the same data."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(config.out)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        if resume:
            logger.warning("--resume: no checkpoint in %s yet, starting from the beginning.", out)
        return
    if not resume:
        raise ChatEXAONEPathError(f"{out} already holds checkpoints ({Path(last).name}); pass --resume to continue "
                                  "that run, or choose another --out.")
    saved_file = Path(last) / TRAINING_ARGS
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    if saved.get("data", {}).get("data_sha256") != run_info["data"]["data_sha256"]:
        raise ChatEXAONEPathError(f"The data files changed since {last} was written; resume with the same data, "
                                  "or start a new run in another --out.")
    free = ("logging_steps", "num_workers", "report_to", "save_total_limit")  # do not change the result
    old = {k: v for k, v in saved.get("phase_config", {}).items() if k not in free}
    new = {k: v for k, v in run_info["phase_config"].items() if k not in free}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise ChatEXAONEPathError(f"--resume needs the same settings as the interrupted run; changed: "
                                  f"{', '.join(changed)}.")


def prepare_data(config: PhaseConfig, data: DataConfig) -> tuple[LoadedRecords, list, list]:
    """Records, then the (train, validation) split by patient, or the explicit validation files."""
    loaded = load_records(data.data, data.features_dir, skip_missing=data.skip_missing)
    if data.val_data:
        val_loaded = load_records(data.val_data, data.features_dir, skip_missing=data.skip_missing)
        loaded.missing += val_loaded.missing
        train, val = loaded.records, val_loaded.records
        shared = {r.features_path for r in train} & {r.features_path for r in val}
        if shared:
            raise DataError(f"{len(shared)} slide(s) are in both the training and the validation data "
                            f"(e.g. {next(iter(shared)).name}); a slide must be on one side only.")
    else:
        train, val = split_by_patients(loaded.records, data.val_fraction, data.seed)
    return loaded, train, val


def split_by_patients(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded choice of about `val_fraction` of the patients, whole.

    A patient is the TCGA barcode's first 12 characters, else the slide (patients.py): two slides of one
    TCGA patient share one report, so a split by slide file would put that report on both sides.
    """
    if val_fraction <= 0:
        return records, []
    if len(patients_of(r.features_path for r in records)) < 2:
        logger.warning("Only one patient in the data: training without a validation split.")
        return records, []
    train, val = split_by_patient(records, val_fraction, seed, slide_of=lambda r: r.features_path)
    return train, val


def train_patients(config: PhaseConfig, train_records: list) -> list[str] | dict | None:
    """The `train_patients` record of training_args.json (docs/formats.md): salted hashes of the patients
    this phase trains on and, in phase 2, those its --init checkpoint records, under that record's salt.

    None when --init records none: a record of phase 2's patients alone would pass evaluation's leakage
    check while missing phase 1's.
    """
    patients = patients_of(r.features_path for r in train_records)
    if config.phase == 1:
        return record_train_patients(patients)
    path = Path(config.init) / TRAINING_ARGS
    try:
        earlier = json.loads(path.read_text()).get("train_patients") if path.is_file() else None
    except (ValueError, AttributeError) as e:
        raise ChatEXAONEPathError(f"{path} is not a JSON object ({e}); pass the --out folder of a finished "
                                  "phase 1.") from e
    if earlier is None:
        logger.warning("%s records no train_patients, so this checkpoint records none either: evaluation cannot "
                       "check its test patients against training.", path)
        return None
    seen_in_training([], earlier, str(path))  # a malformed record raises here, not in evaluation
    if isinstance(earlier, list):
        return record_train_patients([*earlier, *patients])
    record = record_train_patients(patients, salt=earlier["salt"])
    return {**record, "hashes": sorted(set(earlier["hashes"]) | set(record["hashes"]))}


def versions() -> dict:
    """Library versions, saved with each checkpoint."""
    import peft
    import transformers

    from .. import __version__

    return {"chatexaonepath": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def train_phase(config: PhaseConfig, data: DataConfig, *, resume: bool = False,
                callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """Run one phase end to end: data → model → Trainer → best (or last) checkpoint in `config.out`."""
    from transformers import set_seed

    started = time.perf_counter()
    loaded, train_records, val_records = prepare_data(config, data)
    provenance = features_provenance(train_records + val_records)
    run_info = {"phase": config.phase, "phase_config": asdict(config), "data": data_summary(data, train_records,
                val_records, loaded) | {"feature_provenance": provenance}, "versions": versions()}
    recorded = train_patients(config, train_records)
    if recorded is not None:
        run_info["train_patients"] = recorded
    check_output_dir(config, resume, run_info)
    device = training_device(config)
    run_info["precision"] = resolve_precision(config, device)  # what "auto" became here (the demo card shows it)
    set_seed(config.seed)  # the tower's (and LoRA's) initial weights
    model = build_model(config, train_records, device, provenance)
    run_info["parameters"] = freeze_for_phase(model, config.phase)
    if config.gradient_checkpointing:
        base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
        base.activation_checkpointing_enable({"use_reentrant": False})
    builder = prompt_builder(model)
    max_length = data.max_length or getattr(model.llm.config, "max_position_embeddings", None)
    train_set = SlideConversationDataset(train_records, builder, max_length=max_length,
                                         max_patches=data.max_patches, seed=data.seed)
    val_set = SlideConversationDataset(val_records, builder, max_length=max_length) if val_records else None
    args = training_arguments(config, device, val_set is not None)
    run_info["trainer_args"] = json.loads(args.to_json_string())
    select_by = resolve_select_by(config.select_by, config.phase)
    selection = SelectionCallback(config.patience, select_by)
    trainer = TowerTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
        data_collator=SlideCollator(model.tokenizer.pad_token_id),
        callbacks=[EpochCallback(train_set, val_set is not None, config.validate_every), LogCallback(), selection,
                   *(callbacks or [])],
        run_info=run_info, tower_learning_rate=config.tower_learning_rate,
        short_answers=short_answers(val_records, builder) if val_records and select_by != "loss" else None,
        select_by=select_by)
    output = trainer.train(resume_from_checkpoint=True if resume and _has_checkpoint(config.out) else None)
    history = trainer.state.log_history
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    chosen = selection.summary(trainer.state.best_model_checkpoint) if val_set is not None else {}
    best_loss = (chosen.get("chosen") or {}).get("eval_loss")
    trainer.run_info["result"] = {
        "global_step": trainer.state.global_step, "train_loss": output.training_loss,
        "best_eval_loss": best_loss, "best_checkpoint": trainer.state.best_model_checkpoint,
        "eval_losses": eval_losses, "truncated": train_set.truncated, "selection": chosen}
    finalize(trainer, Path(config.out))
    if trainer.args.should_save:
        calibrate_typicality(model, train_records + val_records, seed=config.seed).save(config.out)
    return TrainResult(Path(config.out), trainer.state.global_step, output.training_loss, best_loss,
                       eval_losses, len(train_set), len(val_set or []), len(loaded.missing), train_set.truncated,
                       time.perf_counter() - started, chosen)


def calibrate_typicality(model, records: list, *, max_slides: int = 512, max_patches: int = 1024,
                         seed: int = 0) -> Typicality:
    """The thresholds past which a slide is unlike this run's training and validation slides.

    Measured with the tower's own feature statistics, on every slide (a seeded sample past `max_slides`
    slides and `max_patches` patches a slide: reading every bag of a large cohort whole could take hours and
    more memory than the machine has).
    """
    paths = sorted({p for r in records for p in getattr(r, "features_paths", (r.features_path,))})  # every slide of a case
    if len(paths) > max_slides:
        paths = sorted(random.Random(seed).sample(paths, max_slides))
    mean, std = model.tower.feature_mean.float().cpu(), model.tower.feature_std.float().cpu()
    bags = []
    for i, path in enumerate(paths):
        bag = read_features(path).features
        if bag.shape[0] > max_patches:
            bag = bag[torch.randperm(bag.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + i))
                      [:max_patches]]
        bags.append(bag)
    return Typicality.calibrate(bags, mean, std, seed=seed)


def _has_checkpoint(out: str) -> bool:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(out).is_dir() and get_last_checkpoint(out) is not None
