"""A case in the page (issue 31), in real Chromium: "Add a slide to this case" switches the upload box to adding, the
strip lists the case's slides with their status, a click switches the viewer, a drawn region belongs to its slide,
a chip of another slide shows that slide first, and the example case button appears only with a demo model.
One app (tiny engine) and one browser serve the whole module.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.webapp.engine import AppConfig, AppEngine
from chatexaonepath.webapp.viewer import library_installed
from tests.webapp.conftest import CHROMIUM, served
from tests.webapp.test_browser import ask, upload, wait_ready

pytestmark = [pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed"),
              pytest.mark.skipif(not library_installed(), reason="OpenSeadragon is not installed (make setup)")]

V = "window.CXPViewer.viewers[0]"


@dataclass
class FakeDemo:
    """What the page reads of a demo build: its cohort folder (labels.csv, slides/) and its card's organs."""

    folder: Path
    card: dict = field(default_factory=lambda: {"organs": ["colon"]})

    @staticmethod
    def questions() -> list[str]:
        return ["Which slide shows the lesion?"]

    def describe(self) -> str:
        return "a fake demo"


@pytest.fixture(scope="module")
def app(tiny_chat_model, tiny_encoder, tmp_path_factory, slides):
    """The app with a fake demo whose cohort holds two held-out colon slides (the session's tumor and stroma)."""
    root = tmp_path_factory.mktemp("page-case")
    cohort = root / "demo" / "cohort"
    (cohort / "slides").mkdir(parents=True)
    (cohort / "labels.csv").write_text("slide_id,organ,split\ncolon-b,colon,test\ncolon-a,colon,test\n"
                                       "colon-c,colon,train\n")
    shutil.copy(slides["tumor"], cohort / "slides" / "colon-a.tiff")
    shutil.copy(slides["stroma"], cohort / "slides" / "colon-b.tiff")
    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=4)
    engine = AppEngine(tiny_chat_model, FeatureExtractor(extract, tiny_encoder),
                       AppConfig(features_dir=str(root / "features"), example_size=2048, max_new_tokens=8,
                                 max_sessions_per_client=16),
                       example_path=root / "example.tiff", work_dir=root / "work")
    engine.demo = FakeDemo(root / "demo")  # only the page reads it: the card and the model stay the tiny ones
    with served(engine) as url:
        yield url, engine


def open_page(browser, url):
    page = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
    page.goto(url)
    for selector in ("#example", "#status", "#chat", "#case-strip", "#viewer .cxp-stage"):
        page.wait_for_selector(selector, state="attached")
    return page


def shown_name(page) -> str:
    return page.evaluate(f"{V}.config && {V}.root.dataset.open === '1' ? {V}.config.name : ''")


def test_a_case_is_built_switched_and_asked_about_slide_by_slide(app, browser, slides):
    url, _ = app
    page = open_page(browser, url)
    assert page.locator("#example-case").is_visible() and not page.locator("#add-slide").is_visible()
    upload(page, slides["tumor"])
    wait_ready(page, "tumor")
    page.wait_for_selector("#add-slide", state="visible")
    assert page.locator("#case-strip .cxp-case-slide").count() == 0  # a lone slide: nothing to switch between
    page.click("#add-slide")
    page.wait_for_function("document.querySelector('#upload').innerText.includes('Add a slide to this case')")
    assert "Add the synthetic example slide" in page.inner_text("#example")
    upload(page, slides["stroma"])
    wait_ready(page, "stroma")
    page.wait_for_function(f"{V}.config && {V}.config.name === 'stroma.tiff' && {V}.root.dataset.open === '1'")
    strip = page.locator("#case-strip .cxp-case-slide")
    assert strip.count() == 2
    page.wait_for_function("document.querySelector('#region').innerText.includes('the whole case')")
    assert [strip.nth(i).get_attribute("data-status") for i in range(2)] == ["ready", "ready"]
    assert strip.nth(1).get_attribute("aria-pressed") == "true" and "stroma.tiff" in strip.nth(1).inner_text()
    page.wait_for_function("document.querySelector('#upload').innerText.includes('Slide file')")  # back to replacing
    # A click on slide 1 switches the viewer; a region drawn there is slide 1's.
    strip.nth(0).click()
    page.wait_for_function(f"{V}.config.name === 'tumor.tiff' && {V}.root.dataset.open === '1' && {V}.overlay")
    page.wait_for_function("document.querySelector('#viewer .cxp-legend-name').textContent.includes('slide 1')")
    page.evaluate(f"{V}.choose([0, 0, 1024, 1024])")
    page.wait_for_function("document.querySelector('#region textarea, #region input').value === '1:0,0,1024,1024'")
    assert "on slide 1" in page.inner_text("#region")
    ask(page, "What is here?")
    question = page.locator('#chat [data-testid="user"]').last
    assert "Slide 1, region" in question.inner_text()
    chip = page.locator('#chat [data-testid="bot"]').last.locator(".cxp-evidence a").first
    href = chip.get_attribute("href")
    assert href.endswith("@1")
    # Slide 2 on show: the chip of slide 1 shows slide 1 first, then flies to its patch.
    page.locator("#case-strip .cxp-case-slide").nth(1).click()
    page.wait_for_function(f"{V}.config.name === 'stroma.tiff' && {V}.root.dataset.open === '1'")
    chip.click()
    target = href.split("=", 1)[1].split("@")[0]
    page.wait_for_function(f"{V}.config.name === 'tumor.tiff' && {V}.root.dataset.highlight === '{target}'",
                           timeout=30_000)
    assert page.locator("#case-strip .cxp-case-slide").nth(0).get_attribute("aria-pressed") == "true"
    page.context.close()


def test_the_example_case_loads_the_demos_held_out_slides(app, browser):
    url, _ = app
    page = open_page(browser, url)
    page.click("#example-case")
    wait_ready(page, "colon-b")  # by id: colon-a, then colon-b, the last on show
    strip = page.locator("#case-strip .cxp-case-slide")
    page.wait_for_function("document.querySelectorAll('#case-strip .cxp-case-slide[data-status=ready]').length === 2")
    assert [strip.nth(i).inner_text().split("\n")[0] for i in range(2)] == ["1 colon-a.tiff", "2 colon-b.tiff"]
    assert "This case has 2 slides" in page.inner_text("#status")
    page.context.close()


def test_without_a_demo_there_is_no_example_case(make_engine, browser):
    engine = make_engine()
    with served(engine) as url:
        page = open_page(browser, url)
        assert page.locator("#example-case").count() == 0 or not page.locator("#example-case").is_visible()
        page.context.close()
