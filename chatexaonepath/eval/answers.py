"""Answers of a ChatEXAONEPath checkpoint to every test item: batched, resumable, decoded like serving.

Each item is asked with the reference conversation before it (the earlier human turns and the
reference gpt replies), exactly as the model would see it in a chat, through the same
PromptBuilder as training and inference, with the system prompt the checkpoint was trained with.
Answers are decoded as the app and `chat` decode by default — greedy, with the same repetition
guards (`chat.session.repetition_defaults`) — so a score describes the model users talk to.
The test features must be made like the checkpoint's training features (its `feature_provenance`);
others are refused before any answer is generated, unless `allow_feature_mismatch`. Prompts are
sorted by length and left-padded in batches; every finished batch is appended to the answers file,
so a rerun generates only what is missing.

Conditions (how much the slide matters): `model` answers with the item's own slide; `blind` with
no visual tokens at all (the same prompt, its image placeholder removed: the LLM alone); `shuffled`
with another test slide's tokens (a fixed derangement, baselines.py).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..chat.conversation import IMAGE_TOKEN, PromptBuilder, Turn, label_case
from ..chat.provenance import check_features, file_provenance, is_known
from ..errors import ChatEXAONEPathError
from ..vision_tower.features import read_features
from .baselines import item_slides, item_source
from .data import JsonlLog
from .criteria import EvalError

logger = logging.getLogger(__name__)

CONDITIONS = ("model", "blind", "shuffled")


@dataclass
class GenerateConfig:
    """How answers are generated; saved in the run folder (`eval_config.json`)."""

    model: str  # a ChatEXAONEPath checkpoint folder
    data: str  # the test data file(s)
    features: str | None = None  # folder of <slide_id>.h5 / .pt (records may also name feature files)
    reports: str | None = None  # folder of <report_id>.txt
    batch_size: int = 4
    max_new_tokens: int = 256
    stain_norm: str | None = None  # what the test features must have (default: the checkpoint's training features')
    allow_feature_mismatch: bool = False  # answer about features unlike the training ones (each one logged)
    repetition_penalty: float | None = None  # None: what the app and `chat` use (the LLM's own, else 1.15)
    no_repeat_ngram_size: int | None = None  # None: what the app and `chat` use (the LLM's own, else 6)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise EvalError("--batch-size and --max-new-tokens must be 1 or more.")
        if self.stain_norm not in (None, "none", "macenko"):
            raise EvalError(f"--stain-norm must be none or macenko, got {self.stain_norm!r}.")
        if self.repetition_penalty is not None and self.repetition_penalty < 1.0:
            raise EvalError(f"--repetition-penalty must be 1.0 (off) or more, got {self.repetition_penalty}.")
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 0:
            raise EvalError(f"--no-repeat-ngram-size must be 0 (off) or more, got {self.no_repeat_ngram_size}.")

    def as_dict(self) -> dict:
        return asdict(self)


class AnswerItem(Protocol):
    """What answering needs of a test item (eval run's TestItem, eval closed's ClosedItem)."""

    id: str
    turns: list[Turn]
    features: Path | None

    def answer_fields(self) -> dict: ...


def decoding(model, config: GenerateConfig) -> dict:
    """The generation settings answers are made with: serving's defaults unless the config overrides them."""
    from ..chat.session import repetition_defaults  # the one source of the app's and chat's defaults

    penalty, ngram = repetition_defaults(model.llm)
    return {"do_sample": False, "temperature": 0.0, "max_new_tokens": config.max_new_tokens,
            "repetition_penalty": penalty if config.repetition_penalty is None else config.repetition_penalty,
            "no_repeat_ngram_size": ngram if config.no_repeat_ngram_size is None else config.no_repeat_ngram_size,
            "source": "chat/app defaults" if config.repetition_penalty is None and config.no_repeat_ngram_size is None
            else "overridden"}


class LazyModel:
    """The checkpoint, loaded on first use and then shared by every condition of a run."""

    def __init__(self, checkpoint: str, model=None) -> None:
        self.checkpoint, self._model = checkpoint, model

    def get(self):
        if self._model is None:
            from ..chat.session import load_chat_model

            self._model = load_chat_model(self.checkpoint)
        return self._model


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


