"""Validation while training: short answers are scored by exact match, the best validation decides which
checkpoint is kept, training stops after a patience, and training_args.json says how the choice was made."""

import json

import pytest
import torch
from transformers import TrainerCallback

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.train.data import load_records
from chatexaonepath.train.phases import PhaseConfig, prompt_builder, train_phase
from chatexaonepath.train.validation import (
    ANSWER_SLACK_TOKENS, SelectionCallback, ShortAnswer, exact_match, normalise_answer, resolve_select_by,
    selection_score, short_answers,
)
from tests.train.conftest import phase_configs, record, write_json


def test_answers_are_compared_without_case_punctuation_or_spacing():
    assert normalise_answer("Adenocarcinoma.") == normalise_answer("  adenocarcinoma ") == "adenocarcinoma"
    assert normalise_answer("High grade.") != normalise_answer("Low grade.")


class Replies:
    """A stand-in model that answers each prompt with a fixed text and records how far it was let decode."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.limits, self.training, self.llm = tokenizer, list(replies), [], True, None

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, ids, bags, max_new_tokens, **settings):
        self.limits.append(max_new_tokens)
        reply = self.tokenizer(self.replies.pop(0), add_special_tokens=False).input_ids[:max_new_tokens]
        return torch.tensor([reply])


def test_exact_match_decodes_about_as_long_as_the_reference_not_max_new_tokens(dataset_dir, tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    bag = dataset_dir / "features" / "s0.h5"
    items = [ShortAnswer((bag,), [1, 2], "Alpha."), ShortAnswer((bag,), [1, 2], "Yes."),
             ShortAnswer((bag,), [1, 2], "High grade adenocarcinoma.")]
    model = Replies(tokenizer, ["alpha", "Yes" + " ." * 40, "high grade adenocarcinoma of the colon"])
    assert exact_match(model, tokenizer, items) == 2 / 3 and model.training  # trailing dots still match
    for item, limit in zip(items, model.limits):
        reference = len(tokenizer(item.reference, add_special_tokens=False).input_ids)
        assert limit == min(32, 2 * reference + ANSWER_SLACK_TOKENS) < 32


def test_the_selection_score_is_exact_match_first_and_loss_only_between_equals():
    assert selection_score({"eval_loss": 2.0, "eval_exact_match": 0.75}) > selection_score(
        {"eval_loss": 0.1, "eval_exact_match": 0.5})
    assert selection_score({"eval_loss": 0.5, "eval_exact_match": 0.5}) > selection_score(
        {"eval_loss": 0.9, "eval_exact_match": 0.5})
    assert selection_score({"eval_loss": 0.5, "eval_exact_match": float("nan")}) == -0.5  # no short answers


def test_only_short_replies_are_checked_each_with_the_conversation_before_it(dataset_dir, phase1_out):
    from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM

    builder = prompt_builder(ChatEXAONEPathForCausalLM.from_pretrained(phase1_out))
    long_reply = " ".join(["word"] * 30)
    path = write_json(dataset_dir.parent / "short.json", [record("a", "s0", "<image>\nWhat is it?", "Alpha.",
                                                                 "Tell me more.", long_reply, "Sure?", "Yes.")])
    items = short_answers(load_records([str(path)], str(dataset_dir / "features")).records, builder)
    assert [item.reference for item in items] == ["Alpha.", "Yes."]
    assert len(items[1].prompt_ids) > len(items[0].prompt_ids)  # the later answer sees the earlier turns


def test_a_case_is_validated_on_the_prompt_training_builds_and_with_every_slide(dataset_dir, tiny_llm):
    from transformers import AutoTokenizer

    from chatexaonepath.chat.conversation import IGNORE_INDEX, PromptBuilder
    from chatexaonepath.train.data import SlideConversationDataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    builder = PromptBuilder(tokenizer, num_image_tokens=3, system_prompt=None)
    path = write_json(dataset_dir.parent / "case.json", [record("c", ["s0.tiff", "s1.tiff"],
                                                                "<image>\nWhich slide shows the lesion?",
                                                                "Slide 2 (s1.tiff).", "What is the diagnosis?", "Beta.")])
    records = load_records([str(path)], str(dataset_dir / "features")).records
    items = short_answers(records, builder)
    trained = SlideConversationDataset(records, builder).samples[0]
    assert [item.reference for item in items] == ["Slide 2 (s1.tiff).", "Beta."]
    for item in items:  # each prompt is the training sequence up to its reply: the slide labels included
        n = len(item.prompt_ids)
        assert trained.input_ids[:n] == item.prompt_ids and trained.labels[n - 1] == IGNORE_INDEX != trained.labels[n]
        assert item.features_paths == records[0].features_paths and len(item.features_paths) == 2
    assert "Slide 2 (s1.tiff):" in tokenizer.decode([t for t in items[0].prompt_ids if t >= 0])  # not the image ids

    class Case(Replies):
        def generate(self, ids, bags, max_new_tokens, slides_per_sample=None, **settings):
            self.seen = ([tuple(b.shape) for b in bags], slides_per_sample)
            return super().generate(ids, bags, max_new_tokens)

    model = Case(tokenizer, ["Slide 2 (s1.tiff)"])
    assert exact_match(model, tokenizer, items[:1]) == 1.0
    shapes = [tuple(bag.shape) for bag in SlideConversationDataset(records, builder)[0]["slide_features"]]
    assert model.seen == (shapes, [2])  # both slides' bags, in the case's order, as one prompt's


def _callback_after(scores: list[float], patience: int) -> tuple[SelectionCallback, int]:
    callback = SelectionCallback(patience)

    class State:
        epoch, global_step = 0.0, 0

    class Control:
        should_training_stop = False

    control = Control()
    for i, score in enumerate(scores, 1):
        State.epoch, State.global_step = float(i), i
        callback.on_evaluate(None, State, control, metrics={"eval_loss": 1.0, "eval_score": score})
        if control.should_training_stop:
            return callback, i
    return callback, len(scores)


def test_training_stops_after_the_patience_and_the_best_validation_is_the_choice():
    callback, stopped = _callback_after([0.2, 0.5, 0.4, 0.5, 0.3, 0.9], patience=3)
    assert stopped == 5 and callback.stopped_early_at == 5.0  # 0.4, 0.5 (not better), 0.3: three in a row
    assert callback.summary("checkpoint-2")["chosen"]["epoch"] == 2.0
    callback, stopped = _callback_after([0.2, 0.1, 0.1, 0.1], patience=0)
    assert stopped == 4 and callback.stopped_early_at is None


class Spoil(TrainerCallback):
    """Wrecks the tower after the first epoch, before it is validated: the first epoch must be the one kept."""

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if state.epoch > 1.5:
            with torch.no_grad():
                for param in model.tower.parameters():
                    param.normal_(0, 3.0)


def test_a_phase_records_its_validation_and_stops_when_validation_stops_improving(dataset_dir, tiny_llm, tmp_path):
    out = tmp_path / "p1"
    result = train_phase(*phase_configs(1, out, dataset_dir / "captions.json", dataset_dir / "features",
                                        llm=str(tiny_llm), epochs=6, patience=2, save_total_limit=1,
                                        select_by="exact_match"),
                         callbacks=[Spoil()])
    history = result.selection["history"]
    assert len(history) == 3 and result.selection["stopped_early_at_epoch"] == 3.0  # epochs 2 and 3 no better
    assert all(0.0 <= h["eval_exact_match"] <= 1.0 for h in history)
    saved = json.loads((out / "training_args.json").read_text())["result"]["selection"]
    assert saved["chosen"]["epoch"] == 1.0 and saved["patience"] == 2 and saved["best_checkpoint"].endswith(
        f"checkpoint-{result.global_step // 3}")


def test_phase_one_selects_by_loss_and_phase_two_by_exact_match_unless_told():
    assert resolve_select_by("auto", 1) == "loss" and resolve_select_by("auto", 2) == "exact_match"
    assert resolve_select_by("loss", 2) == "loss"
    assert selection_score({"eval_loss": 0.5, "eval_exact_match": 0.9}, "loss") == -0.5


def test_validation_every_few_epochs_and_its_bad_settings():
    with pytest.raises(ChatEXAONEPathError, match="--patience"):
        PhaseConfig(phase=1, out="x", patience=-1)
    with pytest.raises(ChatEXAONEPathError, match="--validate-every"):
        PhaseConfig(phase=1, out="x", validate_every=0)
    with pytest.raises(ChatEXAONEPathError, match="--select-by"):
        PhaseConfig(phase=1, out="x", select_by="accuracy")
