"""Case-level training data: `image` lists (this project's and SlideChat's as shipped, with `.csv` features)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatexaonepath.chat.conversation import IMAGE_TOKEN_INDEX, PromptBuilder
from chatexaonepath.chat.provenance import FeatureMismatchError
from chatexaonepath.errors import FeaturesError
from chatexaonepath.train.data import (
    DataError, SlideCollator, SlideConversationDataset, features_provenance, load_records, split_by_slide,
)
from chatexaonepath.vision_tower.features import read_features
from tests.train.conftest import DIM, phase_configs, record, write_bags, write_json

SLIDECHAT = "external: slidechat-csv"


def write_slidechat_csv(path: Path, label: int, seed: int, patches: int = 8) -> Path:
    """A features CSV as SlideChat's extraction writes it: columns 0..D-1 (%.4f), then the patch's image path."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(patches, DIM)) + 3.0 * np.eye(DIM)[label]
    lines = [",".join([*map(str, range(DIM)), "img_path"])]
    for i, row in enumerate(features):
        lines.append(",".join(f"{v:.4f}" for v in row) + f",./BLCA/{path.stem}/{i % 4}_{i // 4}.jpeg")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm)


def test_slidechat_csv_reads_features_and_grid_positions(tmp_path):
    bag = read_features(write_slidechat_csv(tmp_path / "TCGA-A.csv", 1, 0))
    assert bag.features.shape == (8, DIM) and bag.coords[5].tolist() == [1, 1]
    assert bag.attrs["encoder"] == SLIDECHAT and bag.attrs["coords_unit"] == "grid"


@pytest.mark.parametrize("text, fragment", [
    ("a,b,c\n1,2,3\n", "feature columns 0,1,2"),
    ("0,1,img_path\n", "no patches"),
    ("0,1,img_path\n0.1,0.2,x/0_0.jpeg\n0.1,0.2\n", "line 3 has 2 fields"),
    ("0,1,img_path\n0.1,oops,x/0_0.jpeg\n", "line 2 has a feature value that is not a number"),
    ("0,1,img_path\n0.1,0.2,x/patch.jpeg\n", "line 2: the patch name"),
])
def test_a_malformed_slidechat_csv_is_one_sentence(tmp_path, text, fragment):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(FeaturesError, match=fragment) as error:
        read_features(tmp_path / "bad.csv")
    assert "bad.csv" in str(error.value) and str(error.value).count(". ") == 0


def test_a_case_item_labels_each_slide_and_batches_its_bags(tmp_path, tokenizer):
    write_bags(tmp_path, {"s1": 0, "s2": 1, "s3": 0})
    write_json(tmp_path / "d.json", [
        record("case", ["s1", "s2"], "Which slide shows class beta?\n<image>", "Slide 2."),  # SlideChat's layout
        record("pair", ["s2", "s3"], "<image> or <image>?", "The first."),  # one per slide
        record("one", "s1", "<image>\nWhat is it?", "Alpha."),
    ])
    records = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    assert [len(r.features_paths) for r in records] == [2, 2, 1] and records[0].slide_names == ("s1", "s2")
    dataset = SlideConversationDataset(records, PromptBuilder(tokenizer, num_image_tokens=3, system_prompt=None))
    case = dataset[0]
    text = tokenizer.decode([t for t in case["input_ids"] if t >= 0])
    assert "Slide 1 (s1):" in text and "Slide 2 (s2):" in text
    assert case["input_ids"].count(IMAGE_TOKEN_INDEX) == 6 and len(case["slide_features"]) == 2
    assert "Slide 1" not in tokenizer.decode([t for t in dataset[2]["input_ids"] if t >= 0])
    batch = SlideCollator(tokenizer.eos_token_id)([dataset[0], dataset[2], dataset[1]])
    assert batch["slides_per_sample"].tolist() == [2, 1, 2] and batch["slide_features"].shape[0] == 5
    assert batch["slide_mask"].sum(1).tolist() == [len(b) for b in [*case["slide_features"], dataset[2]["slide_features"],
                                                                     *dataset[1]["slide_features"]]]


def test_truncation_never_cuts_a_slide_of_a_case(tmp_path, tokenizer):
    write_bags(tmp_path, {"s1": 0, "s2": 1})
    write_json(tmp_path / "d.json", [record("case", ["s1", "s2"], "Compare.\n<image>", "Both alike. " * 40)])
    records = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    builder = PromptBuilder(tokenizer, num_image_tokens=3, system_prompt=None)
    full = SlideConversationDataset(records, builder)[0]["input_ids"]
    last_image = max(i for i, t in enumerate(full) if t == IMAGE_TOKEN_INDEX)
    cut = SlideConversationDataset(records, builder, max_length=last_image + 15)[0]["input_ids"]
    assert cut.count(IMAGE_TOKEN_INDEX) == 6 and len(cut) == last_image + 15
    with pytest.raises(DataError, match="no reply within --max-length"):
        SlideConversationDataset(records, builder, max_length=last_image)