def _prompt_ids(builder: PromptBuilder, item: AnswerItem, limit: int, max_new_tokens: int, blind: bool) -> list[int]:
    turns = [Turn(t.role, t.content) for t in item.turns]
    count = sum(t.content.count(IMAGE_TOKEN) for t in turns)
    names = list(getattr(item, "case_names", ()) or ())
    if blind:  # the same conversation with its slide removed: the LLM alone
        turns = [Turn(t.role, t.content.replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "")) for t in turns]
    elif count == 0:  # the slide (or the case) rides on the first turn, as in a chat session
        turns[0] = Turn("user", f"{IMAGE_TOKEN}\n{turns[0].content}")
    elif count > 1 and not names:
        raise ChatEXAONEPathError(f"the conversation holds {count} {IMAGE_TOKEN} placeholders; one slide needs one")
    if names and not blind:  # a case: each slide labelled before its tokens, as chat and training label them
        turns = label_case(turns, names, builder.image_token)
    ids = builder.build(turns, add_generation_prompt=True).input_ids
    if len(ids) + max_new_tokens > limit:
        raise ChatEXAONEPathError(f"the prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceeds the "
                                  f"model's context of {limit}")
    return ids


def check_test_features(items: list[AnswerItem], config: GenerateConfig, provenance: dict | None) -> list[str]:
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
    for path in sorted({p for item in items for p in item_slides(item)}) if is_known(expected) else []:
        try:
            made = file_provenance(path)
        except ChatEXAONEPathError:  # unreadable: its items are skipped (and listed) when their features are read
            continue
        warnings.append(check_features(expected, made, f"the test features {path.name} have", allow=allow))
    return [w for w in warnings if w]


