"""The app's engine without a browser: sessions, the feature cache, uploads, errors, stop and cancel."""

import os
import subprocess
import threading
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chatexaonepath.errors import ChatEXAONEPathError, MissingMppError, NoTissueError, SlideError
from chatexaonepath.webapp.engine import WORK_DIR_PREFIX, AppConfig, _sweep_stale_work_dirs, describe_model
from chatexaonepath.webapp.session import GenerationSettings, LoadCancelled, user_message
from chatexaonepath.webapp.uploads import UploadTooLargeError
from tests.webapp.conftest import gradio_upload


def test_two_sessions_keep_their_own_slide_and_conversation(make_engine, slides):
    engine = make_engine()
    first, second = engine.session("tab-1"), engine.session("tab-2")
    assert engine.session("tab-1") is first and first is not second
    first.load(slides["tumor"])
    second.load(slides["stroma"])
    first.ask("What is the diagnosis?")
    second.ask("Which organ is this?")
    second.ask("And the grade?")
    assert [t.content for t in first.turns if t.role == "user"] == ["What is the diagnosis?"]
    assert [t.content for t in second.turns if t.role == "user"] == ["Which organ is this?", "And the grade?"]
    assert first.view.name == "tumor" and second.view.name == "stroma"
    assert not np.array_equal(first.view.outline, second.view.outline)
    second.clear()  # one session's actions never touch the other's
    assert len(first.turns) == 2 and second.turns == []


def test_the_same_slide_again_comes_from_the_cache(make_engine, slides, monkeypatch):
    engine = make_engine()
    stages = []
    engine.session("a").load(slides["tumor"], on_progress=lambda p: stages.append((p.stage, p.done, p.total)))
    names = [s for s, _, _ in stages]
    assert names[:2] == ["reading", "tissue"] and names[-1] == "drawing"
    counts = [(done, total) for stage, done, total in stages if stage in ("features", "aggregating")]
    assert counts and counts[-1][0] == counts[-1][1] > 0  # patches k/N, ending at N/N

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(engine.extractor, "extract", no_extraction)
    stages.clear()
    view = engine.session("b").load(slides["tumor"], on_progress=lambda p: stages.append(p.stage))
    assert "features" not in stages
    first_summary = engine.session("a").view.summary
    assert view.summary == first_summary and "cache" not in view.summary  # nothing tells b that a loaded it


def test_view_blends_the_heatmap_only_over_patches(make_engine, slides):
    view = make_engine().session("a").load(slides["tumor"])
    assert view.outline.shape == view.heat.shape and view.covered.shape == view.outline.shape[:2]
    assert 0 < view.covered.mean() < 1
    off, half, full = view.compose(False), view.compose(True, 0.5), view.compose(True, 1.0)
    np.testing.assert_array_equal(off, view.outline)
    np.testing.assert_array_equal(half[~view.covered], view.outline[~view.covered])
    np.testing.assert_array_equal(full[view.covered], view.heat[view.covered])
    assert not np.array_equal(half, off)
    side = view.patches[0].image.size
    assert side == (512, 512)  # level-0 pixels of a 256-px patch at 0.5 µm/px on a 0.25 µm/px scan
    scores = [p.attention for p in view.patches]
    assert scores == sorted(scores, reverse=True) and len(view.patches) == 8  # top 8 of the slide's 12


def test_uploads_live_in_the_session_folder_and_go_with_the_session(make_engine, slides, tmp_path):
    engine = make_engine()
    session = engine.session("tab")
    upload = gradio_upload(tmp_path, slides["tumor"])
    session.load_upload(upload)
    assert not os.path.exists(upload)  # moved out of Gradio's shared cache
    assert session.slide_path.is_relative_to(session.folder) and session.slide_path.exists()
    previous = session.slide_path
    session.load_upload(gradio_upload(tmp_path, slides["stroma"]))
    assert not previous.exists()  # the earlier upload is not needed once its features are cached
    engine.end_session("tab")
    assert not session.folder.exists() and engine.session_count == 0
    engine.session("other").load(slides["tumor"])
    engine.close()
    assert not engine.work_dir.exists()


@pytest.mark.parametrize("name, error", [("truncated", SlideError), ("text_as_svs", SlideError),
                                         ("blank", NoTissueError)])
