"""Benchmark: how long from upload to the first answer in the app, and does the web UI slow answers down?

The real default app (embedded SmolLM2, EXAONEPath or a random ViT-B/16, untrained tower) is served
in-process; Debian's Chromium, driven by Playwright, uses it like a person would.
  (1) upload-to-first-answer: upload the synthetic example (cold feature cache), wait for the
      slide, ask, and stop the clock when the first words of the answer are on screen;
  (2) time-to-first-token on the same, now cached, slide: in the browser (click Send → first words
      drawn, measured with the page's own clock) and in a `ChatSession` as the CLI uses it (ask →
      first words), alternating, fresh conversation each time, greedy, same question.
Final line: `ui_ttft_ratio: UI/CLI` (target ≤ 1.2). `--screenshots DIR` also saves the page while
loading and with an answer (docs/images uses them).

    python bench/app_latency.py [--repeats 7] [--new-tokens 32] [--screenshots docs/images]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.chat.session import ChatSession
from chatexaonepath.progress import setup_logging
from chatexaonepath.webapp.cli import launch_app
from chatexaonepath.webapp.engine import AppConfig, AppEngine

QUESTION = "What is the most likely diagnosis, and which features support it?"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# Click Send and resolve with the ms until the newest answer first shows words (not the "…" placeholder).
SEND_AND_TIME_JS = """
() => new Promise(resolve => {
  const chat = document.querySelector('#chat');
  const before = chat.querySelectorAll('[data-testid="user"]').length;
  let started = null;
  const check = () => {
    if (chat.querySelectorAll('[data-testid="user"]').length <= before) return false;
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && text !== '…') { observer.disconnect(); resolve(performance.now() - started); return true; }
    return false;
  };
  const observer = new MutationObserver(check);
  observer.observe(chat, {subtree: true, childList: true, characterData: true});
  started = performance.now();
  document.querySelector('#send').click();
})
"""
DONE_JS = ("n => document.querySelectorAll('#chat [data-testid=\"user\"]').length === n "
           "&& document.querySelector('#chat-status').innerText.includes('tokens')")


def user_count(page) -> int:
    return page.locator('#chat [data-testid="user"]').count()


def clear_chat(page) -> None:
    """Start a fresh conversation in the page and wait until it shows."""
    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"user\"]').length === 0")


def ui_ask(page, question: str) -> float:
    """Seconds from clicking Send to the first words drawn; waits for the whole answer."""
    asked = user_count(page) + 1
    page.fill("#question textarea", question)
    ms = page.evaluate(SEND_AND_TIME_JS)
    page.wait_for_function(DONE_JS, arg=asked, timeout=300_000)
    return ms / 1e3


def cli_ask(session: ChatSession, slide: Path, question: str) -> float:
    """Seconds from `ask` to the first words, as `chatexaonepath chat` runs it (cached slide)."""
    session.load_slide(slide)  # a fresh conversation; features come from the cache
    first: list[float] = []

    def on_text(piece: str) -> None:  # the same "first words" as the UI: the first non-blank piece
        if piece.strip() and not first:
            first.append(time.perf_counter())

    started = time.perf_counter()
    session.ask(question, on_text=on_text)
    return first[0] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--screenshots", type=Path, default=None, help="Save app-loading.png and app.png here.")
    args = parser.parse_args()
    setup_logging()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="chatexaonepath-bench-app-"))
    engine = AppEngine.load(AppConfig(features_dir=str(work / "features"), max_new_tokens=args.new_tokens))
    slide = Path(shutil.copy(engine.example_slide(), work / "example_case.tiff"))
    demo, url = launch_app(engine, port=None, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1200})
            page.goto(url)
            page.wait_for_selector("#question textarea")

            started = time.perf_counter()
            page.set_input_files("#upload input[type=file]", str(slide))
            if args.screenshots:
                page.wait_for_selector('#status [data-stage="features"]', timeout=600_000)
                page.wait_for_timeout(1500)
                args.screenshots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.screenshots / "app-loading.png"))
            page.wait_for_selector(f'#status [data-ready="{slide.stem}"]', timeout=900_000)
            loaded = time.perf_counter() - started
            page.fill("#question textarea", QUESTION)
            first_answer = time.perf_counter() - started + page.evaluate(SEND_AND_TIME_JS) / 1e3
            page.wait_for_function(DONE_JS, arg=1, timeout=300_000)
            if args.screenshots:
                page.screenshot(path=str(args.screenshots / "app.png"), full_page=True)
                print(f"screenshots: {args.screenshots / 'app-loading.png'}, {args.screenshots / 'app.png'}")

            cli = ChatSession(engine.model, engine.extractor.config, features_dir=engine.features_dir,
                              extractor=engine.extractor, max_new_tokens=args.new_tokens)
            ui_ttft, cli_ttft = [], []
            clear_chat(page)
            ui_ask(page, "Warm-up question?"), cli_ask(cli, slide, "Warm-up question?")
            for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
                clear_chat(page)
                ui_ttft.append(ui_ask(page, QUESTION))
                cli_ttft.append(cli_ask(cli, slide, QUESTION))
            browser.close()
    finally:
        demo.close()
        engine.close()
        shutil.rmtree(work, ignore_errors=True)

    patches = len(cli.slide.features)
    ui, cli_median = statistics.median(ui_ttft), statistics.median(cli_ttft)
    print(f"\ndefault app ({engine.card.encoder.split(' —')[0]}, embedded LLM), {patches} patches, "
          f"{args.new_tokens} new tokens max, greedy; {args.repeats} alternating repeats, medians")
    print(f"{'measure':<52} {'seconds':>8}")
    print(f"{'upload → slide ready (cold cache: features extracted)':<52} {loaded:>8.2f}")
    print(f"{'upload → first words of the first answer':<52} {first_answer:>8.2f}")
    print(f"{'first token, web UI (click → words drawn)':<52} {ui:>8.3f}")
    print(f"{'first token, ChatSession as in the CLI':<52} {cli_median:>8.3f}")
    print(f"ui runs: {', '.join(f'{v:.3f}' for v in ui_ttft)}")
    print(f"cli runs: {', '.join(f'{v:.3f}' for v in cli_ttft)}")
    print(f"ui_ttft_ratio: {ui / cli_median:.3f}")


if __name__ == "__main__":
    main()
