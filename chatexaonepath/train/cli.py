"""`chatexaonepath train …` commands (joined into the one CLI by chatexaonepath/cli.py).

Heavy imports stay inside the commands so `chatexaonepath --help` stays fast. The same commands run
under `torchrun` / `accelerate launch` (DDP, FSDP, DeepSpeed): only rank 0 prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Two-phase training: alignment (LLM frozen), then LoRA instruction tuning.", no_args_is_help=True)

Data = Annotated[list[Path], typer.Option("--data", help="LLaVA JSON/JSONL training data (repeat for several files).")]
Features = Annotated[Optional[Path], typer.Option("--features", help="Folder of <slide_id>.h5/.pt features that 'image' ids name.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoint-N/ while training, the final model itself at the end.")]
ValData = Annotated[Optional[list[Path]], typer.Option("--val-data", help="Explicit validation data (instead of a split).")]
ValFraction = Annotated[float, typer.Option(help="Fraction of PATIENTS (TCGA barcode, else slide) held out for validation each epoch (0: none).")]
Patience = Annotated[int, typer.Option(help="With validation: stop after N validations without a better score (0: never).")]
ValidateEvery = Annotated[int, typer.Option(help="Validate (and keep a checkpoint) every N epochs.")]
SelectBy = Annotated[str, typer.Option(help="The checkpoint kept: auto (loss in phase 1, exact match of short answers in phase 2), loss, exact_match.")]
MaxPatches = Annotated[Optional[int], typer.Option(help="Randomly subsample larger bags to N patches while training.")]
MaxLength = Annotated[Optional[int], typer.Option(help="Cut longer samples at the end (default: the LLM's context).")]
SkipMissing = Annotated[bool, typer.Option("--skip-missing", help="Leave out records whose features are missing (counted).")]
Epochs = Annotated[Optional[float], typer.Option(help="Passes over the training data.")]
MaxSteps = Annotated[int, typer.Option(help="Stop after N optimizer steps (overrides --epochs).")]
BatchSize = Annotated[int, typer.Option(help="Samples per device per step.")]
GradAccum = Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default: 1e-3 phase 1, 2e-4 phase 2).")]
TowerLr = Annotated[Optional[float], typer.Option("--tower-lr", help="Learning rate of aggregator+projector (default: --lr).")]
Warmup = Annotated[float, typer.Option(help="Warmup as a fraction of the steps.")]
Scheduler = Annotated[str, typer.Option(help="LR schedule (transformers names: cosine, linear, constant…).")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
GradCkpt = Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute LLM activations in backward (less memory).")]
Precision = Annotated[str, typer.Option(help="LLM dtype: auto (bf16 on GPU / bf16-capable CPUs), fp32, bf16, fp16.")]
Device = Annotated[str, typer.Option(help="auto or cpu.")]
SaveSteps = Annotated[int, typer.Option(help="Checkpoint every N steps (0: every epoch).")]
SaveLimit = Annotated[int, typer.Option(help="Checkpoints kept (the best one is always kept).")]
LogSteps = Annotated[int, typer.Option(help="Log every N steps.")]
ReportTo = Annotated[str, typer.Option(help="auto (TensorBoard if installed), none, tensorboard, wandb.")]
Workers = Annotated[int, typer.Option(help="DataLoader worker processes.")]
Seed = Annotated[int, typer.Option(help="Seed for weights, order, split and patch sampling.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint in --out.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log every logging step.")]


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _progress_callback(progress):
    """A TrainerCallback that drives a rich progress bar (steps, loss)."""
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        task = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.task = progress.add_task("training", total=state.max_steps, unit="steps")

        def on_step_end(self, args, state, control, **kwargs):
            progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                progress.update(self.task, description=f"training (loss {logs['loss']:.3f})")
            if logs and "eval_loss" in logs:
                match = logs.get("eval_exact_match")
                extra = f", exact match {match:.2f}" if match is not None and match == match else ""
                progress.console.print(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}{extra}")

    return RichProgress()


def _run(phase_kwargs: dict, data_kwargs: dict, resume: bool, quiet: bool, verbose: bool) -> None:
    from rich.table import Table

    from ..progress import console, progress_bar, setup_logging
    from .data import DataConfig
    from .phases import PhaseConfig, train_phase

    main = _is_main_process()
    setup_logging(verbose, quiet or not main)
    phase = PhaseConfig(**{k: v for k, v in phase_kwargs.items() if v is not None})
    data = DataConfig(**data_kwargs)
    with progress_bar(quiet or not main) as progress:
        result = train_phase(phase, data, resume=resume, callbacks=[_progress_callback(progress)] if main else [])
    if quiet or not main:
        return
    table = Table(title=f"Phase {phase.phase} → {result.out}", show_header=False)
    rows = [("steps", str(result.global_step)),
            ("train loss", f"{result.train_loss:.4f}" if result.train_loss is not None else "–"),
            ("eval loss per epoch", ", ".join(f"{x:.4f}" for x in result.eval_losses) or "no validation"),
            ("exact match per epoch", ", ".join(f"{h['eval_exact_match']:.2f}" for h in result.selection.get("history", [])
                                                if h.get("eval_exact_match") == h.get("eval_exact_match")) or "–"),
            ("kept", _kept(result.selection)),
            ("records train / validation", f"{result.train_records} / {result.val_records}"),
            ("skipped (missing features)", str(result.skipped_missing)),
            ("cut to --max-length", str(result.truncated)),
            ("time", f"{result.seconds:.0f} s")]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if phase.phase == 1:
        console.print(f"next: chatexaonepath train phase2 --init {result.out} --data instruct.json "
                      f"--features {data.features_dir or 'DIR'} --out runs/p2")
    else:
        console.print(f"chat with it: chatexaonepath chat SLIDE --model {result.out}")


def _kept(selection: dict) -> str:
    """The checkpoint validation chose, in a few words."""
    chosen = selection.get("chosen")
    if not chosen:
        return "the last (no validation)"
    match = chosen.get("eval_exact_match")
    figures = f"exact match {match:.2f}, " if match == match and match is not None else ""
    stop = f"; stopped early at epoch {selection['stopped_early_at_epoch']:.0f}" if selection.get("stopped_early_at_epoch") else ""
    return f"epoch {chosen['epoch']:g} ({figures}eval loss {chosen['eval_loss']:.4f}){stop}"


def _data_kwargs(data, features, val_data, val_fraction, max_patches, max_length, skip_missing, seed) -> dict:
    return {"data": [str(p) for p in data], "features_dir": str(features) if features else None,
            "val_data": [str(p) for p in val_data or []], "val_fraction": val_fraction, "max_patches": max_patches,
            "max_length": max_length, "skip_missing": skip_missing, "seed": seed}


@app.command("phase1")
def phase1(
    data: Data, out: Out, features: Features = None,
    llm: Annotated[str, typer.Option(help="Base LLM: a HF id, a local path, or 'embedded' (SmolLM2-135M).")] = "embedded",
    visual_tokens: Annotated[int, typer.Option(help="K visual tokens per slide (the paper: 1).")] = 1,
    with_system_prompt: Annotated[bool, typer.Option("--with-system-prompt", help="Put the system prompt in phase-1 samples too.")] = False,
    val_data: ValData = None, val_fraction: ValFraction = 0.05, max_patches: MaxPatches = None,
    max_length: MaxLength = None, skip_missing: SkipMissing = False, epochs: Epochs = 1.0, max_steps: MaxSteps = -1,
    batch_size: BatchSize = 4, grad_accum: GradAccum = 4, lr: Lr = None, tower_lr: TowerLr = None,
    warmup_ratio: Warmup = 0.03, scheduler: Scheduler = "cosine", weight_decay: WeightDecay = 0.0,
    gradient_checkpointing: GradCkpt = False, precision: Precision = "auto", device: Device = "auto",
    save_steps: SaveSteps = 0, save_total_limit: SaveLimit = 2, logging_steps: LogSteps = 10,
    report_to: ReportTo = "auto", num_workers: Workers = 0, seed: Seed = 0, patience: Patience = 3,
    validate_every: ValidateEvery = 1, select_by: SelectBy = "auto",
    resume: Resume = False, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Phase 1, alignment: the LLM frozen, aggregator + projector learn from caption data."""
    _run(dict(phase=1, out=str(out), llm=llm, num_visual_tokens=visual_tokens, phase1_system_prompt=with_system_prompt,
              learning_rate=lr, tower_learning_rate=tower_lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
              gradient_accumulation=grad_accum, warmup_ratio=warmup_ratio, scheduler=scheduler,
              weight_decay=weight_decay, gradient_checkpointing=gradient_checkpointing, precision=precision,
              device=device, save_steps=save_steps, save_total_limit=save_total_limit, logging_steps=logging_steps,
              report_to=report_to, num_workers=num_workers, seed=seed, patience=patience,
              validate_every=validate_every, select_by=select_by),
         _data_kwargs(data, features, val_data, val_fraction, max_patches, max_length, skip_missing, seed),
         resume, quiet, verbose)


