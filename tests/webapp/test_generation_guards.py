"""The advanced panel's anti-loop settings: the defaults start the sliders, a tab's change reaches its chat only."""

from types import SimpleNamespace

from chatexaonepath.chat.session import DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY
from chatexaonepath.webapp.handlers import PageHandlers
from chatexaonepath.webapp.ui import build_demo


def tab(name):
    return SimpleNamespace(session_hash=name)


def test_the_sliders_start_at_the_guards_and_a_change_reaches_that_tabs_chat_only(make_engine):
    engine = make_engine()
    demo = build_demo(engine)
    sliders = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None) in
               ("repetition-penalty", "no-repeat-ngram")}
    assert sliders["repetition-penalty"].value == DEFAULT_REPETITION_PENALTY
    assert sliders["no-repeat-ngram"].value == DEFAULT_NO_REPEAT_NGRAM_SIZE
    handlers = PageHandlers(engine)
    handlers.start(tab("a"))
    handlers.set_repetition_guards(1.0, 0, tab("a"))  # off, for this tab
    assert (engine.session("a").chat.repetition_penalty, engine.session("a").chat.no_repeat_ngram_size) == (1.0, 0)
    other = engine.session("b").chat
    assert (other.repetition_penalty, other.no_repeat_ngram_size) == (DEFAULT_REPETITION_PENALTY,
                                                                       DEFAULT_NO_REPEAT_NGRAM_SIZE)
    for bad in ((5.0, 3), (1.2, -1), ("nan?", 2)):  # a scripted client past the sliders' ranges: ignored
        handlers.set_repetition_guards(*bad, tab("a"))
    assert engine.session("a").chat.repetition_penalty == 1.0
