"""The page's handlers called directly (no browser): what each event shows, errors included."""

import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from chatexaonepath.webapp.handlers import PageHandlers
from chatexaonepath.webapp.ui import build_demo, example_questions, progress_html
from chatexaonepath.webapp.session import LoadProgress


def tab(name="tab"):
    return SimpleNamespace(session_hash=name)


def last(events):
    return list(events)[-1]


def opened(engine, *names):
    """The page's handlers, with the page of each tab `names` loaded (which starts its session)."""
    handlers = PageHandlers(engine)
    for name in names or ("tab",):
        assert handlers.start(tab(name)) == ""
    return handlers


def test_the_page_is_built_from_the_engine_with_analytics_off(make_engine):
    demo = build_demo(make_engine())
    assert isinstance(demo, gr.Blocks) and demo.analytics_enabled is False and demo.title == "ChatEXAONEPath"
    questions = example_questions()
    assert questions[0] == "What is the diagnosis?" and any("margins" in q for q in questions)


def test_progress_shows_counts_rate_and_estimate():
    text = progress_html(LoadProgress("features", "Features: 30 / 120 patches", 30, 120, 6.0, 15.0))
    assert 'data-stage="features"' in text and "30 / 120 patches" in text and "6.0 patches/s" in text
    assert "about 15 s left" in text and '<progress value="30" max="120"' in text


def test_out_of_memory_while_loading_is_a_message_and_the_next_load_works(make_engine, monkeypatch):
    engine = make_engine()
    handlers = opened(engine)
    session = engine.session("tab")
    real_load = session.chat.load_slide

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(session.chat, "load_slide", exhausted)
    status, *_ = last(handlers.load_example(True, 0.5, tab()))
    assert "data-error" in status and "Out of memory while loading the slide" in status
    monkeypatch.setattr(session.chat, "load_slide", real_load)
    status, image, gallery, mpp_row, chatbot, chat_status, upload, strip = last(handlers.load_example(True, 0.5, tab()))
    assert "data-ready" in status and image.shape[2] == 3 and len(gallery) == 8 and upload is None
    assert 'data-slides="0"' in strip  # a lone slide: the case strip has nothing to switch between


def test_chat_handlers_explain_what_is_missing(make_engine):
    handlers = opened(make_engine())
    settings = (0.0, 8, "")
    assert last(handlers.ask("  ", *settings, tab()))[2] == "Type a question first."
    chatbot, question, status = last(handlers.ask("What is it?", *settings, tab()))
    assert "Load a slide before asking" in status and question == "What is it?"  # the question is kept
    assert "no answer to retry" in last(handlers.retry("", *settings, tab()))[2]


def test_ask_streams_then_retry_replaces_the_answer(make_engine):
    engine = make_engine()
    handlers = opened(engine)
    last(handlers.load_example(True, 0.5, tab()))
    updates = list(handlers.ask("What is the diagnosis?", 0.0, 8, "", tab()))
    assert updates[0][0][-1] == {"role": "assistant", "content": "…"} and updates[0][1] == ""
    final_chat, _, note = updates[-1]
    assert [m["role"] for m in final_chat] == ["user", "assistant"] and "tokens" in note
    retried, _, _ = last(handlers.retry("", 0.0, 8, "", tab()))
    assert len(retried) == 2 and retried[0]["content"] == "What is the diagnosis?"
    assert handlers.clear(tab()) == ([], "") and engine.session("tab").turns == []


@pytest.mark.parametrize("show, opacity", [(True, 0.5), (False, 0.5)])
def test_heatmap_controls_redraw_from_the_session_view(make_engine, show, opacity):
    engine = make_engine()
    handlers = opened(engine)
    assert handlers.recompose(show, opacity, tab()) == gr.skip()  # nothing loaded yet
    last(handlers.load_example(True, 0.5, tab()))
    image = handlers.recompose(show, opacity, tab())
    assert (image == engine.session("tab").view.compose(show, opacity)).all()


