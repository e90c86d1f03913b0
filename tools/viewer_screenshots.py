"""The page's screenshots in docs/images, taken in Debian's Chromium at a laptop's 1366×768 and at 2560×1440.

Makes page-1366.png (1366×768: the example slide loaded and asked about, the chat beside the viewer),
page-2560.png (the same at 2560×1440), page-loading.png (a load in progress), viewer.png (zoomed to the cells, turned 90°, a
measured line and the scale bar), viewer-overlay.png (the attention by weight with a patch in the panel),
viewer-region.png (a drawn region asked about, the answer's evidence chips) and viewer-export.png (what Save
view writes). The model is the embedded LLM around an untrained tower and a random ViT-B/16: the pictures
show the page, not a model.

    python tools/viewer_screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.webapp.cli import launch_app
from chatexaonepath.webapp.engine import AppConfig, AppEngine

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
V = "window.CXPViewer.viewers[0]"
SIZES = {"page-1366.png": (1366, 768), "page-2560.png": (2560, 1440)}  # (bench/app_latency.py writes app*.png)


def settle(page, wait_ms: int = 1500) -> None:
    page.wait_for_function(f"""(() => {{ const vp = {V}.viewer.viewport;
        return Math.abs(vp.getZoom(true) - vp.getZoom(false)) < 1e-9
            && Math.abs(vp.getRotation(true) - vp.getRotation(false)) < 1e-9; }})()""", timeout=30_000)
    page.wait_for_timeout(wait_ms)  # the finer tiles arrive


def screen(page, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of level-0 (x, y), where OpenSeadragon draws it (rotation included)."""
    return tuple(page.evaluate(f"""(() => {{ const v = {V}, r = v.viewer.container.getBoundingClientRect();
        const p = v.image().imageToViewerElementCoordinates(new OpenSeadragon.Point({x}, {y}));
        return [r.left + p.x, r.top + p.y]; }})()"""))


def untrained_engine(folder: Path) -> AppEngine:
    """The embedded LLM around an untrained tower and a random ViT-B/16 (the pictures show the page, not a model)."""
    from chatexaonepath.chat.session import load_chat_model
    from chatexaonepath.vision_tower.encoder import build_encoder
    from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor

    encoder = build_encoder("random-vit-b16")
    extract = ExtractConfig(encoder=encoder.name)
    config = AppConfig(features_dir=str(folder / "features"), max_new_tokens=40, max_sessions_per_client=8)
    return AppEngine(load_chat_model(None, "embedded"), FeatureExtractor(extract, encoder), config,
                     example_path=folder / "example.tiff", work_dir=folder / "work")


def open_page(browser, url: str, size: tuple[int, int]):
    page = browser.new_context(viewport={"width": size[0], "height": size[1]}).new_page()
    page.goto(url)
    page.wait_for_selector("#example")
    page.wait_for_timeout(1500)
    return page


def load_example(page) -> None:
    page.click("#example")
    page.wait_for_selector("#status [data-ready]", timeout=900_000)
    page.wait_for_function(f"window.CXPViewer && {V}.overlay", timeout=60_000)
    settle(page)


def ask(page, question: str, answers: int) -> None:
    page.fill("#question textarea", question)
    page.click("#send")
    page.wait_for_function("n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === n && "
                           "document.querySelector('#chat-status').innerText.includes('tokens')", arg=answers,
                           timeout=300_000)
    page.wait_for_timeout(500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="viewer-shots-") as folder:
        engine = untrained_engine(Path(folder))
        demo, url = launch_app(engine, quiet=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                loading(browser, url, args.out)
                for name, size in SIZES.items():
                    page = open_page(browser, url, size)
                    load_example(page)
                    ask(page, "What is the diagnosis?", 1)
                    page.screenshot(path=str(args.out / name))
                    if name == "page-1366.png":
                        viewer_shots(page, args.out)
                    page.context.close()
                browser.close()
        finally:
            demo.close()
            engine.close()
    print(f"screenshots in {args.out}: {', '.join(sorted(p.name for p in args.out.glob('*.png')))}")


def loading(browser, url: str, out: Path) -> None:
    """A load in progress (the first load of the example extracts its features, so the stages show)."""
    page = open_page(browser, url, SIZES["page-1366.png"])
    page.click("#example")
    page.wait_for_selector('#status [data-stage="features"]', timeout=600_000)
    page.wait_for_timeout(2500)
    page.screenshot(path=str(out / "page-loading.png"))
    page.wait_for_selector("#status [data-ready]", timeout=900_000)
    page.context.close()


def viewer_shots(page, out: Path) -> None:
    overlay = page.evaluate(f"(() => {{ const o = {V}.overlay; return {{side: o.side, top: o.top, "
                            "x: Array.from(o.x), y: Array.from(o.y)}; })()")
    best, side = overlay["top"][0], overlay["side"]
    bx, by = overlay["x"][best], overlay["y"][best]
    page.evaluate(f"(() => {{ const v = {V}; v.opacity = 0.5; v.root.querySelector('.cxp-opacity').value = 0.5; "
                  "v.draw(); })()")
    page.mouse.click(*screen(page, bx + side / 2, by + side / 2))  # the most-weighted patch, in the panel
    page.wait_for_function("document.querySelector('#viewer .cxp-inspect img')?.naturalWidth > 0")
    page.locator("#viewer").screenshot(path=str(out / "viewer-overlay.png"))
    # Cells: zoomed in near that patch, turned 90°, a line measured across it.
    page.click("#viewer .cxp-inspect-close")
    page.uncheck("#viewer .cxp-heat")
    page.evaluate(f"""(() => {{ const vp = {V}.viewer.viewport, p = {V}.image().imageToViewportCoordinates({bx}, {by});
        vp.zoomTo(vp.getMaxZoom() / 3, p, true); vp.panTo(p, true); }})()""")
    settle(page, 300)
    page.click("#viewer .cxp-rotate-right")
    settle(page)
    page.click("#viewer .cxp-measure")
    (x0, y0), (x1, y1) = screen(page, bx - side * 0.3, by + side * 0.2), screen(page, bx + side * 0.6, by + side * 0.7)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    page.wait_for_timeout(300)
    page.locator("#viewer").screenshot(path=str(out / "viewer.png"))
    page.keyboard.press("Escape")
    page.check("#viewer .cxp-heat")
    page.click("#viewer .cxp-home")  # upright, the whole slide
    settle(page)
    # A region drawn around the most-weighted patch and asked about; the answer's chips.
    page.click("#viewer .cxp-draw")
    (x0, y0), (x1, y1) = screen(page, bx - side, by - side), screen(page, bx + 2 * side, by + 2 * side)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    page.wait_for_function("document.querySelector('#region textarea, #region input').value.length > 0")
    ask(page, "What do you see in this region?", 2)
    page.locator('#chat [data-testid="bot"] .cxp-evidence a').last.click()
    page.wait_for_timeout(2000)
    page.screenshot(path=str(out / "viewer-region.png"))
    with page.expect_download() as download:
        page.click("#export-view")
    shutil.copy(download.value.path(), out / "viewer-export.png")


if __name__ == "__main__":
    main()
