"""Sessions that end, limits enforced on the server, safe network defaults, and nothing private leaking."""

import ast
import math
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from chatexaonepath.errors import ChatEXAONEPathError, MissingMppError, ServerBusyError, SlideError
from chatexaonepath.webapp.cli import is_loopback, main, network_warning
from chatexaonepath.webapp.config import GenerationSettings
from chatexaonepath.webapp.messages import redact_paths, user_message
from chatexaonepath.webapp.session import LoadCancelled
from chatexaonepath.webapp.handlers import PageHandlers
from tests.webapp.conftest import gradio_upload

WEBAPP = Path(__file__).resolve().parents[2] / "chatexaonepath" / "webapp"


def tab(name="tab"):
    return SimpleNamespace(session_hash=name)


# -- sessions that end --------------------------------------------------------------------------------------
def test_idle_sessions_expire_with_their_files_and_memory(make_engine, slides, tmp_path):
    engine = make_engine(session_idle_minutes=30)
    idle, active = engine.session("idle"), engine.session("active")
    idle.load_upload(gradio_upload(engine.work_dir, slides["tumor"]))
    active.load(slides["stroma"])
    assert idle.folder.exists() and idle.chat.slide is not None
    later = time.monotonic() + 31 * 60
    active.last_active = later  # a request just now
    assert engine.expire_idle(now=later) == 1
    assert engine.find_session("idle") is None and engine.find_session("active") is active
    assert not idle.folder.exists() and idle.chat.slide is None and idle.view is None
    returning = engine.session("idle")  # the same tab, back after an hour
    with pytest.raises(ChatEXAONEPathError, match="idle for more than 30 minutes"):
        returning.ask("Still there?")
    assert active.ask("Still there?").text is not None


def test_a_session_mid_answer_is_not_expired(make_engine, slides):
    engine = make_engine(max_new_tokens=200)
    session = engine.session("tab")
    session.load(slides["tumor"])
    stream = session.ask_stream("Describe the slide.", GenerationSettings(0.0, 200, None))
    next(stream)
    assert engine.expire_idle(now=time.monotonic() + 10**6) == 0 and session.busy
    stream.close()
    assert not session.busy and engine.expire_idle(now=time.monotonic() + 10**6) == 1


def test_the_timer_ends_idle_sessions_without_any_request(make_engine):
    engine = make_engine(session_idle_minutes=0.02)  # 1.2 s
    engine.session("scripted-client")  # never sends another request, never closes a tab
    deadline = time.monotonic() + 10
    while engine.session_count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.session_count == 0


def test_beyond_the_session_cap_new_visitors_are_told_and_others_keep_working(make_engine, slides):
    engine = make_engine(max_sessions=2)
    first, second = engine.session("a"), engine.session("b")
    first.load(slides["tumor"])
    with pytest.raises(ServerBusyError, match=r"2 people are using it, its limit \(--max-sessions\); try again"):
        engine.session("c")
    handlers = PageHandlers(engine)
    assert "busy" in handlers.start(tab("c")) and "data-error" in handlers.start(tab("c"))  # told when the page loads
    status, *_ = list(handlers.load_example(True, 0.5, tab("c")))[-1]
    assert "reload the page" in status and "data-error" in status  # and nothing was made for it meanwhile
    assert "reload the page" in list(handlers.ask("Hello?", 0.0, 8, "", tab("c")))[-1][2]
    assert first.ask("What is the diagnosis?").text is not None and engine.session("b") is second
    engine.end_session("b")
    assert engine.session("c") is not None


def test_the_server_can_cancel_any_load(make_engine, slides):
    engine = make_engine()
    session = engine.session("tab")
    errors = []

    def cancel_all(progress):
        if progress.stage == "features":
            engine.cancel_loads()

    try:
        session.load(slides["tumor"], on_progress=cancel_all)
    except LoadCancelled as e:
        errors.append(e)
    assert errors and session.view is None


# -- limits enforced on the server -----------------------------------------------------------------------
@pytest.mark.parametrize("question, settings, expected", [
    ("x" * 200_000, GenerationSettings(0.0, 8, None), r"200,000 characters; this server accepts up to 2,000"),
    ("Grade?", GenerationSettings(0.0, 4096, None), r"this server allows up to 1024 \(--max-new-tokens-limit\)"),
    ("Grade?", GenerationSettings(0.0, 8, "s" * 10_000), r"system prompt has 10,000 characters"),
])
def test_what_the_page_limits_is_refused_by_the_server_too(make_engine, slides, monkeypatch, question, settings,
                                                            expected):
    session = make_engine().session("tab")
    session.load(slides["tumor"])
    monkeypatch.setattr(session.chat, "ask", lambda *a, **k: pytest.fail("the model was asked"))
    with pytest.raises(ChatEXAONEPathError, match=expected):
        session.ask(question, settings=settings)
    with pytest.raises(ChatEXAONEPathError, match=expected):
        session.ask_stream(question, settings)


def test_out_of_range_numbers_from_a_scripted_client_are_one_sentence(make_engine):
    handlers = PageHandlers(make_engine())
    handlers.start(tab())
    for temperature, tokens, expected in ((5.0, 8, "Temperature must be between 0 and 2"),
                                          (math.nan, 8, "Temperature"), (0.0, math.inf, "Max new tokens must be"),
                                          ("hot", 8, "Temperature must be a number"), (0.0, "9" * 5000, "Max new")):
        assert expected in list(handlers.ask("Grade?", temperature, tokens, "", tab()))[-1][2]
    status = list(handlers.load_with_mpp(50.0, True, 0.5, tab()))[-1][0]
    assert "between 0.05 and 10" in status


