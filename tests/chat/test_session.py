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


def pooling_weights_by_hand(model, features):
    """softmax(q·k/√d + a) of the projector, recomputed from the keys and CLAM logits of a real forward pass."""
    captured = {}
    tower = model.tower
    hooks = [tower.projector.key.register_forward_hook(lambda m, i, o: captured.update(keys=o.detach())),
             tower.aggregator.register_forward_hook(lambda m, i, o: captured.update(logits=o.attention_logits.detach()))]
    try:
        with torch.no_grad():
            out = model.get_slide_tokens([features])
    finally:
        for hook in hooks:
            hook.remove()
    heads = tower.projector.config.num_heads
    keys = captured["keys"][0]  # (N, H)
    head_dim = keys.shape[-1] // heads
    queries = tower.projector.queries.detach()  # (K, H)
    per_head = [(queries[:, h * head_dim:(h + 1) * head_dim] @ keys[:, h * head_dim:(h + 1) * head_dim].T
                 / head_dim ** 0.5 + captured["logits"][0]).softmax(-1) for h in range(heads)]  # each (K, N)
    return torch.stack(per_head).mean(dim=(0, 1)), out


def test_the_displayed_map_is_what_the_projector_pooled_with(session, slides):
    """After training the tokens pool with softmax(q·k/√d + a), not CLAM's softmax(a): the heatmap must show that."""
    torch.manual_seed(3)
    torch.nn.init.normal_(session.model.tower.projector.queries, std=3.0)  # a trained projector's queries are not 0
    loaded = session.load_slide(slides["tumor"])
    features = loaded.features.features.float()
    expected, tower = pooling_weights_by_hand(session.model, features)
    torch.testing.assert_close(loaded.attention, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loaded.visual_tokens, tower.visual_tokens)  # the tokens the answers use
    answer = session.ask("Describe it.")
    torch.testing.assert_close(answer.attention, expected, atol=1e-6, rtol=1e-5)
    ids = torch.tensor([session.builder.build([type(loaded.turns[0])("user", "<image>\nHi")],
                                              add_generation_prompt=True).input_ids])
    with torch.no_grad():
        forward = session.model(ids, slide_features=[features])
    torch.testing.assert_close(forward.pooling_weights[0], expected, atol=1e-6, rtol=1e-5)
    # CLAM's attention stays available as a second view, and it is a different map
    torch.testing.assert_close(answer.clam_attention, forward.patch_attention[0])
    assert (loaded.attention - loaded.clam_attention).abs().max() > 0.01


def test_an_image_placeholder_in_the_system_prompt_is_a_clear_error(session, slides):
    session.load_slide(slides["tumor"])
    session.builder.system_prompt = "You see <image> slides."  # as the app sets a user's system prompt
    with pytest.raises(ChatEXAONEPathError, match="system prompt contains <image>"):
        session.ask("What is it?")
