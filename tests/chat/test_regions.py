"""Questions about a region (chat/regions.py and ChatSession.ask(region=…)), and the evidence answers carry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.chat.regions import (
    EmptyRegionError, Region, SlideTurn, parse_case_region, patches_in_region, top_evidence,
)
from chatexaonepath.chat.session import ChatSession
from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor


@pytest.fixture
def session(tiny_llm_dir, tiny_encoder, tmp_path):
    config = ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm_dir), num_visual_tokens=2,
                                  aggregator={"in_dim": 64, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0},
                                  projector={"num_heads": 4}, prompt_style="llama2")
    torch.manual_seed(0)
    model = ChatEXAONEPathForCausalLM.build(config)
    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0)
    return ChatSession(model, extract, features_dir=tmp_path / "cache",
                       extractor=FeatureExtractor(extract, tiny_encoder), max_new_tokens=4)


def test_regions_parse_from_text_and_refuse_anything_else():
    assert Region.parse(" 10, 20 ,300,400") == Region(10, 20, 300, 400) == Region.of((10, 20, 300, 400))
    assert str(Region(1, 2, 3, 4)) == "1,2,3,4" and Region.of("1,2,3,4") == Region(1, 2, 3, 4)
    for bad in ("1,2,3", "a,b,c,d", "1,2,-3,4", "1.5,2,3,4", ""):
        with pytest.raises(ChatEXAONEPathError, match="four whole numbers"):
            Region.parse(bad)
    with pytest.raises(ChatEXAONEPathError, match="at least 1 pixel"):
        Region(0, 0, 0, 5)
    assert Region(-50, 10, 100, 100).clipped(60, 60) == Region(0, 10, 50, 50)
    assert Region(100, 100, 10, 10).clipped(60, 60) is None


@pytest.mark.parametrize("text", ["1,2,3," + "9" * 5000, "9" * 5000 + ",0,1,1", "-" + "9" * 30 + ",0,5,5",
                                  "0,0,2147483648,1", "9" * 5000 + ":1,2,3,4", "²:1,2,3,4", "9" * 5000])
def test_huge_or_odd_numbers_in_a_region_are_one_sentence(text):
    # Past 4,300 digits int() raises ValueError, and "²".isdigit() is True though int() refuses it.
    with pytest.raises(ChatEXAONEPathError) as caught:
        parse_case_region(text, slides=2)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 200 and message.startswith("A region") and message.endswith(".")


def test_region_values_are_bounded_whatever_builds_them():
    assert parse_case_region("2:0,0,2147483647,1", slides=2) == (1, Region(0, 0, 2147483647, 1))
    for value in ((0, 0, 10**5000, 1), (float("inf"), 0, 1, 1), ("x", 10**5000, 1, 1)):
        with pytest.raises(ChatEXAONEPathError, match="A region"):
            Region.of(value)


def test_a_patch_is_in_a_region_when_its_centre_is_and_small_regions_take_what_they_overlap():
    coords = np.array([[0, 0], [512, 0], [0, 512], [512, 512]])
    assert patches_in_region(coords, 512, Region(0, 0, 1024, 512)).tolist() == [0, 1]
    assert patches_in_region(coords, 512, Region(200, 200, 600, 600)).tolist() == [0, 1, 2, 3]  # centres 256, 768
    assert patches_in_region(coords, 512, Region(300, 300, 100, 100)).tolist() == [0]  # inside one patch
    assert patches_in_region(coords, 512, Region(0, 0, 256, 1024)).tolist() == [0, 2]  # centres on the edge: out
    assert patches_in_region(coords, 512, Region(2000, 0, 50, 50)).tolist() == []
    adjacent = [patches_in_region(coords, 512, Region(x, 0, 512, 1024)).tolist() for x in (0, 512)]
    assert adjacent == [[0, 2], [1, 3]]  # regions that tile the slide never share a patch


def test_evidence_is_the_heaviest_patches_mapped_back_to_the_slide():
    coords = np.array([[0, 0], [512, 0], [1024, 0]])
    evidence = top_evidence(torch.tensor([0.2, 0.5, 0.3]), coords, 512, indices=np.array([4, 7, 9]), k=2)
    assert [(e.rank, e.index, e.x, e.weight) for e in evidence] == [(1, 7, 512, 0.5), (2, 9, 1024, pytest.approx(0.3))]
    assert evidence[0].region == Region(512, 0, 512, 512)


def test_a_region_question_reaches_the_tower_with_exactly_its_patches(session, slides, monkeypatch):
    loaded = session.load_slide(slides["tumor"])
    coords, features = loaded.features.coords.numpy(), loaded.features.features
    side = int(loaded.features.attrs["patch_size_level0"])
    region = Region(0, 0, 1024, 2048)  # the left half of the 2048² slide
    expected = np.flatnonzero(coords[:, 0] + side / 2 < 1024)
    assert 0 < len(expected) < len(coords)
    seen = []
    real = session.model.get_slide_tokens

    def spy(bags, *args, **kwargs):
        seen.append(bags[0].detach().clone())
        return real(bags, *args, **kwargs)

    monkeypatch.setattr(session.model, "get_slide_tokens", spy)
    answer = session.ask("What is in this part?", region=region)
    assert len(seen) == 1  # the tower ran once, on the region's cached features; nothing was re-extracted
    torch.testing.assert_close(seen[0], features[torch.as_tensor(expected)].float())
    assert answer.patch_indices.tolist() == expected.tolist() and answer.region == region
    assert answer.attention.shape == (len(expected),) and torch.equal(answer.coords, loaded.features.coords[expected])
    assert answer.evidence and all(e.index in expected for e in answer.evidence)
    assert answer.evidence[0].weight == pytest.approx(float(answer.attention.max()))


def test_whole_slide_and_region_turns_alternate_and_say_which_was_which(session, slides):
    loaded = session.load_slide(slides["tumor"])
    whole = session.ask("What is the diagnosis?")
    part = session.ask("And here?", region="1024,0,1024,2048")
    again = session.ask("And overall?")
    assert whole.region is None and whole.patch_indices is None and again.region is None
    torch.testing.assert_close(whole.attention, loaded.attention)  # the whole slide's own weights
    assert whole.evidence[0].index == int(loaded.attention.argmax())
    assert part.region == Region(1024, 0, 1024, 2048)
    turns = session.slide.turns
    assert all(isinstance(t, SlideTurn) for t in turns) and len(turns) == 6
    assert [t.region for t in turns[::2]] == [None, Region(1024, 0, 1024, 2048), None]
    assert turns[3].evidence == part.evidence and turns[1].evidence == whole.evidence


def test_a_region_without_tissue_patches_is_a_clear_message_not_an_answer(session, slides, monkeypatch):
    session.load_slide(slides["tumor"])
    monkeypatch.setattr(session.model.llm, "generate", lambda *a, **k: pytest.fail("the model was asked"))
    coords = session.slide.features.coords.numpy()
    side = int(session.slide.features.attrs["patch_size_level0"])
    empty = next((x, y) for y in range(0, 2048, side) for x in range(0, 2048, side)
                 if not ((coords[:, 0] == x) & (coords[:, 1] == y)).any())
    with pytest.raises(EmptyRegionError, match="no tissue patches"):
        session.ask("What is here?", region=(empty[0] + 10, empty[1] + 10, 20, 20))
    with pytest.raises(EmptyRegionError, match="outside the slide"):
        session.ask("What is here?", region=(5000, 5000, 100, 100))
    assert session.slide.turns == []
