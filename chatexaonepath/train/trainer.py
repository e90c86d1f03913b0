"""The HF Trainer adapted to ChatEXAONEPath: our checkpoint layout, per-part learning rates, callbacks.

Checkpoints hold the tower, the LoRA adapter and `training_args.json`, never the frozen base LLM
(the config references it), so a checkpoint of a 7B model is megabytes, not gigabytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from ..chat.modeling import ADAPTER_DIR, TOWER_WEIGHTS, ChatEXAONEPathForCausalLM
from ..errors import ChatEXAONEPathError
from ..fileio import atomic_write_text
from .data import SlideConversationDataset
from .validation import SELECTION_METRIC, ShortAnswer, exact_match, selection_score

logger = logging.getLogger(__name__)

TRAINING_ARGS = "training_args.json"


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def save_checkpoint(model: ChatEXAONEPathForCausalLM, directory: str | Path, run_info: dict,
                    state_dict: dict | None = None) -> Path:
    """A loadable ChatEXAONEPath folder (marked trained) plus training_args.json."""
    directory = Path(directory)
    model.config.tower_trained = True
    model.save_pretrained(directory, state_dict=state_dict)
    # What belongs to the model (the Trainer adds optimizer and RNG state to the folder afterwards).
    files = sorted({p.name for p in directory.iterdir()} | {TRAINING_ARGS})
    _write_json(directory / TRAINING_ARGS, {**run_info, "files": files})
    return directory


def load_trainable_weights(model: ChatEXAONEPathForCausalLM, directory: str | Path) -> None:
    """Put a checkpoint's tower and LoRA weights into `model`, to resume training from it."""
    from safetensors.torch import load_file

    directory = Path(directory)
    model.tower.load_state_dict(load_file(str(directory / TOWER_WEIGHTS)), strict=True)
    adapter = directory / ADAPTER_DIR / "adapter_model.safetensors"
    if model.config.lora is not None:
        if not adapter.is_file():
            raise ChatEXAONEPathError(f"{directory} has no LoRA adapter to resume from; it is not this phase's checkpoint.")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model.llm, load_file(str(adapter)))
        if result.unexpected_keys:
            raise ChatEXAONEPathError(f"{adapter} does not fit this model (unexpected: {result.unexpected_keys[:3]}).")


class TowerTrainer(Trainer):
    """The HF Trainer, saving and loading our checkpoint layout instead of a full state dict.

    The frozen base LLM is referenced by the config, never copied into checkpoints; only the tower,
    the LoRA adapter and the run's description are written.
    """

    def __init__(self, *args, run_info: dict, tower_learning_rate: float | None = None,
                 short_answers: list[ShortAnswer] | None = None, select_by: str = "exact_match", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_info, self.tower_learning_rate = run_info, tower_learning_rate
        self.short_answers, self.select_by = short_answers or [], select_by
        self.model.config.__dict__.pop("use_cache", None)  # the Trainer sets it for HF models; ours passes it per call
        self.remove_callback(PrinterCallback)  # library code logs (LogCallback), it does not print

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # No KV cache while training: it would only hold memory; logits only where the loss needs them.
        inputs = {**inputs, "use_cache": False, "supervised_logits_only": True}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The loss, plus exact match on the short validation answers and the selection score (validation.py)."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        metrics = {k.removeprefix(f"{metric_key_prefix}_"): v for k, v in output.metrics.items()}
        if self.short_answers:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            metrics["exact_match"] = exact_match(model, model.tokenizer, self.short_answers)
        output.metrics[f"{metric_key_prefix}_exact_match"] = metrics.get("exact_match", float("nan"))
        output.metrics[f"{metric_key_prefix}_{SELECTION_METRIC}"] = selection_score(
            {f"eval_{k}": v for k, v in metrics.items()}, self.select_by)
        return output

    def create_optimizer(self, model=None):
        """AdamW over the trainable parameters, with the tower's own learning rate when one is set."""
        if self.optimizer is None:
            named = [(n, p) for n, p in (model or self.model).named_parameters() if p.requires_grad]
            tower = [p for n, p in named if "tower." in f".{n}"]
            llm = [p for n, p in named if "tower." not in f".{n}"]
            groups = [{"params": tower, "lr": self.tower_learning_rate or self.args.learning_rate},
                      {"params": llm, "lr": self.args.learning_rate}]
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            kwargs.pop("lr", None)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], lr=self.args.learning_rate,
                                           weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        info = {**self.run_info, "global_step": self.state.global_step, "epoch": self.state.epoch}
        save_checkpoint(model, output_dir or self.args.output_dir, info, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # DeepSpeed restores its own engine checkpoint instead; FSDP would need the weights loaded shard-wise.
        if self.is_fsdp_enabled:
            raise ChatEXAONEPathError("--resume is not supported under FSDP yet; resume with DDP or DeepSpeed "
                                      "(the checkpoints are the same), or start again.")
        load_trainable_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


class EpochCallback(TrainerCallback):
    """Tells the training set the epoch (patch subsampling is seeded by it) and validates every `every` epochs
    (and after the last), whatever the checkpoint schedule says in between."""

    def __init__(self, dataset: SlideConversationDataset, validate: bool, every: int = 1) -> None:
        self.dataset, self.validate, self.every = dataset, validate, max(1, every)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.validate:
            due = round(state.epoch or 0.0) % self.every == 0 or state.global_step >= state.max_steps
            control.should_evaluate = control.should_save = due
        return control


class LogCallback(TrainerCallback):
    """Plain logs of losses and learning rate, whatever else reports them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            logger.info("step %d/%d: %s", state.global_step, state.max_steps, shown)


def finalize(trainer: TowerTrainer, out: Path) -> None:
    """Put the final model into `out` itself: the best checkpoint's files (by eval loss) or the last weights.

    Assembled in a temp folder and moved in with config.json last: a folder with config.json is complete.
    """
    tmp = out / ".final.tmp"
    best = trainer.state.best_model_checkpoint
    if trainer.args.should_save:
        shutil.rmtree(tmp, ignore_errors=True)
    if best is None:
        trainer.save_model(str(tmp))  # every rank: FSDP and ZeRO-3 gather the weights collectively
    if trainer.args.should_save:
        if best is not None:
            logger.info("Best checkpoint: %s (validation score %.4f)", best, trainer.state.best_metric)
            tmp.mkdir()
            for name in json.loads((Path(best) / TRAINING_ARGS).read_text())["files"]:
                copy = shutil.copytree if (Path(best) / name).is_dir() else shutil.copy2
                copy(Path(best) / name, tmp / name)
        info = json.loads((tmp / TRAINING_ARGS).read_text())
        _write_json(tmp / TRAINING_ARGS, {**trainer.run_info, "global_step": info.get("global_step"),
                                         "epoch": info.get("epoch"), "files": info["files"]})
        (out / "config.json").unlink(missing_ok=True)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        tmp.rmdir()
    trainer.accelerator.wait_for_everyone()