@pytest.mark.parametrize("image, turns, fragment", [
    (["s1", "s2", "s3"], ["<image> <image>", "A."], "2 <image> placeholders for a case of 3 slides"),
    ([f"s{i}" for i in range(9)], ["<image>", "A."], "at most 8"),
    (["s1", ""], ["<image>", "A."], "no 'image'"),
])
def test_malformed_case_records_fail_naming_the_record(tmp_path, image, turns, fragment):
    write_bags(tmp_path, {"s1": 0, "s2": 1, "s3": 0})
    write_json(tmp_path / "d.json", [record("bad-7", image, *turns)])
    with pytest.raises(DataError, match=fragment) as error:
        load_records([str(tmp_path / "d.json")], str(tmp_path))
    assert "bad-7" in str(error.value)


def test_the_slides_of_a_case_share_one_provenance(tmp_path):
    write_bags(tmp_path, {"s1": 0})
    write_slidechat_csv(tmp_path / "s2.csv", 1, 1)
    write_json(tmp_path / "d.json", [record("mixed", ["s1", "s2.csv"], "<image>", "A.")])
    with pytest.raises(DataError, match="slides of case 'mixed'.*encoder=fake.*encoder=external: slidechat-csv"):
        load_records([str(tmp_path / "d.json")], str(tmp_path))


def test_the_split_keeps_every_slide_of_a_case_on_one_side(tmp_path):
    slides = {f"s{i}": i % 2 for i in range(10)}
    write_bags(tmp_path, slides)
    data = [record(f"c{i}", [f"s{i}", f"s{i + 1}"], "<image>", "A.") for i in range(0, 10, 2)]
    data += [record(f"r{i}", f"s{i}", "<image>", "B.") for i in range(10)]
    write_json(tmp_path / "d.json", data)
    records = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    for seed in range(4):
        train, val = split_by_slide(records, 0.3, seed)
        train_slides = {p for r in train for p in r.features_paths}
        val_slides = {p for r in val for p in r.features_paths}
        assert val and train and not train_slides & val_slides


def test_slidechat_format_with_csv_features_trains_phase_1_and_2(tmp_path, tiny_llm):
    """SlideChat's JSON as shipped: `image` lists of `.csv` files under a tumour folder, `<image>` at the end."""
    from chatexaonepath.chat.session import ChatSession, load_chat_model
    from chatexaonepath.train.phases import train_phase

    names = ["alpha", "beta"]
    slides = {f"TCGA-{i:02d}": i % 2 for i in range(4)}
    for i, (slide, label) in enumerate(slides.items()):
        write_slidechat_csv(tmp_path / "feat" / "BLCA" / f"{slide}.csv", label, i)
    stage1 = [{"id": f"{s}-cap", "image": [f"./BLCA/{s}.csv"], "conversations": [
        {"from": "human", "value": "Describe the slide.\n<image>"}, {"from": "gpt", "value": f"{names[c]} tissue."}]}
        for s, c in slides.items()]
    ids = list(slides)
    stage2 = [{"id": f"{a}+{b}", "image": [f"./BLCA/{a}.csv", f"./BLCA/{b}.csv"], "conversations": [
        {"from": "human", "value": "Which slide is beta?\n<image>"},
        {"from": "gpt", "value": f"Slide {1 if slides[a] else 2}."}]} for a, b in zip(ids[0::2], ids[1::2])]
    stage2 += [{"id": f"{s}-q", "image": [f"./BLCA/{s}.csv"], "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": names[c].title()}]}
        for s, c in slides.items()]
    (tmp_path / "stage1.json").write_text(json.dumps(stage1))
    (tmp_path / "stage2.json").write_text(json.dumps(stage2))

    p1 = train_phase(*phase_configs(1, tmp_path / "p1", tmp_path / "stage1.json", tmp_path / "feat",
                                    llm=str(tiny_llm))).out
    result = train_phase(*phase_configs(2, tmp_path / "p2", tmp_path / "stage2.json", tmp_path / "feat",
                                        init=str(p1), learning_rate=1e-2))
    config = json.loads((result.out / "config.json").read_text())
    assert config["feature_provenance"]["encoder"] == SLIDECHAT
    assert json.loads((result.out / "training_args.json").read_text())["data"]["case_records"] == 2

    session = ChatSession(load_chat_model(result.out), max_new_tokens=2)
    feat = tmp_path / "feat" / "BLCA"
    session.use_features(read_features(feat / "TCGA-00.csv"), "TCGA-00.csv")
    session.use_features(read_features(feat / "TCGA-01.csv"), "TCGA-01.csv", add=True)
    assert session.ask("Which slide is beta?").slides == 2
    write_bags(tmp_path / "raw", {"raw": 0})  # features from another encoder ("fake"), as a raw slide would give
    with pytest.raises(FeatureMismatchError, match="external: slidechat-csv"):
        session.use_features(read_features(tmp_path / "raw" / "raw.h5"), "raw.svs")
    assert features_provenance(load_records([str(tmp_path / "stage2.json")], str(tmp_path / "feat")).records) \
        ["encoder"] == SLIDECHAT
    assert torch.isfinite(torch.tensor(result.train_loss))
