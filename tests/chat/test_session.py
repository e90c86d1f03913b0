import pytest
import torch

from chatexaonepath.chat.conversation import IMAGE_TOKEN_INDEX
from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
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
                       extractor=FeatureExtractor(extract, tiny_encoder), max_new_tokens=6)


def test_features_are_cached_across_sessions_and_questions(session, slides, monkeypatch):
    first = session.load_slide(slides["tumor"])
    assert first.extracted and first.attention.shape == (len(first.features),)
    again = ChatSession(session.model, session.extract_config, features_dir=session.features_dir,
                        extractor=session.extractor, max_new_tokens=6)

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(session.extractor, "extract", no_extraction)
    loaded = again.load_slide(slides["tumor"])
    assert not loaded.extracted
    torch.testing.assert_close(loaded.features.features, first.features.features)
    again.ask("What is the diagnosis?")
    again.ask("And the grade?")  # the second question reuses the slide's visual tokens
    assert len(again.slide.turns) == 4


def test_streaming_gives_the_same_text_as_plain_greedy_generation(session, slides):
    session.load_slide(slides["tumor"])
    pieces = []
    answer = session.ask("Describe this slide.", on_text=pieces.append)
    assert "".join(pieces).strip() == answer.text
    prompt = torch.tensor([session.builder.build(
        [type(session.slide.turns[0])("user", "<image>\nDescribe this slide.")], add_generation_prompt=True).input_ids])
    ids = session.model.generate(prompt, [session.slide.features.features.float()], max_new_tokens=6, do_sample=False,
                                 pad_token_id=session.model.tokenizer.pad_token_id)
    assert session.model.tokenizer.decode(ids[0], skip_special_tokens=True).strip() == answer.text
    assert answer.new_tokens <= 6 and answer.attention.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_context_overflow_drops_old_turns_but_keeps_the_image(session, slides):
    session.load_slide(slides["tumor"])
    for i in range(3):
        session.ask(f"Question number {i} about the tissue architecture and the nuclei?")
    full = len(session._prompt_ids("One more question?"))
    session.model.llm.config.max_position_embeddings = full + session.max_new_tokens - 10
    ids = session._prompt_ids("One more question?")
    assert len(ids) + session.max_new_tokens <= session.model.llm.config.max_position_embeddings
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    session.model.llm.config.max_position_embeddings = 20
    with pytest.raises(ChatEXAONEPathError, match="too long"):
        session._prompt_ids("One more question?")


def test_asking_without_a_slide_or_question_is_an_error(session, slides):
    with pytest.raises(ChatEXAONEPathError, match="Load a slide"):
        session.ask("Hello?")
    session.load_slide(slides["tumor"])
    with pytest.raises(ChatEXAONEPathError, match="empty"):
        session.ask("   ")


def test_a_literal_image_placeholder_in_a_question_is_plain_text(session, slides):
    session.load_slide(slides["tumor"])
    session.ask("Is there an <image> tag here?")
    session.ask("And now?")  # history with the question does not break the next prompt
    assert "<image>" not in session.slide.turns[0].content


def test_a_failing_callback_stops_generation(session, slides):
    import threading

    session.load_slide(slides["tumor"])
    session.max_new_tokens = 200

    def explode(piece):
        raise RuntimeError("display went away")

    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="display went away"):
        session.ask("Describe it.", on_text=explode)
    assert not [t for t in threading.enumerate() if t not in before]  # the generation thread has ended
    session.max_new_tokens = 4
    assert session.ask("Still there?").new_tokens <= 4