def test_leaving_mid_answer_stops_the_generation(make_engine):
    engine = make_engine(max_new_tokens=400)
    handlers = opened(engine)
    last(handlers.load_example(True, 0.5, tab()))
    events = handlers.ask("Describe the slide in detail.", 0.0, 400, "", tab())
    next(events)  # the question is on the page, the model is already answering
    events.close()  # the tab closed
    deadline = time.monotonic() + 30
    while engine.gate.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.gate.active == 0  # the model is free again, well before 400 tokens
    session = engine.session("tab")
    assert session.stopped_turns == {1} and session.messages()[-1]["content"].endswith("*(stopped)*")


def test_questions_never_wait_in_gradios_queue_behind_a_load(make_engine):
    """Loads and answers queue apart: one queue for both made a question wait for a whole load before the
    engine's gate (which lets answers go first) even saw it."""
    demo = build_demo(make_engine(concurrency=1))
    groups = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values() if fn.api_name}
    loads = {groups[name] for name in ("load_upload", "load_example_slide", "load_with_mpp")}
    answers = {groups[name] for name in ("ask", "retry")}
    assert len(loads) == len(answers) == 1 and loads.isdisjoint(answers)
    assert {limit for _, limit in loads | answers} == {1}


# -- the page's words and states (issue 30) ------------------------------------------------------------------
def test_numbers_are_said_plainly():
    from chatexaonepath.webapp import wording

    assert [wording.length(v) for v in (8.46, 128, 1250.4, 2500)] == ["8.5 µm", "128 µm", "1,250 µm", "2.50 mm"]
    assert [wording.area(v) for v in (3700, 37_000, 2.5e7)] == ["3,700 µm²", "0.037 mm²", "25.0 mm²"]
    assert [wording.share(v) for v in (0.123, 0.0197, 0.00052, 6.415e-7)] == ["12 %", "2.0 %", "0.05 %", "< 0.01 %"]
    html_text = wording.plain_html("the vision tower is untrained")
    assert ">slide reader</span>" in html_text and 'title="vision tower:' in html_text


def test_the_model_card_names_the_demo_models_adapter_not_none(tiny_encoder):
    """The demo model is served without --model: its LoRA row said "(from None)"."""
    from chatexaonepath.webapp.engine import describe_model

    model = SimpleNamespace(config=SimpleNamespace(llm_name_or_path="embedded", tower_trained=True,
                                                   lora={"r": 64, "alpha": 16}))
    extractor = SimpleNamespace(encoder=tiny_encoder)
    demo = SimpleNamespace(describe=lambda: "a demo", warning=lambda: "not a medical device", failure=lambda: None)
    assert dict(describe_model(model, extractor, None, demo).rows())["LoRA"] == "r=64, alpha=16 (the demo model's)"
    assert "None" not in str(describe_model(model, extractor, None).rows())


def test_the_page_says_what_the_slide_is_in_plain_words_and_microns(make_engine):
    from chatexaonepath.webapp.ui import model_card_html

    engine = make_engine()
    handlers = opened(engine)
    status, image, gallery, *_ = last(handlers.load_example(True, 0.3, tab()))
    for word in ("generic-tiff", "level-0", "2,048×2,048 px"):
        assert word not in status
    assert "0.51 × 0.51 mm at 0.25 µm/px (about 40×, TIFF)" in status  # the 2048² example
    assert all(" µm, y " in caption and "%" in caption for _, caption in gallery)
    card = model_card_html(engine)
    llm_folder = engine.model.config.llm_name_or_path  # the tiny LLM's folder on the server
    assert "Slide reader" in card and llm_folder not in card and Path(llm_folder).name in card