def test_a_bad_slide_is_an_error_and_loses_nothing(make_engine, slides, tmp_path, name, error):
    session = make_engine().session("tab")
    session.load(slides["tumor"])
    session.ask("What is the diagnosis?")
    before = (session.view, list(session.turns))
    with pytest.raises(error):
        session.load_upload(gradio_upload(tmp_path, slides[name]))
    assert (session.view, list(session.turns)) == before and session.view.name == "tumor"
    assert list(session.folder.iterdir()) == []  # the rejected upload is deleted at once
    session.ask("Still there?")
    assert len(session.turns) == 4


def test_missing_mpp_waits_for_the_value(make_engine, slides, tmp_path):
    session = make_engine().session("tab")
    with pytest.raises(MissingMppError):
        session.load_upload(gradio_upload(tmp_path, slides["no_mpp"]))
    assert session.pending_path is not None and session.pending_path.exists()
    view = session.load_pending(0.25)
    assert view.name == "no_mpp" and session.pending_path is None and "0.25 µm/px" in view.summary


def test_size_limit_and_formats_are_checked_before_reading(make_engine, slides, tmp_path):
    session = make_engine(max_upload_gb=1e-6).session("tab")  # ~1 kB
    with pytest.raises(UploadTooLargeError, match="accepts slides up to"):
        session.load_upload(gradio_upload(tmp_path, slides["tumor"]))
    notes = tmp_path / "report.docx"
    notes.write_text("x")
    with pytest.raises(SlideError, match="not a slide format"):
        session.load_upload(notes)


def test_a_zip_holds_exactly_one_slide_and_stays_inside_its_folder(make_engine, slides, tmp_path):
    session = make_engine().session("tab")
    one = tmp_path / "one.zip"
    with zipfile.ZipFile(one, "w") as zf:
        zf.write(slides["tumor"], "case/tumor.tiff")
        zf.writestr("__MACOSX/case/._tumor.tiff", b"junk")
    assert session.load_upload(gradio_upload(tmp_path, one)).name == "tumor"
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.write(slides["tumor"], "a.tiff")
        zf.write(slides["stroma"], "b.tiff")
    with pytest.raises(SlideError, match="holds 2 slides"):
        session.load_upload(gradio_upload(tmp_path, two))
    escape = tmp_path / "escape.zip"
    with zipfile.ZipFile(escape, "w") as zf:
        zf.write(slides["tumor"], "../../outside.tiff")
    with pytest.raises(SlideError, match="outside its folder"):
        session.load_upload(gradio_upload(tmp_path, escape))
    assert not (session.folder.parent / "outside.tiff").exists()
    small = make_engine(max_upload_gb=2e-5).session("tab")  # ~21 kB: the zip fits, its contents do not
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.tiff", b"\0" * 1_000_000)
    with pytest.raises(UploadTooLargeError, match="unpacks to"):
        small.load_upload(gradio_upload(tmp_path, bomb))


def test_cancel_stops_a_load_and_keeps_the_previous_slide(make_engine, slides):
    session = make_engine().session("tab")
    session.load(slides["tumor"])

    def cancel_midway(progress):
        if progress.stage == "features":
            session.cancel()

    with pytest.raises(LoadCancelled):
        session.load(slides["stroma"], on_progress=cancel_midway)
    assert session.view.name == "tumor"
    assert session.load(slides["stroma"]).name == "stroma"  # a new load is not cancelled by the old request


def test_stop_keeps_the_partial_answer_and_retry_replaces_it(make_engine, slides):
    session = make_engine(max_new_tokens=200).session("tab")
    session.load(slides["tumor"])
    stream = session.ask_stream("Describe the slide.", GenerationSettings(0.0, 200, None))
    text, _ = next(stream)
    session.stop()
    *_, (final, reply) = stream
    assert reply.stopped and final.startswith(text.strip())
    assert session.messages()[-1]["content"].endswith("*(stopped)*")
    assert session.drop_last_exchange() == "Describe the slide."
    assert session.turns == []
    with pytest.raises(ChatEXAONEPathError, match="no answer to retry"):
        session.drop_last_exchange()
    reply = session.ask("Describe the slide.", settings=GenerationSettings(0.0, 5, ""))
    assert not reply.stopped and reply.new_tokens <= 5 and session.chat.builder.system_prompt is None


def test_closing_the_stream_early_stops_generation(make_engine, slides):
    session = make_engine().session("tab")
    session.load(slides["tumor"])
    before = set(threading.enumerate())
    stream = session.ask_stream("Describe it.", GenerationSettings(0.0, 400, None))
    next(stream)
    stream.close()  # the browser went away
    assert not [t for t in threading.enumerate() if t not in before]


