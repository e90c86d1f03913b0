"""A case: several slides of one patient in one conversation, each pooled alone and named before its tokens."""

import numpy as np
import pytest
import torch

from chatexaonepath.chat.conversation import IMAGE_TOKEN, MAX_CASE_SLIDES, Turn, label_case, slide_label
from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.chat.regions import Region, parse_case_region
from chatexaonepath.chat.session import ChatSession
from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.vision_tower.features import SlideFeatures

K, DIM = 2, 32


@pytest.fixture
def model(tiny_llm_dir):
    config = ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm_dir), num_visual_tokens=K,
                                  aggregator={"in_dim": DIM, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0},
                                  projector={"num_heads": 4}, prompt_style="llama2")
    torch.manual_seed(0)
    return ChatEXAONEPathForCausalLM.build(config, dtype="fp32").eval()


def bag(name: str, n: int, seed: int) -> SlideFeatures:
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(n) * 256, [0]), -1).reshape(-1, 2)
    return SlideFeatures(torch.from_numpy(rng.normal(size=(n, DIM)).astype(np.float32)), torch.from_numpy(coords),
                         {"patch_size_level0": 256, "level0_width": n * 256, "level0_height": 256}, None)


@pytest.fixture
def case(model, tmp_path):
    session = ChatSession(model, features_dir=tmp_path / "cache", max_new_tokens=3)
    session.use_features(bag("a", 9, 1), "a.svs")
    for i, name in enumerate(("b.svs", "c.svs"), start=2):
        session.use_features(bag(name, 5 + i, i), name, add=True)
    return session


def test_one_placeholder_for_the_whole_case_becomes_a_labelled_line_per_slide():
    turns = label_case([Turn("user", f"Which slide shows the tumour?\n{IMAGE_TOKEN}"), Turn("assistant", "2.")],
                       ["a.csv", "b.csv"])
    assert turns[0].content == (f"Which slide shows the tumour?\n{slide_label(1, 'a.csv')} {IMAGE_TOKEN}\n"
                                f"{slide_label(2, 'b.csv')} {IMAGE_TOKEN}")
    assert slide_label(2, "b.svs") == "Slide 2 (b.svs):" and turns[1].content == "2."


def test_one_placeholder_per_slide_is_labelled_in_order_and_a_single_slide_is_left_as_trained():
    turns = label_case([Turn("user", f"{IMAGE_TOKEN} against {IMAGE_TOKEN}?")], ["a.svs", "b.svs"])
    assert turns[0].content == f"Slide 1 (a.svs): {IMAGE_TOKEN} against Slide 2 (b.svs): {IMAGE_TOKEN}?"
    alone = [Turn("user", f"{IMAGE_TOKEN}\nWhat is it?")]
    assert label_case(alone, ["a.svs"]) == alone
    # a file named like the placeholder cannot add one
    assert IMAGE_TOKEN not in slide_label(1, f"{IMAGE_TOKEN}.svs")


def test_placeholder_counts_that_fit_neither_rule_and_oversized_cases_are_one_sentence():
    with pytest.raises(ChatEXAONEPathError, match="2 <image> placeholders for a case of 3 slide"):
        label_case([Turn("user", f"{IMAGE_TOKEN} {IMAGE_TOKEN}")], ["a", "b", "c"])
    with pytest.raises(ChatEXAONEPathError, match=f"at most {MAX_CASE_SLIDES} slides"):
        label_case([Turn("user", IMAGE_TOKEN)], [str(i) for i in range(MAX_CASE_SLIDES + 1)])


