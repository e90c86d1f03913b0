"""docs/images/app-case.png: a case of three slides in the page, taken in Debian's Chromium at 1366×768.

Three synthetic slides (tumour, stroma, normal) are uploaded into one case with "Add a slide to this case", the
second put on show from the strip, a region drawn on it and asked about, then a question about the whole case.
The model is the embedded LLM around an untrained tower and a random ViT-B/16: the picture shows the page, not a
model.

    python tools/case_screenshot.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.webapp.cli import launch_app

sys.path.insert(0, str(Path(__file__).resolve().parent))
from viewer_screenshots import CHROMIUM_ARGS, V, ask, settle, untrained_engine  # noqa: E402

SLIDES = (("tumour", "tumor", 11), ("stroma", "stroma", 12), ("normal", "normal", 13))


def make_slides(folder: Path) -> list[Path]:
    from chatexaonepath.synthetic.slides import make_synthetic_slide

    return [make_synthetic_slide(folder / f"case-{name}.tiff", kind, (4096, 4096), mpp=0.25, seed=seed)
            for name, kind, seed in SLIDES]


def build_case(page, paths: list[Path]) -> None:
    for i, path in enumerate(paths):
        if i:
            page.click("#add-slide")
            page.wait_for_function("document.querySelector('#upload').innerText.includes('Add a slide')")
        page.set_input_files("#upload input[type=file]", str(path))
        page.wait_for_selector(f'#status [data-ready="{path.stem}"]', timeout=900_000)
        page.wait_for_function(f"window.CXPViewer && {V}.config && {V}.config.name === '{path.name}' && {V}.overlay",
                               timeout=60_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="case-shot-") as folder:
        engine = untrained_engine(Path(folder))
        paths = make_slides(Path(folder))
        demo, url = launch_app(engine, quiet=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
                page.goto(url)
                page.wait_for_selector("#example")
                build_case(page, paths)
                page.locator("#case-strip .cxp-case-slide").nth(1).click()
                page.wait_for_function(f"{V}.config.name === '{paths[1].name}' && {V}.overlay", timeout=60_000)
                settle(page)
                page.evaluate(f"{V}.choose([1024, 1024, 1536, 1536])")
                page.wait_for_function("document.querySelector('#region textarea, #region input').value.startsWith('2:')")
                ask(page, "What is in this region?", 1)
                page.click("#whole-slide")
                ask(page, "Which slide shows the tumour?", 2)
                settle(page)
                page.screenshot(path=str(args.out / "app-case.png"))
                browser.close()
        finally:
            demo.close()
            engine.close()
    print(f"screenshot: {args.out / 'app-case.png'}")


if __name__ == "__main__":
    main()
