import json

import pytest
import torch

from chatexaonepath.chat.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PromptBuilder
from chatexaonepath.train.data import (
    DataError, SlideCollator, SlideConversationDataset, load_records, read_records, split_by_slide,
)
from tests.train.conftest import DIM, record, write_bags, write_json


@pytest.fixture(scope="module")
def tokenizer(tiny_llm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm)


def labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of consecutive positions whose label is not IGNORE_INDEX (labels equal the ids there)."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("style", ["chat_template", "llama2"])
def test_labels_cover_exactly_the_replies_of_a_multi_turn_conversation(tmp_path, tokenizer, style):
    write_bags(tmp_path, {"s1": 0})
    write_json(tmp_path / "d.json", [record("r1", "s1", "<image>\nWhat is it?", "A tumour.", "Grade?", "Grade 2.")])
    records = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    builder = PromptBuilder(tokenizer, num_image_tokens=3, system_prompt="Be brief.", style=style)
    item = SlideConversationDataset(records, builder)[0]
    spans = [tokenizer.decode(span) for span in labelled_spans(item["input_ids"], item["labels"])]
    # Each reply and its end-of-turn token (LLaMA-2 puts a space on both sides of a reply).
    end = "<|im_end|>\n" if style == "chat_template" else f" {tokenizer.eos_token}"
    assert [s.strip() for s in spans] == [f"A tumour.{end}".strip(), f"Grade 2.{end}".strip()]
    image = [i for i, t in enumerate(item["input_ids"]) if t == IMAGE_TOKEN_INDEX]
    assert len(image) == 3 and all(item["labels"][i] == IGNORE_INDEX for i in image)
    assert "Be brief." in tokenizer.decode([t for t in item["input_ids"] if t >= 0])


def test_collator_pads_labels_with_ignore_and_keeps_each_bag(tmp_path, tokenizer):
    write_bags(tmp_path, {"s1": 0, "s2": 1}, patches=(3, 9))
    write_json(tmp_path / "d.json", [record("a", "s1", "<image>\nQ?", "Short."),
                                     record("b", "s2", "<image>\nA longer question here?", "A longer answer, too.")])
    records = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    dataset = SlideConversationDataset(records, PromptBuilder(tokenizer, system_prompt=None))
    items = [dataset[0], dataset[1]]
    pad = tokenizer.eos_token_id  # the pad token may equal eos: padding is told apart by the mask, not the id
    batch = SlideCollator(pad)(items)
    short = len(items[0]["input_ids"])
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["input_ids"][0, short:] == pad).all()
    assert batch["attention_mask"][0].sum() == short and batch["attention_mask"][1].all()
    assert batch["slide_mask"].sum(1).tolist() == [len(items[0]["slide_features"]), len(items[1]["slide_features"])]
    assert batch["slide_features"].dtype == torch.float32 and batch["slide_features"].shape[-1] == DIM


@pytest.mark.parametrize("conversation, fragment", [
    (["What is it?", "Tumour."], "has no <image>"),
    (["<image>\nWhat is it? <image>", "Tumour."], "has 2 <image>"),
    (["<image>\nWhat is it?", "   "], "empty reply"),
    (["<image>\nWhat is it?", "Tumour.", "And?", ""], "empty reply"),
    (["What is it?", "<image> Tumour."], "reply"),
    (["<image>\nWhat is it?"], "ends with a human message"),
])
def test_malformed_records_fail_with_one_error_naming_the_record(tmp_path, conversation, fragment):
    write_bags(tmp_path, {"s1": 0})
    good = record("fine-1", "s1", "<image>\nQ?", "A.")
    write_json(tmp_path / "d.json", [good, record("bad-42", "s1", *conversation)])
    with pytest.raises(DataError, match=fragment) as error:
        load_records([str(tmp_path / "d.json")], str(tmp_path))
    assert "bad-42" in str(error.value) and "d.json #1" in str(error.value)
    assert "\n" not in str(error.value)


def test_record_without_image_or_id_is_named_by_position(tmp_path):
    write_json(tmp_path / "d.json", [{"conversations": [{"from": "human", "value": "<image>\nQ"},
                                                        {"from": "gpt", "value": "A"}]}])
    with pytest.raises(DataError, match=r"d.json #0 has no 'image'"):
        load_records([str(tmp_path / "d.json")], str(tmp_path))


