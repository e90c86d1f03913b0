"""Validation while training: exact-match accuracy on short answers, the selection score, early stopping.

Every epoch a phase with a validation set computes the loss on it (the Trainer's evaluation) and, when
the validation data has short-answer replies (at most `SHORT_ANSWER_WORDS` words: diagnosis, organ,
grade…), the exact-match accuracy of greedy answers decoded as chat decodes them (its repetition
guards included), each reply asked with the conversation before it. The checkpoint kept is the one with
the best *selection score* (`select_by`): by default the loss in phase 1 and, in phase 2, exact match when
there are short answers (ties broken by the lower loss), else the loss. After `patience` evaluations without a better score, training stops. The choice
and its history go into `training_args.json` (`selection`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..chat.conversation import PromptBuilder, Turn, label_case, turns_from_llava
from ..chat.session import repetition_defaults
from ..vision_tower.features import read_features
from .data import Record

logger = logging.getLogger(__name__)

SHORT_ANSWER_WORDS = 12
# Validation answers are decoded to twice their reference's tokens plus this, not to max_new_tokens: an answer that
# long can equal the reference (normalised) only through trailing punctuation, and a model that has not yet learned
# to end its reply (every early epoch) would otherwise decode max_new_tokens for every validation answer.
ANSWER_SLACK_TOKENS = 8
SELECTION_METRIC = "score"  # the Trainer reports it as eval_score
# The loss only breaks ties between equal exact-match accuracies: scaled far below one answer's worth.
LOSS_TIEBREAK = 1e-4


@dataclass
class ShortAnswer:
    """One assistant reply to predict: the prompt before it (with the generation prompt) and the reference.

    `features_paths` are the slide's features, or every slide's of a case in the case's order.
    """

    features_paths: tuple[Path, ...]
    prompt_ids: list[int]
    reference: str


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and extra spaces removed: 'Adenocarcinoma.' and 'adenocarcinoma' are equal."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def short_answers(records: list[Record], builder: PromptBuilder, max_words: int = SHORT_ANSWER_WORDS) -> list[ShortAnswer]:
    """Every reply of at most `max_words` words in `records`, with the conversation that leads to it.

    A case's prompt is built as training builds it (data.SlideConversationDataset): each slide labelled with the
    name its record gives it (`label_case`), so the reply is asked of the prompt the model learned from.
    """
    items = []
    for record in records:
        turns = turns_from_llava(record.conversations)
        names = list(record.slide_names) or [p.name for p in record.features_paths]
        labelled = label_case(turns, names, builder.image_token)
        for i, turn in enumerate(labelled):
            if turn.role != "assistant" or len(turn.content.split()) > max_words:
                continue
            prompt = builder.build([Turn(t.role, t.content) for t in labelled[:i]], add_generation_prompt=True)
            items.append(ShortAnswer(record.features_paths, prompt.input_ids, turn.content))
    return items


@torch.no_grad()
def exact_match(model, tokenizer, items: list[ShortAnswer], max_new_tokens: int = 32) -> float:
    """Share of `items` whose greedy answer (chat's repetition guards) equals the reference, normalised.

    Each answer is decoded up to `max_new_tokens`, or twice its reference's tokens plus ANSWER_SLACK_TOKENS if fewer.
    """
    if not items:
        return float("nan")
    was_training = model.training
    model.eval()
    penalty, ngram = repetition_defaults(model.llm)
    bags: dict[Path, torch.Tensor] = {}
    right = 0
    try:
        for item in items:
            for path in item.features_paths:
                if path not in bags:
                    bags[path] = read_features(path).features.float()
            ids = torch.tensor([item.prompt_ids])
            reference_tokens = len(tokenizer(item.reference, add_special_tokens=False).input_ids)
            limit = min(max_new_tokens, 2 * reference_tokens + ANSWER_SLACK_TOKENS)
            # every slide of a case, in its order: one prompt about them all (slides_per_sample says so)
            output = model.generate(ids, [bags[path] for path in item.features_paths],
                                    slides_per_sample=[len(item.features_paths)], max_new_tokens=limit, do_sample=False,
                                    repetition_penalty=penalty, no_repeat_ngram_size=ngram,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answer = tokenizer.decode(output[0], skip_special_tokens=True)
            right += normalise_answer(answer) == normalise_answer(item.reference)
    finally:
        model.train(was_training)
    return right / len(items)


SELECT_BY = ("auto", "loss", "exact_match")


def resolve_select_by(select_by: str, phase: int) -> str:
    """`auto`: the loss in phase 1 (a whole caption rarely matches word for word early on, so exact match is
    too sparse a signal there), exact match in phase 2 (short answers: what the model is asked)."""
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    return ("loss" if phase == 1 else "exact_match") if select_by == "auto" else select_by


def selection_score(metrics: dict[str, float], select_by: str = "exact_match") -> float:
    """Higher is better. `exact_match`: exact match, ties broken by the lower loss (the loss alone when there
    are no short answers); `loss`: the negative loss."""
    loss = metrics.get("eval_loss", float("inf"))
    match = metrics.get("eval_exact_match")
    if select_by == "loss" or match is None or match != match:  # NaN: no short answers to check
        return -loss
    return match - LOSS_TIEBREAK * min(loss, 100.0)


class SelectionCallback(TrainerCallback):
    """Records every validation's figures and stops training after `patience` of them bring no better score."""

    def __init__(self, patience: int = 0, select_by: str = "exact_match") -> None:
        self.patience = patience
        self.metric = ("validation loss" if select_by == "loss" else
                       "exact match on short validation answers (ties: lower loss), else validation loss")
        self.history: list[dict] = []
        self.best: float | None = None
        self.stale = 0
        self.stopped_early_at: float | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_score" not in metrics:
            return control
        self.history.append({"epoch": round(state.epoch or 0.0, 3), "step": state.global_step,
                             **{k: metrics[k] for k in ("eval_loss", "eval_exact_match", "eval_score") if k in metrics}})
        if self.best is None or metrics["eval_score"] > self.best:
            self.best, self.stale = metrics["eval_score"], 0
        else:
            self.stale += 1
            if self.patience and self.stale >= self.patience:
                logger.info("No better validation score in %d evaluations: stopping early at epoch %.2f.",
                            self.stale, state.epoch or 0.0)
                self.stopped_early_at = state.epoch
                control.should_training_stop = True
        return control

    def summary(self, best_checkpoint: str | None) -> dict:
        """What training_args.json records about the choice of checkpoint."""
        chosen = max(self.history, key=lambda h: h["eval_score"]) if self.history else None
        return {"metric": self.metric,
                "patience": self.patience, "history": self.history, "chosen": chosen,
                "best_checkpoint": best_checkpoint, "stopped_early_at_epoch": self.stopped_early_at}
