"""Scripted clients: calls without a page session, one address or login taking every session, another
login's session id, numbers that do not parse, and the slides held open for tiles."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from chatexaonepath.errors import ServerBusyError
from chatexaonepath.webapp.engine import NoSessionError
from chatexaonepath.webapp.handlers import PageHandlers


def request(session_hash, host="10.0.0.1", username=None):
    return SimpleNamespace(session_hash=session_hash, client=SimpleNamespace(host=host), username=username)


def test_calls_naming_no_page_session_are_refused_and_make_none(make_engine):
    """`/gradio_api/call/retry` gives every call a new session hash: 200 of them must not lock anybody out."""
    engine = make_engine(max_sessions=16)
    handlers = PageHandlers(engine)
    for i in range(200):
        request_ = request(f"api-call-{i}", host="10.0.0.66")
        assert "reload the page" in list(handlers.retry("", 0.0, 8, "", request_))[-1][2]
        handlers.set_repetition_guards(1.2, 3, request_)  # a hidden event, called by fn_index
        handlers.recompose(True, 0.5, request_)
    assert engine.session_count == 0
    assert handlers.start(request("a-new-visitor", host="10.0.0.7")) == ""  # the page still opens
    assert engine.session_count == 1


def test_one_address_and_one_login_hold_at_most_their_share(make_engine):
    engine = make_engine(max_sessions=16, max_sessions_per_client=3)
    handlers = PageHandlers(engine)
    for i in range(3):
        assert handlers.start(request(f"tab-{i}", host="10.0.0.66")) == ""
    refused = handlers.start(request("tab-3", host="10.0.0.66"))
    assert "This address already has 3 sessions open" in refused and "--max-sessions-per-client" in refused
    for i in range(3):  # one login from three addresses
        assert handlers.start(request(f"ana-{i}", host=f"10.0.1.{i}", username="ana")) == ""
    assert "This login already has 3" in handlers.start(request("ana-3", host="10.0.1.9", username="ana"))
    assert handlers.start(request("visitor", host="10.0.0.8")) == ""  # somebody else is still served
    assert engine.session_count == 7


def test_a_session_belongs_to_the_login_that_started_it(make_engine, slides):
    engine = make_engine()
    handlers = PageHandlers(engine)
    ana = request("shared-id", username="ana")
    handlers.start(ana)
    session = engine.find_session("shared-id", "ana")
    session.load(slides["tumor"])
    session.ask("What is the diagnosis?")
    ben = request("shared-id", username="ben")  # ben learned the id of ana's tab
    assert "reload the page" in list(handlers.ask("What did she ask?", 0.0, 8, "", ben))[-1][2]
    assert "reload the page" in handlers.start(ben)
    handlers.clear(ben)
    handlers.end(ben)
    assert engine.find_session("shared-id", "ana") is session and len(session.turns) == 2
    with pytest.raises(NoSessionError):
        engine.resume_session("shared-id", user="ben")


def test_an_expired_page_gets_a_new_session_with_a_notice(make_engine):
    engine = make_engine(session_idle_minutes=1)
    handlers = PageHandlers(engine)
    handlers.start(request("tab"))
    engine.expire_idle(now=engine.find_session("tab").last_active + 61)
    status, *_ = list(handlers.load_with_mpp(0.5, True, 0.5, request("tab")))[-1]
    assert "idle for more than 1 minutes" not in status  # the notice is the message of the next question
    assert engine.session_count == 1


@pytest.mark.parametrize("region", ["9" * 5000, "1e309,1,2,3", "1,2,3", "a,b,c,d"])
def test_malformed_regions_are_one_sentence(make_engine, slides, region):
    engine = make_engine()
    handlers = PageHandlers(engine)
    handlers.start(request("tab"))
    engine.find_session("tab").load(slides["tumor"])
    chat, question, status = list(handlers.ask("What is here?", 0.0, 8, "", request("tab"), region))[-1]
    assert status.startswith("**Error:** A region is four whole numbers") and question == "What is here?"


def test_a_drawn_region_of_huge_numbers_is_ignored(make_engine):
    from chatexaonepath.webapp.viewer import ViewerHandlers

    viewing = ViewerHandlers(make_engine())
    for bad in ([1e309, 0, 10, 10], [math.nan, 0, 1, 1], ["9" * 5000, 0, 1, 1], "x" * 10_000):
        event = SimpleNamespace(_data={"region": bad})
        assert viewing.region_drawn(request("tab"), event) == (viewing_skip(), viewing_skip())


def viewing_skip():
    import gradio as gr

    return gr.skip()


def test_the_open_slides_cap_holds_where_slides_are_opened(make_engine, tmp_path):
    """Eight sessions publishing a PNG each (kept decoded while open): only MAX_OPEN_SLIDES stay open."""
    from chatexaonepath.webapp.tiles import MAX_OPEN_SLIDES
    from chatexaonepath.webapp.viewer import publish

    engine = make_engine(max_sessions=16, max_sessions_per_client=16)
    pixels = np.full((600, 800, 3), 230, np.uint8)
    pixels[100:500, 100:700] = (170, 90, 150)
    for i in range(8):
        path = tmp_path / f"export-{i}.png"
        Image.fromarray(np.roll(pixels, 7 * i, axis=1)).save(path)
        session = engine.session(f"tab-{i}")
        session.load(path, mpp=0.5)
        publish(engine.tiles, session)
        assert engine.tiles.open_count <= MAX_OPEN_SLIDES
    assert len(engine.tiles) == 8  # all still published: a closed slide reopens on its next tile


def test_sessions_beyond_the_cap_are_refused_even_through_the_python_api(make_engine):
    engine = make_engine(max_sessions=2)
    engine.session("a"), engine.session("b")
    with pytest.raises(ServerBusyError):
        engine.session("c")