def generate_answers(items: list[AnswerItem], config: GenerateConfig, answers: JsonlLog, *, model=None,
                     errors: JsonlLog | None = None, progress: Callable[[int, int], None] | None = None,
                     condition: str = "model", swap: dict[Path, Path] | None = None) -> list[dict]:
    """Append an answer record for every item not yet in `answers`; returns the items skipped (id, error).

    `model` is a loaded model, a LazyModel, or None (loaded from `config.model`); `condition` is
    model, blind or shuffled, the last answering each item about `swap[item.features]`.
    """
    if condition not in CONDITIONS:
        raise EvalError(f"Unknown answering condition {condition!r}; use one of {', '.join(CONDITIONS)}.")
    done = set(answers.latest())
    todo = [i for i in items if i.id not in done]
    if progress:
        progress(len(items) - len(todo), len(items))
    if not todo:
        return []
    model = (model if isinstance(model, LazyModel) else LazyModel(config.model, model)).get()
    check_test_features(todo, config, model.config.feature_provenance)  # raises, or logs what it allows
    model.eval()
    settings = decoding(model, config)
    builder = PromptBuilder(model.tokenizer, num_image_tokens=model.config.num_visual_tokens,
                            image_token=model.config.image_token, system_prompt=model.config.system_prompt,
                            style=model.config.prompt_style)
    limit = getattr(model.llm.config, "max_position_embeddings", None) or 4096
    skipped, prompts = [], []
    for item in todo:
        try:
            prompts.append((item, _prompt_ids(builder, item, limit, config.max_new_tokens, condition == "blind")))
        except ChatEXAONEPathError as e:
            skipped.append({"id": item.id, "stage": "generate", "error": str(e)})
    prompts.sort(key=lambda p: len(p[1]))  # similar lengths together: less padding per batch
    cache, finished = _FeatureCache(), len(items) - len(todo) + len(skipped)
    for start in range(0, len(prompts), config.batch_size):
        batch = []
        for item, ids in prompts[start : start + config.batch_size]:
            own = item_source(item)  # a slide's features, or a case's tuple of them
            source = None if condition == "blind" else swap[own] if condition == "shuffled" else own
            try:
                bags = None if source is None else [cache.get(p) for p in source] if isinstance(source, tuple) \
                    else cache.get(source)
                batch.append((item, ids, source, bags))
            except ChatEXAONEPathError as e:  # an unreadable features file skips its items, not the run
                skipped.append({"id": item.id, "stage": "generate", "error": str(e)})
        if batch:
            for record in _generate_batch(model, batch, settings):
                answers.append({**record, "condition": condition, "model": config.model})
        finished += len(prompts[start : start + config.batch_size])
        if progress:
            progress(finished, len(items))
    for record in skipped:
        logger.warning("Skipped %s: %s", record["id"], record["error"])
        if errors is not None:
            errors.append({**record, "condition": condition, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return skipped


def answer_conditions(items: list[AnswerItem], config: GenerateConfig, logs: dict[str, JsonlLog], model=None, *,
                      swap: dict[Path, Path] | None = None, saved: dict | None = None, errors: JsonlLog | None = None,
                      progress: Callable[[str, int, int], None] | None = None,
                      on_decoding: Callable[[dict], None] | None = None) -> dict | None:
    """Answer every condition's missing items ({condition: its answers log}); returns the decoding used.

    The model is loaded only when something is missing. The decoding is recorded (`on_decoding`)
    before the first answer, and a folder whose answers were decoded otherwise — or before decoding
    was recorded, when eval decoded greedily without serving's guards — is refused.
    """
    holder = model if isinstance(model, LazyModel) else LazyModel(config.model, model)
    for condition, log in logs.items():
        done = set(log.latest())
        if saved is not None and all(i.id in done for i in items):
            if progress:
                progress(condition, len(items), len(items))
            continue
        settings = decoding(holder.get(), config)
        if saved is None and any(log.records() for log in logs.values()):
            raise EvalError(f"{log.path.parent} holds answers made before evaluation decoded like the app (greedy "
                            "without its repetition guards); use a new --out, or delete its answers*.jsonl.")
        if saved is not None and saved != settings:
            raise EvalError(f"{log.path.parent} holds answers decoded with {saved}, this run would use {settings}; "
                            "use a new --out, or delete its answers*.jsonl.")
        if saved is None and on_decoding:
            on_decoding(settings)
        saved = settings
        generate_answers(items, config, log, model=holder, errors=errors, condition=condition, swap=swap,
                         progress=(lambda d, t, c=condition: progress(c, d, t)) if progress else None)
    return saved


def _generate_batch(model, batch: list[tuple], settings: dict) -> list[dict]:
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for _, ids, _, _ in batch)
    # Left padding: every row's last position is real, so generation continues each prompt directly.
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _, _ in batch])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _, _ in batch])
    generation = dict(max_new_tokens=settings["max_new_tokens"], do_sample=False, pad_token_id=pad,
                      repetition_penalty=settings["repetition_penalty"],
                      no_repeat_ngram_size=settings["no_repeat_ngram_size"])
    started = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        # The prompt goes in as embeddings: the guards see only the generated tokens, as in serving.
        warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with `inputs_embeds`")
        if batch[0][3] is None:  # blind: the LLM alone, fed embeddings as with a slide, so the guards act alike
            embeddings = model.llm.get_input_embeddings()(input_ids.to(model.device))
            out = model.llm.generate(inputs_embeds=embeddings, attention_mask=attention.to(model.device), **generation)
        else:  # a case contributes every slide's bag, in order, and says how many
            bags = [b for _, _, _, f in batch for b in (f if isinstance(f, list) else [f])]
            per_sample = [len(f) if isinstance(f, list) else 1 for _, _, _, f in batch]
            out = model.generate(input_ids, bags, attention_mask=attention, **generation,
                                 **({"slides_per_sample": per_sample} if len(bags) != len(batch) else {}))
    seconds = (time.perf_counter() - started) / len(batch)
    records = []
    for (item, _, source, _), row in zip(batch, out):
        text = tokenizer.decode(row, skip_special_tokens=True).strip().replace(IMAGE_TOKEN, "[image]")
        ends = (row == tokenizer.eos_token_id).nonzero()
        new_tokens = int(ends[0]) + 1 if len(ends) else len(row)
        used = None if source is None else [str(p) for p in source] if isinstance(source, tuple) else str(source)
        records.append({**item.answer_fields(), "answer": text, "features_used": used,
                        "new_tokens": new_tokens, "seconds": round(seconds, 3)})
    return records
