"""Answers of a ChatEXAONEPath checkpoint to every test item: batched, greedy, resumable.

Each item is asked with the reference conversation before it (the earlier human turns and the
reference gpt replies), exactly as the model would see it in a chat, through the same
PromptBuilder as training and inference, with the system prompt the checkpoint was trained with.
The test features must be made like the checkpoint's training features (its `feature_provenance`);
others are refused before any answer is generated, unless `allow_feature_mismatch`. Prompts are
sorted by length and left-padded in batches; every finished batch is appended to `answers.jsonl`,
so a rerun generates only what is missing.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..chat.conversation import IMAGE_TOKEN, PromptBuilder, Turn
from ..chat.provenance import check_features, file_provenance, is_known
from ..errors import ChatEXAONEPathError
from ..vision_tower.features import read_features
from .data import JsonlLog, TestItem
from .criteria import EvalError

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """How answers are generated; saved in the run folder (`eval_config.json`)."""

    model: str  # a ChatEXAONEPath checkpoint folder
    data: str  # LLaVA-format test JSON/JSONL
    features: str | None = None  # folder of <slide_id>.h5 / .pt (records may also name feature files)
    reports: str | None = None  # folder of <report_id>.txt
    batch_size: int = 4
    max_new_tokens: int = 256
    stain_norm: str | None = None  # what the test features must have (default: the checkpoint's training features')
    allow_feature_mismatch: bool = False  # answer about features unlike the training ones (each one logged)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise EvalError("--batch-size and --max-new-tokens must be 1 or more.")
        if self.stain_norm not in (None, "none", "macenko"):
            raise EvalError(f"--stain-norm must be none or macenko, got {self.stain_norm!r}.")

    def as_dict(self) -> dict:
        return asdict(self)


class _FeatureCache:
    """The last few slides' features: consecutive questions about one slide read its file once."""

    def __init__(self, size: int = 16) -> None:
        self.size, self._items = size, OrderedDict()

    def get(self, path: Path) -> torch.Tensor:
        if path not in self._items:
            self._items[path] = read_features(path).features.float()
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(path)
        return self._items[path]


def _prompt_ids(builder: PromptBuilder, item: TestItem, limit: int, max_new_tokens: int) -> list[int]:
    turns = [Turn(t.role, t.content) for t in item.turns]
    count = sum(t.content.count(IMAGE_TOKEN) for t in turns)
    if count == 0:  # the slide rides on the first turn, as in a chat session
        turns[0] = Turn("user", f"{IMAGE_TOKEN}\n{turns[0].content}")
    elif count > 1:
        raise ChatEXAONEPathError(f"the conversation holds {count} {IMAGE_TOKEN} placeholders; one slide needs one")
    ids = builder.build(turns, add_generation_prompt=True).input_ids
    if len(ids) + max_new_tokens > limit:
        raise ChatEXAONEPathError(f"the prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceeds the "
                                  f"model's context of {limit}")
    return ids


def check_test_features(items: list[TestItem], config: GenerateConfig, provenance: dict | None) -> list[str]:
    """Refuse test features made unlike the checkpoint's training features; the warnings when they are allowed.

    `--stain-norm` states what the features must have; one that differs from the training features' is
    itself a mismatch.
    """
    expected = dict(provenance or {})
    allow = config.allow_feature_mismatch
    warnings = []
    if config.stain_norm is not None and expected:
        warnings.append(check_features(expected, {**expected, "stain_norm": config.stain_norm}, "--stain-norm asks for",
                                       allow=allow))
        expected["stain_norm"] = config.stain_norm
    for path in sorted({item.features for item in items if item.features is not None}) if is_known(expected) else []:
        try:
            made = file_provenance(path)
        except ChatEXAONEPathError:  # unreadable: its items are skipped (and listed) when their features are read
            continue
        warnings.append(check_features(expected, made, f"the test features {path.name} have", allow=allow))
    return [w for w in warnings if w]


def generate_answers(items: list[TestItem], config: GenerateConfig, answers: JsonlLog, *, model=None,
                     errors: JsonlLog | None = None,
                     progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Append an answer record for every item not yet in `answers`; returns the items skipped (id, error)."""
    done = set(answers.latest())
    todo = [i for i in items if i.id not in done]
    if progress:
        progress(len(items) - len(todo), len(items))
    if not todo:
        return []
    if model is None:
        from ..chat.session import load_chat_model

        model = load_chat_model(config.model)
    check_test_features(todo, config, model.config.feature_provenance)  # raises, or logs what it allows
    model.eval()
    tokenizer = model.tokenizer
    builder = PromptBuilder(tokenizer, num_image_tokens=model.config.num_visual_tokens,
                            image_token=model.config.image_token, system_prompt=model.config.system_prompt,
                            style=model.config.prompt_style)
    limit = getattr(model.llm.config, "max_position_embeddings", None) or 4096
    skipped, prompts = [], []
    for item in todo:
        try:
            prompts.append((item, _prompt_ids(builder, item, limit, config.max_new_tokens)))
        except ChatEXAONEPathError as e:
            skipped.append({"id": item.id, "stage": "generate", "error": str(e)})
    prompts.sort(key=lambda p: len(p[1]))  # similar lengths together: less padding per batch
    cache, finished = _FeatureCache(), len(items) - len(todo) + len(skipped)
    for start in range(0, len(prompts), config.batch_size):
        batch = []
        for item, ids in prompts[start : start + config.batch_size]:
            try:
                batch.append((item, ids, cache.get(item.features)))
            except ChatEXAONEPathError as e:  # an unreadable features file skips its items, not the run
                skipped.append({"id": item.id, "stage": "generate", "error": str(e)})
        if batch:
            for record in _generate_batch(model, batch, config):
                answers.append(record)
        finished += len(prompts[start : start + config.batch_size])
        if progress:
            progress(finished, len(items))
    for record in skipped:
        logger.warning("Skipped %s: %s", record["id"], record["error"])
        if errors is not None:
            errors.append({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return skipped


def _generate_batch(model, batch: list[tuple[TestItem, list[int], torch.Tensor]], config: GenerateConfig) -> list[dict]:
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for _, ids, _ in batch)
    # Left padding: every row's last position is real, so generation continues each prompt directly.
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _ in batch])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in batch])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, [features for _, _, features in batch], attention_mask=attention,
                             max_new_tokens=config.max_new_tokens, do_sample=False, pad_token_id=pad)
    seconds = (time.perf_counter() - started) / len(batch)
    records = []
    for (item, _, _), row in zip(batch, out):
        text = tokenizer.decode(row, skip_special_tokens=True).strip().replace(IMAGE_TOKEN, "[image]")
        ends = (row == tokenizer.eos_token_id).nonzero()
        new_tokens = int(ends[0]) + 1 if len(ends) else len(row)
        records.append({
            "id": item.id, "record_id": item.record_id, "image": item.image, "features": str(item.features),
            "question": item.question, "answer": text, "reference": item.reference, "report": item.report,
            "report_id": item.report_id, "report_source": item.report_source, "category": item.category,
            "organ": item.organ, "model": config.model, "new_tokens": new_tokens, "seconds": round(seconds, 3)})
    return records