def test_each_slide_of_a_case_lands_on_its_own_placeholders(model):
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 6, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7],
                        [5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 6, 6, 6, 7]])
    tokens = model.get_slide_tokens([torch.randn(4, DIM), torch.randn(7, DIM), torch.randn(3, DIM)]).visual_tokens
    embeds, _ = model.merge_visual_tokens(ids, tokens, slides_per_sample=[2, 1])
    torch.testing.assert_close(embeds[0, [1, 2]], tokens[0])
    torch.testing.assert_close(embeds[0, [4, 5]], tokens[1])  # the second slide after the first, never mixed
    torch.testing.assert_close(embeds[1, [1, 2]], tokens[2])
    with pytest.raises(ValueError, match=r"\[4, 2\].*\[1, 2\] slide\(s\) per sample"):
        model.merge_visual_tokens(ids, tokens, slides_per_sample=[1, 2])


IMAGE_TOKEN_ID = ChatEXAONEPathConfig().image_token_index


def test_a_case_prompt_names_every_slide_before_its_tokens(case):
    assert [s.name for s in case.slides] == ["a.svs", "b.svs", "c.svs"] and case.slide is case.slides[0]
    ids = case._prompt_ids("Which slide shows the lesion?")
    assert ids.count(IMAGE_TOKEN_ID) == 3 * K
    text = case.model.tokenizer.decode([i for i in ids if i >= 0])
    assert "Slide 1 (a.svs):" in text and "Slide 2 (b.svs):" in text and "Slide 3 (c.svs):" in text
    first = ids.index(IMAGE_TOKEN_ID)
    assert ids[first:first + K] == [IMAGE_TOKEN_ID] * K  # the label, then that slide's K tokens together


def test_a_case_answer_sees_every_slide_and_its_evidence_names_them(case, model):
    answer = case.ask("Which slide shows the lesion?")
    assert answer.slides == 3 and answer.slide_index == 0 and answer.region is None
    assert len(case.slide.turns) == 2 and {e.slide for e in answer.evidence} <= {0, 1, 2}
    weights = [e.weight for e in answer.evidence]
    assert weights == sorted(weights, reverse=True) and [e.rank for e in answer.evidence] == [1, 2, 3]
    # what the LLM is given depends on the third slide too
    ids = torch.tensor([case._prompt_ids("Which slide?")])
    tokens = torch.cat([s.visual_tokens for s in case.slides])
    before, _ = model.merge_visual_tokens(ids, tokens, slides_per_sample=[3])
    tokens[2] += 1.0
    after, _ = model.merge_visual_tokens(ids, tokens, slides_per_sample=[3])
    assert not torch.equal(before, after)


def test_a_region_belongs_to_one_slide_of_the_case(case):
    slide, region = parse_case_region("2:0,0,512,256", slides=3)
    answer = case.ask("What is here?", region=region, slide=slide)
    assert answer.slide_index == 1 and answer.region == Region(0, 0, 512, 256) and len(answer.coords) == 2
    assert all(e.slide == 1 for e in answer.evidence) and case.slide.turns[-1].slide == 1
    assert parse_case_region("0,0,10,10") == (0, Region(0, 0, 10, 10))
    with pytest.raises(ChatEXAONEPathError, match="from 1 to 3"):
        parse_case_region("4:0,0,10,10", slides=3)
    with pytest.raises(ChatEXAONEPathError, match="no slide 5"):
        case.ask("Here?", region=region, slide=4)


def test_a_case_holds_at_most_eight_slides_and_loading_one_slide_starts_over(case):
    for i in range(MAX_CASE_SLIDES - 3):
        case.use_features(bag("x", 4, 10 + i), f"x{i}.svs", add=True)
    with pytest.raises(ChatEXAONEPathError, match=f"already has {MAX_CASE_SLIDES} slides"):
        case.use_features(bag("y", 4, 99), "y.svs", add=True)
    case.use_features(bag("z", 4, 98), "z.svs")  # the single-slide API: a new conversation about one slide
    assert len(case.slides) == 1 and case.slide.name == "z.svs"
    ids = case._prompt_ids("What is it?")
    assert ids.count(IMAGE_TOKEN_ID) == K and "Slide 1" not in case.model.tokenizer.decode([i for i in ids if i >= 0])
