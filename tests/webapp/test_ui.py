"""The page's handlers called directly (no browser): what each event shows, errors included."""

import time
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
    status, image, gallery, mpp_row, chatbot, chat_status, upload = last(handlers.load_example(True, 0.5, tab()))
    assert "data-ready" in status and image.shape[2] == 3 and len(gallery) == 8 and upload is None


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