def test_missing_features_list_the_first_ids_and_the_count_or_are_skipped(tmp_path):
    write_bags(tmp_path, {"s1": 0})
    write_json(tmp_path / "d.json", [record(f"r{i}", f"gone{i}", "<image>\nQ?", "A.") for i in range(7)]
               + [record("ok", "s1", "<image>\nQ?", "A.")])
    with pytest.raises(DataError, match=r"missing for 7 record\(s\), first: r0, r1, r2, r3, r4;.*--skip-missing"):
        load_records([str(tmp_path / "d.json")], str(tmp_path))
    loaded = load_records([str(tmp_path / "d.json")], str(tmp_path), skip_missing=True)
    assert [r.record_id for r in loaded.records] == ["ok"] and len(loaded.missing) == 7


def test_images_resolve_as_slide_ids_with_suffixes_and_as_feature_paths(tmp_path):
    write_bags(tmp_path / "feats", {"TCGA-01": 0, "other": 1})
    torch.save({"features": torch.randn(4, DIM)}, tmp_path / "bag.pt")
    lines = [record("a", "TCGA-01.svs", "<image>\nQ?", "A."), record("b", "bag.pt", "<image>\nQ?", "A."),
             record("c", str(tmp_path / "feats" / "other.h5"), "<image>\nQ?", "A.")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    records = load_records([str(tmp_path / "d.jsonl")], str(tmp_path / "feats")).records
    assert [r.features_path.name for r in records] == ["TCGA-01.h5", "bag.pt", "other.h5"]


def test_invalid_json_names_the_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": 1}\n{broken\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2 is not valid JSON"):
        read_records(tmp_path / "d.jsonl")


def test_validation_split_is_by_slide_and_never_leaks(tmp_path):
    slides = {f"s{i:02d}": i % 3 for i in range(20)}
    write_bags(tmp_path, slides)
    records = [record(f"{s}-q{q}", s, "<image>\nQ?", "A.") for s in slides for q in range(4)]
    write_json(tmp_path / "d.json", records)
    loaded = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    train, val = split_by_slide(loaded, 0.2, seed=3)
    train_slides, val_slides = {r.features_path for r in train}, {r.features_path for r in val}
    assert not train_slides & val_slides and len(val_slides) == 4 and len(val) == 16
    assert len(train) + len(val) == len(loaded)
    again, _ = split_by_slide(loaded, 0.2, seed=3)
    assert [r.record_id for r in again] == [r.record_id for r in train]
    assert split_by_slide(loaded, 0.0, seed=3) == (loaded, [])


def test_max_patches_subsamples_training_bags_reproducibly(tmp_path, tokenizer):
    write_bags(tmp_path, {"s1": 0}, patches=(40, 41))
    write_json(tmp_path / "d.json", [record("r", "s1", "<image>\nQ?", "A.")])
    records = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    builder = PromptBuilder(tokenizer, system_prompt=None)
    train = SlideConversationDataset(records, builder, max_patches=8, seed=1)
    first = train[0]["slide_features"]
    assert first.shape == (8, DIM) and torch.equal(first, train[0]["slide_features"])
    train.set_epoch(1)
    assert not torch.equal(first, train[0]["slide_features"])  # a new draw each epoch
    assert SlideConversationDataset(records, builder)[0]["slide_features"].shape == (40, DIM)  # evaluation: all


def test_max_length_cuts_the_end_but_never_the_image(tmp_path, tokenizer):
    write_bags(tmp_path, {"s1": 0})
    long_reply = "word " * 200
    write_json(tmp_path / "d.json", [record("long", "s1", "<image>\nQ?", long_reply)])
    records = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    builder = PromptBuilder(tokenizer, system_prompt=None, num_image_tokens=4)
    dataset = SlideConversationDataset(records, builder, max_length=64)
    assert len(dataset[0]["input_ids"]) == 64 and dataset.truncated == 1
    assert dataset[0]["input_ids"].count(IMAGE_TOKEN_INDEX) == 4
    with pytest.raises(DataError, match="'long'.*no reply within --max-length 8"):
        SlideConversationDataset(records, builder, max_length=8)