def test_a_busy_model_makes_the_next_request_wait(make_engine, slides):
    engine = make_engine()
    stages, done = [], threading.Event()
    with engine.model_slot():
        worker = threading.Thread(target=lambda: (engine.session("b").load(
            slides["tumor"], on_progress=lambda p: stages.append(p.stage)), done.set()))
        worker.start()
        deadline = time.monotonic() + 30
        while "waiting" not in stages and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "waiting" in stages and not done.is_set()
    worker.join(timeout=60)
    assert done.is_set()


def test_the_example_is_generated_once_and_warmed_into_the_cache(make_engine, monkeypatch):
    engine = make_engine()
    assert not engine.example_path.exists()
    engine.warm_up_example()
    assert engine.example_ready.is_set() and engine.example_path.exists()
    monkeypatch.setattr(engine.extractor, "extract", lambda *a, **k: pytest.fail("extracted again"))
    assert engine.session("tab").load(engine.example_slide()).summary


def test_the_model_card_names_every_part_and_flags_demo_weights(make_engine, tiny_encoder):
    card = make_engine().card
    assert card.is_demo and card.banner().startswith("Demo weights — answers are not diagnostic")
    assert "random" in card.banner() and "untrained" in card.banner()
    trained = SimpleNamespace(config=SimpleNamespace(llm_name_or_path="meta-llama/Llama-2-7b-chat-hf",
                                                     tower_trained=True, lora={"r": 64, "alpha": 16}))
    real_encoder = SimpleNamespace(encoder=SimpleNamespace(
        name="exaonepath", is_random=False, weights_source="/w/EXAONEPath.ckpt", weights_sha256="ab" * 32))
    card = describe_model(trained, real_encoder, "runs/p2")
    assert card.banner() is None
    assert dict(card.rows()) == {"LLM": "meta-llama/Llama-2-7b-chat-hf",
                                 "patch encoder": "exaonepath — weights /w/EXAONEPath.ckpt (sha256 abababababab…)",
                                 "vision tower": "runs/p2 (trained)", "LoRA": "r=64, alpha=16 (from runs/p2)"}


def test_errors_become_one_sentence_for_the_page():
    assert user_message(SlideError("Could not decode x.svs."), "loading") == "Could not decode x.svs."
    out_of_memory = torch.OutOfMemoryError("CUDA out of memory.")
    assert user_message(out_of_memory, "answering").startswith("Out of memory while answering")
    assert user_message(MemoryError(), "loading the slide").startswith("Out of memory while loading the slide")
    message = user_message(KeyError("boom"), "answering")
    assert "KeyError" in message and "still running" in message


def test_settings_are_checked():
    with pytest.raises(ChatEXAONEPathError, match="max-upload-gb"):
        AppConfig(max_upload_gb=0)
    with pytest.raises(ChatEXAONEPathError, match="concurrency"):
        AppConfig(concurrency=0)
    with pytest.raises(ChatEXAONEPathError, match="Temperature"):
        GenerationSettings(temperature=3.0)


def test_work_folders_of_killed_apps_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, alive = tmp_path / f"{WORK_DIR_PREFIX}stale", tmp_path / f"{WORK_DIR_PREFIX}alive"
    for folder, pid in ((stale, dead.pid), (alive, os.getpid())):
        (folder / "sessions").mkdir(parents=True)
        (folder / "pid").write_text(str(pid))
    _sweep_stale_work_dirs()
    assert not stale.exists() and alive.exists()


def test_two_apps_starting_on_one_cache_both_write_the_example(make_engine, monkeypatch):
    """Two first starts at once (two GPUs, or the app beside a CLI job) each write the example: neither crashes."""
    from pathlib import Path

    from chatexaonepath.vision_tower.slide import open_slide

    engines, errors, barrier = [make_engine(), make_engine()], [], threading.Barrier(2)
    assert engines[0].example_path == engines[1].example_path and not engines[0].example_path.exists()
    renames, real_replace = threading.Barrier(2, timeout=30), Path.replace

    def replace_together(self, target):  # both writers have written their temp file before either renames it
        if self.name.endswith(".partial"):
            renames.wait()
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace_together)

    def start(engine):
        barrier.wait()
        try:
            engine.example_slide()
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=start, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    with open_slide(engines[0].example_path) as slide:  # complete, whoever renamed last
        assert slide.dimensions == (2048, 2048)
    assert [p.name for p in engines[0].example_path.parent.iterdir() if p.name.startswith(".")] == []