def test_model_work_per_session_is_rate_limited(make_engine, slides):
    engine = make_engine(max_requests_per_minute=3)
    session = engine.session("tab")
    session.load(slides["tumor"])
    session.ask("One?", settings=GenerationSettings(0.0, 2, None))
    session.ask("Two?", settings=GenerationSettings(0.0, 2, None))
    with pytest.raises(ServerBusyError, match=r"more than 3 requests in a minute.*--max-requests-per-minute.*try again in \d+ s"):
        session.ask("Three?", settings=GenerationSettings(0.0, 2, None))
    other = engine.session("other")  # another session is not slowed by this one
    other.load(slides["stroma"])


def test_a_slide_is_opened_once_per_load(make_engine, slides, monkeypatch):
    from chatexaonepath.chat import session as chat_session
    from chatexaonepath.webapp import session as web_session

    opened = []
    real_open = web_session.open_slide
    monkeypatch.setattr(web_session, "open_slide", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(chat_session, "open_slide", lambda *a, **k: pytest.fail("opened a second time"))
    make_engine().session("tab").load(slides["tumor"])
    assert opened == [slides["tumor"]]


def test_engine_and_session_do_not_import_each_other():
    def imports(module):
        tree = ast.parse((WEBAPP / f"{module}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    assert "engine" not in imports("session") and "session" in imports("engine")
    assert not {"engine", "session", "ui"} & imports("shared")


# -- nothing private in messages and files ------------------------------------------------------------------
def test_page_messages_name_the_upload_never_a_server_path(make_engine, slides):
    engine = make_engine()
    session = engine.session("tab")
    with pytest.raises(SlideError) as info:
        session.load_upload(gradio_upload(engine.work_dir, slides["text_as_svs"]))
    message = user_message(info.value, "loading the slide", session.upload_folders())
    assert "notes.svs" in message and "/" not in message.split("notes.svs")[0]
    assert str(engine.work_dir) not in message
    with pytest.raises(MissingMppError) as info:
        session.load_upload(gradio_upload(engine.work_dir, slides["no_mpp"]))
    message = user_message(info.value, "loading the slide", session.upload_folders())
    assert message.startswith("no_mpp.tiff does not record") and "Enter it below" in message
    assert "--mpp" not in message


def test_redaction_keeps_ordinary_text():
    text = ("Could not open /tmp/chatexaonepath-app-x/sessions/0-ab/9f/case/slide.svs: bad header at 0.25 µm/px "
            "(e.g. 0.5 µm/px for 20×).")
    assert redact_paths(text) == "Could not open slide.svs: bad header at 0.25 µm/px (e.g. 0.5 µm/px for 20×)."
    assert redact_paths("/srv/up/9f/case/a.mrxs", [Path("/srv/up/9f")]) == "case/a.mrxs"
    assert redact_paths("a USER:PASSWORD and/or --max-pixels") == "a USER:PASSWORD and/or --max-pixels"


def test_the_cache_is_private(tmp_path, monkeypatch, make_engine, slides):
    from chatexaonepath.assets import user_cache_dir

    shared_cache = tmp_path / "cache"
    shared_cache.mkdir(mode=0o755)
    os.chmod(shared_cache, 0o755)
    monkeypatch.setenv("CHATEXAONEPATH_CACHE", str(shared_cache))
    assert user_cache_dir() == shared_cache and oct(shared_cache.stat().st_mode)[-3:] == "700"
    engine = make_engine()
    assert oct(engine.features_dir.stat().st_mode)[-3:] == "700"
    engine.session("tab").load(slides["tumor"])
    features = list(engine.features_dir.rglob("*.h5"))
    assert features and all(oct(f.stat().st_mode)[-3:] == "600" for f in features)


# -- safe network defaults --------------------------------------------------------------------------------
def test_network_defaults():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20") and not is_loopback("lab-server")
    assert network_warning("127.0.0.1", False, None) is None
    warning = network_warning("0.0.0.0", False, None)
    assert "WITHOUT a login" in warning and "--auth" in warning and "--no-auth" in warning
    assert network_warning("0.0.0.0", False, None, no_auth=True) is None
    assert network_warning("0.0.0.0", False, [("ana", "pw")]) is None
    with pytest.raises(ChatEXAONEPathError, match="--share .* needs a login"):
        network_warning("127.0.0.1", True, None)
    with pytest.raises(ChatEXAONEPathError, match="contradict"):
        network_warning("0.0.0.0", False, [("ana", "pw")], no_auth=True)


def test_share_without_auth_stops_before_loading_the_model(capsys, monkeypatch):
    from chatexaonepath.webapp import engine as engine_module

    monkeypatch.setattr(engine_module.AppEngine, "load", lambda config: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--share"])
    assert exit_info.value.code == 2 and "needs a login" in " ".join(capsys.readouterr().err.split())


def test_help_lists_the_limits(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--max-pixels", "--max-sessions", "--no-auth", "--max-zip-members", "--max-session-gb"):
        assert option in text


def test_busy_session_checks_do_not_block(make_engine):
    session = make_engine().session("tab")

    def hold():
        with session._busy:
            time.sleep(0.5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    started = time.perf_counter()
    assert session.busy and time.perf_counter() - started < 0.05
    holder.join()
    assert not session.busy
    assert np.isfinite(session.last_active)