def test_evidence_is_shown_once_per_distinct_set_and_in_microns(make_engine):
    from chatexaonepath.webapp.viewer import chat_messages

    engine = make_engine()
    handlers = opened(engine)
    last(handlers.load_example(True, 0.3, tab()))
    last(handlers.ask("What is the diagnosis?", 0.0, 4, "", tab()))
    last(handlers.ask("And the grade?", 0.0, 4, "", tab()))
    last(handlers.ask("Here?", 0.0, 4, "", tab(), "0,0,1024,1024"))
    answers = [m["content"] for m in chat_messages(engine.session("tab"), engine.tiles) if m["role"] == "assistant"]
    assert answers[0].count('class="cxp-chip"') == 3 and " µm, y " in answers[0] and "pooling weight" not in \
        answers[0].split("title=")[0]
    assert 'class="cxp-chip"' not in answers[1] and "the same three patches as answer 1" in answers[1]
    assert 'class="cxp-chip"' in answers[2]  # a region's answer: other patches, shown


def test_the_conversation_export_holds_questions_answers_and_evidence(make_engine):
    from chatexaonepath.webapp.transcript import transcript_markdown

    engine = make_engine()
    handlers = opened(engine)
    last(handlers.load_example(True, 0.3, tab()))
    last(handlers.ask("What is the diagnosis?", 0.0, 4, "", tab(), "0,0,1024,1024"))
    session = engine.session("tab")
    text = transcript_markdown(session, "example.tiff", {"mpp": 0.25, "width": 2048, "height": 2048}, engine.card)
    assert text.startswith("# Conversation about example.tiff")
    assert "## 1. Question about a region of 256 µm × 256 µm (0.066 mm²) at x 0 µm, y 0 µm" in text
    assert "> What is the diagnosis?" in text and text.count("| x ") == len(session.turns[-1].evidence)
    assert "not a medical device" in text.lower() and str(engine.work_dir) not in text


def test_cancel_and_stop_are_enabled_only_around_their_work(make_engine):
    """Each load and answer is chained between two instant events: one enables Cancel (Stop), one disables it."""
    demo = build_demo(make_engine())
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert blocks["cancel"].interactive is False and blocks["stop"].interactive is False
    fns = {fn._id: fn for fn in demo.fns.values()}

    def next_of(fn):
        return [f for f in fns.values() if f.trigger_after == fn._id]

    for api_name, button, on, off in (("load_example_slide", "cancel", "loading", "loaded"),
                                      ("ask", "stop", "answering", "answered"),
                                      ("retry", "stop", "answering", "answered")):
        work = next(f for f in fns.values() if f.api_name == api_name)
        before = fns[work.trigger_after]
        assert before.fn.__name__ == on and before.outputs[0] is blocks[button] and before.fn()["interactive"]
        after, chain = None, [work]
        while chain and after is None:  # a load goes on to show the slide, then says it is done
            chain = [f for c in chain for f in next_of(c)]
            after = next((f for f in chain if f.fn is not None and f.fn.__name__ == off), None)
        assert after is not None and after.outputs[0] is blocks[button] and not after.trigger_only_on_success


@pytest.mark.parametrize("unlike", [True, False])
def test_a_slide_unlike_the_training_slides_is_flagged_over_the_chat_and_beside_each_answer(make_engine, monkeypatch,
                                                                                          unlike):
    import torch

    from chatexaonepath.chat.typicality import MEASURES, UNTYPICAL_MESSAGE, Typicality
    from chatexaonepath.webapp.viewer import chat_messages

    engine = make_engine()
    limit = 1e-6 if unlike else 1e6  # every slide is far from this bank, or none is
    monkeypatch.setattr(engine.model, "typicality", Typicality({k: limit for k in MEASURES}, torch.ones(1, 64),
                                                               torch.ones(1, 64)), raising=False)
    handlers = opened(engine)
    status = last(handlers.load_example(True, 0.3, tab()))[0]
    last(handlers.ask("What is the diagnosis?", 0.0, 4, "", tab()))
    answers = [m["content"] for m in chat_messages(engine.session("tab"), engine.tiles) if m["role"] == "assistant"]
    assert ('data-untypical="1"' in status) == unlike and (UNTYPICAL_MESSAGE in status) == unlike
    assert (UNTYPICAL_MESSAGE in answers[0]) == unlike
    assert engine.session("tab").turns[-1].content.count("unlike") == 0  # the model's own text is left alone
