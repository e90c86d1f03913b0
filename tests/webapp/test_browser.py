"""The app in a real browser: Playwright driving Debian's Chromium against the page served in-process.

The engine is tiny (2-layer LLaMA and ViT) so a whole scenario takes seconds; each generation
step is slowed a little so that streaming is observable as several partial answers.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.webapp.engine import AppConfig, AppEngine
from tests.webapp.conftest import CHROMIUM, served

UPLOAD_LIMIT_GB = 0.02  # ~21 MB: the test slides fit, the oversized file does not

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")

# Watches the status box and the chat; records every loading stage and every partial answer.
WATCH_JS = """
() => {
  window.__stages = []; window.__answers = [];
  const status = document.querySelector('#status'), chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const stage = status.querySelector('[data-stage]');
    if (stage && window.__stages.at(-1) !== stage.dataset.stage) window.__stages.push(stage.dataset.stage);
  }).observe(status, {subtree: true, childList: true, characterData: true, attributes: true});
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && window.__answers.at(-1) !== text) window.__answers.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}
"""


@pytest.fixture(scope="module")
def app_url(tiny_chat_model, tiny_encoder, tmp_path_factory):
    """The app on 127.0.0.1 with a free port and a tiny engine; yields (url, engine)."""
    root = tmp_path_factory.mktemp("webapp-browser")
    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=2)
    engine = AppEngine(tiny_chat_model, FeatureExtractor(extract, tiny_encoder),
                       AppConfig(features_dir=str(root / "features"), example_size=2048, max_new_tokens=16,
                                 max_upload_gb=UPLOAD_LIMIT_GB, max_sessions_per_client=16),  # all on loopback
                       example_path=root / "example.tiff", work_dir=root / "work")
    llm = tiny_chat_model.llm
    plain_forward = llm.forward

    def slowed_forward(*args, **kwargs):
        time.sleep(0.03)
        return plain_forward(*args, **kwargs)

    llm.forward = slowed_forward
    try:
        with served(engine) as url:
            yield url, engine
    finally:
        del llm.forward



def open_app(browser, url):
    page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
    page.goto(url)
    for selector in ("#example", "#status", "#chat", "#question textarea"):
        page.wait_for_selector(selector, state="attached")
    page.evaluate(WATCH_JS)
    return page


def upload(page, path: Path) -> None:
    page.set_input_files("#upload input[type=file]", str(path))


def wait_ready(page, name: str) -> None:
    page.wait_for_selector(f'#status [data-ready="{name}"]', timeout=60_000)


def ask(page, question: str) -> str:
    """Send a question, wait for the answer to finish, return its text."""
    page.evaluate("window.__answers = []")
    asked = len(user_messages(page)) + 1
    page.fill("#question textarea", question)
    page.click("#send")
    # The status line is cleared in the same update that shows the new question, so once the
    # question is on the page, "tokens" in the status belongs to this answer.
    page.wait_for_function("n => document.querySelectorAll('#chat [data-testid=\"user\"]').length === n "
                           "&& document.querySelector('#chat-status').innerText.includes('tokens')",
                           arg=asked, timeout=60_000)
    return page.locator('#chat [data-testid="bot"]').last.inner_text().strip()


def user_messages(page) -> list[str]:
    return [m.strip() for m in page.locator('#chat [data-testid="user"]').all_inner_texts()]


def test_upload_shows_progress_then_the_heatmap_and_answers_stream(app_url, browser, slides, tmp_path):
    url, _ = app_url
    page = open_app(browser, url)
    assert "Demo weights — answers are not diagnostic" in page.inner_text("#banner")
    upload(page, slides["tumor"])
    wait_ready(page, "tumor")
    stages = page.evaluate("window.__stages")
    assert "reading" in stages and ("features" in stages or "aggregating" in stages), stages
    assert "patches" in page.inner_text("#status")
    page.click("#patches-tab-button")
    page.wait_for_function("document.querySelectorAll('#patches img').length === 8")
    page.click("#thumbnail-tab-button")
    view = page.wait_for_selector("#slide-view img")
    with_heatmap = view.get_attribute("src")
    assert with_heatmap
    page.click("#viewer .cxp-heat")  # the viewer's toolbar is the page's one overlay control
    # Unchecked: the thumbnail with only the tissue outline, a different image.
    page.wait_for_function("src => document.querySelector('#slide-view img').getAttribute('src') !== src",
                           arg=with_heatmap)
    page.click("#chat-tab-button")
    answer = ask(page, "What is the diagnosis?")
    partials = page.evaluate("window.__answers")
    assert answer and len([p for p in partials if p != "…"]) >= 2, partials  # pieces arrived one by one
    assert user_messages(page) == ["What is the diagnosis?"]
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_a_corrupt_file_is_reported_and_the_page_keeps_working(app_url, browser, slides, tmp_path):
    url, _ = app_url
    page = open_app(browser, url)
    upload(page, slides["text_as_svs"])
    error = page.wait_for_selector("#status [data-error]", timeout=60_000)
    assert "notes.svs" in error.inner_text()
    big = tmp_path / "huge.svs"
    big.write_bytes(os.urandom(int(UPLOAD_LIMIT_GB * 1024**3) + 1_000_000))
    upload(page, big)
    page.wait_for_selector("text=exceed the maximum allowed size", timeout=30_000)
    page.click("#example")
    wait_ready(page, "example")
    assert ask(page, "Which organ is this from?")
    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"user\"]').length === 0")


def test_a_slide_without_mpp_asks_for_it(app_url, browser, slides):
    url, _ = app_url
    page = open_app(browser, url)
    upload(page, slides["no_mpp"])
    error = page.wait_for_selector("#status [data-error]", timeout=60_000)
    assert "µm per pixel" in error.inner_text() or "resolution" in error.inner_text()
    page.fill("#mpp input", "0.25")
    page.click("#mpp-load")
    wait_ready(page, "no_mpp")
    assert "0.25 µm/px" in page.inner_text("#status")


def test_two_browsers_never_see_each_others_slide_or_chat(app_url, browser, slides, tmp_path):
    url, engine = app_url
    first, second = open_app(browser, url), open_app(browser, url)
    stroma = shutil.copy(slides["stroma"], tmp_path / "second_case.tiff")
    upload(first, slides["tumor"])
    upload(second, stroma)
    wait_ready(first, "tumor")
    wait_ready(second, "second_case")
    ask(first, "Is there necrosis in the first case?")
    ask(second, "What is the grade of the second case?")
    ask(first, "And the margins?")
    assert user_messages(first) == ["Is there necrosis in the first case?", "And the margins?"]
    assert user_messages(second) == ["What is the grade of the second case?"]
    assert "second_case" not in first.inner_text("#status") and "tumor" not in second.inner_text("#status")
    sessions = engine.session_count
    first.context.close()  # closing the tab ends its session and deletes its uploads
    deadline = time.monotonic() + 30
    while engine.session_count >= sessions and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.session_count == sessions - 1
    assert ask(second, "Still here?")