@app.command("phase2")
def phase2(
    init: Annotated[Path, typer.Option("--init", help="The phase-1 checkpoint (its --out) to start from.")],
    data: Data, out: Out, features: Features = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (the paper: 64).")] = 64,
    lora_alpha: Annotated[int, typer.Option(help="LoRA α (the paper: 16).")] = 16,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    lora_targets: Annotated[str, typer.Option(help="Comma-separated LLM modules that get LoRA.")] = "q_proj,k_proj,v_proj,o_proj",
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt in every sample (and in chat); default: the built-in one.")] = None,
    val_data: ValData = None, val_fraction: ValFraction = 0.05, max_patches: MaxPatches = None,
    max_length: MaxLength = None, skip_missing: SkipMissing = False, epochs: Epochs = 1.0, max_steps: MaxSteps = -1,
    batch_size: BatchSize = 4, grad_accum: GradAccum = 4, lr: Lr = None, tower_lr: TowerLr = None,
    warmup_ratio: Warmup = 0.03, scheduler: Scheduler = "cosine", weight_decay: WeightDecay = 0.0,
    gradient_checkpointing: GradCkpt = False, precision: Precision = "auto", device: Device = "auto",
    save_steps: SaveSteps = 0, save_total_limit: SaveLimit = 2, logging_steps: LogSteps = 10,
    report_to: ReportTo = "auto", num_workers: Workers = 0, seed: Seed = 0, patience: Patience = 3,
    validate_every: ValidateEvery = 1, select_by: SelectBy = "auto",
    resume: Resume = False, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Phase 2, instruction tuning: LoRA on the LLM + the tower, from phase 1's checkpoint."""
    _run(dict(phase=2, out=str(out), init=str(init), lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
              lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()], system_prompt=system_prompt,
              learning_rate=lr, tower_learning_rate=tower_lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
              gradient_accumulation=grad_accum, warmup_ratio=warmup_ratio, scheduler=scheduler,
              weight_decay=weight_decay, gradient_checkpointing=gradient_checkpointing, precision=precision,
              device=device, save_steps=save_steps, save_total_limit=save_total_limit, logging_steps=logging_steps,
              report_to=report_to, num_workers=num_workers, seed=seed, patience=patience,
              validate_every=validate_every, select_by=select_by),
         _data_kwargs(data, features, val_data, val_fraction, max_patches, max_length, skip_missing, seed),
         resume, quiet, verbose)
