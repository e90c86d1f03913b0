"""The review page in Chromium (Debian's, driven by Playwright): two pathologists grade a judged run blind
to the judge, and the run's report then shows judge–human κ per criterion."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatexaonepath.eval.review import ReviewSession, serve_review
from chatexaonepath.eval.run import judge_answers_file
from chatexaonepath.loopback import FakeOpenAIServer

from .judges import IDS, keyword_judge, write_answers

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
HOSTILE = "Carcinoma.<img src=x onerror=\"document.title='owned'\"><script>document.title='owned'</script>"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def grade_everything(browser, url: str, decide, credentials: dict | None = None) -> list[str]:
    """Grade every answer through the page: `decide(answer text) → (criteria that fail, accepted)`."""
    context = browser.new_context(http_credentials=credentials)
    page = context.new_page()
    page.goto(url)
    graded = []
    while True:
        page.wait_for_function("document.querySelector('#progress').textContent !== ''")
        if page.locator("#done").is_visible():
            break
        answer = page.locator("#answer").inner_text()
        assert page.locator("#report").inner_text().startswith("FINAL DIAGNOSIS")
        body = page.content()
        assert not any(f"{c} checked" in body for c in IDS)  # the judge's reasons never reach the page
        failing, accepted = decide(answer)
        assert page.locator("#submit").is_disabled()  # not before every criterion and the overall call are set
        for criterion in IDS:
            page.check(f"#crit-{criterion}-{'fail' if criterion in failing else 'pass'}")
        page.check("#accept" if accepted else "#reject")
        page.fill("#comment", f"graded {answer[:10]}")
        before = page.locator("#progress").inner_text()
        page.click("#submit")
        page.wait_for_function("(before) => document.querySelector('#progress').textContent !== before", arg=before)
        graded.append(answer)
    assert page.title() != "owned"  # the hostile answer was shown as text, not run
    context.close()
    return graded


def test_two_pathologists_grade_in_chromium_and_the_report_shows_kappa(browser, tmp_path):
    answers = ["Invasive ductal carcinoma.", "Benign fibroadenoma.", "Ductal carcinoma, grade 2.",
               "Normal breast tissue.", HOSTILE, "Fibrocystic change."]
    write_answers(tmp_path / "answers.jsonl", answers)
    with FakeOpenAIServer(reply=keyword_judge) as server, ThreadPoolExecutor(1) as pool:
        # Playwright's sync API holds an event loop in this thread; the judge runs its own in another.
        pool.submit(judge_answers_file, tmp_path / "answers.jsonl", tmp_path / "run",
                    f"openai:test-model@{server.url}").result()
    run = tmp_path / "run"

    def agrees(answer):  # like the judge: carcinoma passes, anything else fails diagnosis and is rejected
        good = "carcinoma" in answer.lower()
        return ([] if good else ["diagnosis"]), good

    def lenient(answer):  # also accepts the fibroadenoma
        failing, good = agrees(answer)
        return ([] if "fibroadenoma" in answer else failing), good or "fibroadenoma" in answer

    with serve_review(ReviewSession(run, "dr_a")) as url:
        graded = grade_everything(browser, url, agrees)
    assert sorted(graded) == sorted(answers)
    with serve_review(ReviewSession(run, "dr_b"), auth=[("dr_b", "pw")]) as url:
        assert len(grade_everything(browser, url, lenient, {"username": "dr_b", "password": "pw"})) == 6
    records = [json.loads(line) for line in (run / "human.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {r["reviewer"] for r in records} == {"dr_a", "dr_b"}
    agreement = json.loads((run / "summary.json").read_text())["human_agreement"]
    assert agreement["by_reviewer"]["dr_a"]["acceptance"]["kappa"] == 1.0
    assert agreement["by_reviewer"]["dr_b"]["criteria"]["diagnosis"]["kappa"] == pytest.approx(2 / 3)
    report = (run / "report.md").read_text()
    assert "## Judge–human agreement" in report and "| dr_a | 1.00 | 1.00 |" in report
    assert all(f"κ `{c}`" in report for c in IDS)
