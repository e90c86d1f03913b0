"""Loads that would hold the shared model: a tiny file declaring a huge level, Cancel, and questions going first."""

import threading
import time

import pytest

from chatexaonepath.errors import BudgetExceededError
from chatexaonepath.webapp.session import LoadCancelled
from tests.vision_tower.test_slide import tiff_of_empty_strips
from tests.webapp.conftest import gradio_upload


def test_a_10_kb_tiff_declaring_12_gigapixels_is_refused_at_once(make_engine, tmp_path):
    engine = make_engine()
    session = engine.session("tab")
    attack = tiff_of_empty_strips(tmp_path / "attack.tif", 10_000, 1_200_000, 1_000)
    started = time.perf_counter()
    with pytest.raises(BudgetExceededError, match="--max-level-pixels"):
        session.load_upload(gradio_upload(engine.work_dir, attack))
    assert time.perf_counter() - started < 2.0
    assert session.view is None


@pytest.fixture
def slow_slide(tmp_path):
    """40,000 × 50,000 px of empty strips: within the level budget, ~10 s to read whole on 2 cores."""
    return tiff_of_empty_strips(tmp_path / "slow.tif", 40_000, 50_000, 400)


def start_load(session, path):
    """A load in a thread; returns (thread, stages seen, outcome dict with "error" or "view", start time)."""
    stages, outcome = [], {}

    def run():
        try:
            outcome["view"] = session.load(path, on_progress=lambda p: stages.append(p.stage))
        except BaseException as e:  # noqa: BLE001 - checked by the test
            outcome["error"] = e
        outcome["ended"] = time.perf_counter()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while "tissue" not in stages and "error" not in outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread, stages, outcome


def test_cancel_stops_a_long_read_within_two_seconds(make_engine, slow_slide):
    session = make_engine().session("loader")
    thread, stages, outcome = start_load(session, slow_slide)
    time.sleep(0.5)  # well into reading the level strip by strip
    pressed = time.perf_counter()
    session.cancel()
    thread.join(timeout=30)
    assert isinstance(outcome.get("error"), LoadCancelled)
    assert outcome["ended"] - pressed < 2.0


def test_another_users_question_goes_before_a_long_load(make_engine, slides, slow_slide):
    engine = make_engine()
    asker, loader = engine.session("asker"), engine.session("loader")
    asker.load(slides["tumor"])
    alone = min(_timed(asker.ask, "What is the diagnosis?") for _ in range(2))
    thread, stages, outcome = start_load(loader, slow_slide)
    time.sleep(0.3)
    assert "error" not in outcome and thread.is_alive()  # the load is under way, under the model slot
    meanwhile = _timed(asker.ask, "And the grade?")
    still_loading = thread.is_alive()
    loader.cancel()
    thread.join(timeout=30)
    assert meanwhile < alone + 2.0, (alone, meanwhile)  # not after the load: it was still reading
    assert still_loading, "the load ended before the question: the test proved nothing"


def _timed(ask, question):
    started = time.perf_counter()
    ask(question)
    return time.perf_counter() - started


def test_the_gate_lets_answers_first_and_a_made_way_load_resume_before_new_loads():
    from chatexaonepath.webapp.gate import ModelGate

    gate, order = ModelGate(1), []
    with gate.hold("load") as load:
        waiting = [threading.Thread(target=lambda k=k: _take(gate, k, order)) for k in ("load", "answer")]
        for thread in waiting:
            thread.start()
            time.sleep(0.1)
        assert gate.answers_waiting == 1
        load.make_way()  # the answer runs now; this load resumes before the waiting new load
        order.append("resumed")
    for thread in waiting:
        thread.join(timeout=5)
    assert order == ["answer", "resumed", "load"] and gate.active == 0


def _take(gate, kind, order):
    with gate.hold(kind):
        order.append(kind)
        time.sleep(0.05)


def test_the_viewers_whole_level_read_takes_a_model_slot_and_stops_when_the_slide_goes(make_engine, tmp_path):
    """A flat slide's overview for the viewer reads a whole level: in turn with loads, and no longer than it is shown."""
    from chatexaonepath.vision_tower.slide import open_slide
    from chatexaonepath.webapp.tiles import TileNotFound

    engine = make_engine()
    flat = tiff_of_empty_strips(tmp_path / "flat.tif", 24_000, 24_000, 300)  # 576 MP: seconds to read whole
    seen = {}

    def opener():
        slide = open_slide(flat)
        plain = slide.read_at_downsample

        def recorded(downsample):
            gate = getattr(engine, "gate", None)  # (before the gate: no slot was taken at all)
            seen["slots held"] = gate.active if gate is not None else 0
            return plain(downsample)

        slide.read_at_downsample = recorded
        return slide

    owner = engine.session("viewer")  # the registry holds its owner weakly
    tiles = engine.tiles.publish(owner, opener)
    outcome = {}

    def overview():
        try:
            tiles.tile(8, 0, 0)  # a coarse deep-zoom level: built from the whole level held in memory
        except TileNotFound as e:
            outcome["error"], outcome["ended"] = e, time.perf_counter()

    thread = threading.Thread(target=overview, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while "slots held" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen["slots held"] == 1  # the read holds a model slot, like a load
    time.sleep(0.3)
    revoked = time.perf_counter()
    tiles.revoke()  # the session showing it ended
    thread.join(timeout=30)
    assert isinstance(outcome.get("error"), TileNotFound) and outcome["ended"] - revoked < 1.0
    assert engine.gate.active == 0
