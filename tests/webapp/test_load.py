"""Twenty scripted sessions against the app on loopback: memory stays bounded, idle sessions end, a good user is served.

The clients use `gradio_client`, which never opens the browser's heartbeat, so their sessions end
only by expiry — exactly the leak a scripted client caused before sessions expired.
"""

from __future__ import annotations

import gc
import random
import shutil
import struct
import threading
import time
import zipfile
import zlib

import pytest

from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.webapp.engine import AppConfig, AppEngine

CLIENTS = 20
MAX_SESSIONS = 6
IDLE_MINUTES = 0.2  # 12 s: longer than a request waits in the queue during the storm
STORM_SECONDS = 30


def hostile_files(folder):
    """A PNG bomb, a zip of many empty members, and a .vms reaching out of its folder."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = folder / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    many = folder / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(5_000):
            zf.writestr(f"{i}.txt", b"")
    escape = folder / "escape.zip"
    with zipfile.ZipFile(escape, "w") as zf:
        zf.writestr("case.vms", "[Virtual Microscope Specimen]\nNoJpegColumns=1\nNoJpegRows=1\n"
                                "ImageFile=../../../../../etc/hostname\nMapFile=../../../../../etc/hostname\n")
    return [bomb, many, escape]


@pytest.fixture
def served(tiny_chat_model, tiny_encoder, tmp_path):
    from chatexaonepath.webapp.cli import launch_app

    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=4)
    config = AppConfig(features_dir=str(tmp_path / "features"), example_size=2048, max_new_tokens=8,
                       max_upload_gb=0.05, max_session_gb=0.1, max_sessions=MAX_SESSIONS,
                       max_sessions_per_client=MAX_SESSIONS,  # every client is on loopback
                       session_idle_minutes=IDLE_MINUTES, max_requests_per_minute=30)
    engine = AppEngine(tiny_chat_model, FeatureExtractor(extract, tiny_encoder), config,
                       example_path=tmp_path / "example.tiff", work_dir=tmp_path / "work")
    engine.warm_up_example()  # the example's features are cached, as they are once an app has started
    demo, url = launch_app(engine, host="127.0.0.1", port=None, quiet=True)
    yield url, engine
    demo.close()
    engine.close()


def client(url):
    """A scripted client that starts its session as the page does (`/start_session`, the page's load event)."""
    from gradio_client import Client

    scripted = Client(url, verbose=False, download_files=False)
    scripted.predict(api_name="/start_session")
    return scripted


def scripted_visitor(url, files, outcomes, stop):
    """Arrives, tries a few things (some hostile), then goes silent without closing anything."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    rng = random.Random()
    # Its own copies: identical uploads at the same moment share one file in Gradio's cache, and the
    # second session to take it is told to upload again — a refusal, but not the one under test.
    mine = threading.get_ident()
    files = [shutil.copy(f, f.with_name(f"{f.stem}-{mine}{f.suffix}")) for f in files]
    try:
        visitor = client(url)
        for _ in range(3):
            if stop.is_set():
                return
            kind = rng.choice(["upload", "example", "long question", "huge answer"])
            if kind == "upload":
                status = visitor.predict(handle_file(str(rng.choice(files))), True, 0.5, api_name="/load_upload")[0]
            elif kind == "example":
                status = visitor.predict(True, 0.5, api_name="/load_example_slide")[0]
            else:
                question, tokens = ("x" * 200_000, 8) if kind == "long question" else ("Grade?", 4096)
                try:
                    status = visitor.predict(question, 0.0, tokens, "", api_name="/ask")[2]
                except AppError as e:  # Gradio's own range check on the slider, before our handler
                    status = str(e)
            outcomes.append((kind, str(status)))
    except Exception as e:  # a refused request must be a message, never a dropped connection
        outcomes.append(("crash", repr(e)))


def patient_user(url, answers, stop):
    """Loads the example and keeps asking, a question every few seconds, all through the storm."""
    user = client(url)
    status = user.predict(True, 0.5, api_name="/load_example_slide")[0]
    answers.append(("load", str(status), 0.0))
    while not stop.is_set():
        started = time.monotonic()
        chat, _, note = user.predict("What is the diagnosis?", 0.0, 8, "", api_name="/ask")
        answers.append(("ask", str(note), time.monotonic() - started))
        stop.wait(1.0)


def asked_answers(answers):
    return [a for a in answers if a[0] == "ask"]


@pytest.mark.slow
def test_twenty_scripted_sessions_leave_the_app_bounded_and_serving(served, tmp_path):
    import psutil

    url, engine = served
    files = hostile_files(tmp_path)
    process = psutil.Process()
    gc.collect()
    baseline = process.memory_info().rss
    stop, outcomes, answers, peaks, live = threading.Event(), [], [], [], []
    user = threading.Thread(target=patient_user, args=(url, answers, stop), daemon=True)
    user.start()
    while not answers:  # the patient user holds a session before the storm starts
        time.sleep(0.2)
    visitors = []
    started = time.monotonic()
    while time.monotonic() - started < STORM_SECONDS:
        if len(visitors) < CLIENTS and time.monotonic() - started > len(visitors) * 1.2:
            visitors.append(threading.Thread(target=scripted_visitor, args=(url, files, outcomes, stop), daemon=True))
            visitors[-1].start()
        peaks.append(process.memory_info().rss)
        live.append(engine.session_count)
        time.sleep(0.25)
    for visitor in visitors:
        visitor.join(timeout=30)
    deadline = time.monotonic() + 20  # the silent visitors' sessions end by expiry alone
    while engine.session_count > 1 and time.monotonic() - deadline < 0:
        time.sleep(0.25)
    expired_while_user_stays = engine.session_count
    stop.set()
    user.join(timeout=60)

    print(f"\nload test: {len(outcomes)} visitor requests, {len(asked_answers(answers))} answers to the patient user, "
          f"at most {max(live)} live sessions, memory +{(max(peaks) - baseline) / 1024**2:.0f} MB at the peak")
    assert len(visitors) == CLIENTS and not [o for o in outcomes if o[0] == "crash"], outcomes
    assert max(live) <= MAX_SESSIONS
    refusals = [text for kind, text in outcomes if kind != "example"]
    # (a visitor the server had no room for was told so when its page loaded, then to reload on each request)
    assert all(any(word in text for word in ("allowed", "accepts up to", "allows up to", "greater than maximum", "busy",
                                             "refers to", "reload the page"))
               for text in refusals), refusals
    assert expired_while_user_stays == 1  # every silent visitor's session ended; the patient user's did not
    sessions_dir = engine.work_dir / "sessions"
    kept = [p for p in sessions_dir.rglob("*") if p.is_file()] if sessions_dir.exists() else []
    assert kept == []  # the example is not an upload: no session holds a file
    asked = asked_answers(answers)
    assert "data-ready" in answers[0][1] and len(asked) >= 5
    assert all("tokens in" in note for _, note, _ in asked), asked
    assert max(seconds for *_, seconds in asked) < 20
    assert max(peaks) - baseline < 500 * 1024**2  # well under 1 GB above the idle footprint
