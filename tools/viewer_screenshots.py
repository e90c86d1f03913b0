"""The slide viewer's screenshots in docs/images: the app as `make demo` serves it, driven in Debian's Chromium.

Makes viewer.png (zoomed to the cells, tissue outline), viewer-overlay.png (the pooling-weight overlay
with a patch inspected) and viewer-region.png (a drawn region asked about, its answer's evidence chips).

    python tools/viewer_screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.webapp.cli import launch_app
from chatexaonepath.webapp.engine import AppConfig, AppEngine

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
V = "window.CXPViewer.viewers[0]"


def settle(page) -> None:
    page.wait_for_function(f"""(() => {{ const vp = {V}.viewer.viewport;
        return Math.abs(vp.getZoom(true) - vp.getZoom(false)) < 1e-9; }})()""", timeout=30_000)
    page.wait_for_timeout(1500)  # the finer tiles arrive


def screen(page, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of level-0 (x, y)."""
    return tuple(page.evaluate(f"""(() => {{ const v = {V}, t = v.transform(), r = v.viewer.container.getBoundingClientRect();
        return [r.left + t.x + {x} * t.sx, r.top + t.y + {y} * t.sy]; }})()"""))


def untrained_engine(folder: Path) -> AppEngine:
    """The embedded LLM around an untrained tower and a random ViT-B/16 (the pictures show the viewer, not a model)."""
    from chatexaonepath.chat.session import load_chat_model
    from chatexaonepath.vision_tower.encoder import build_encoder
    from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor

    encoder = build_encoder("random-vit-b16")
    extract = ExtractConfig(encoder=encoder.name)
    config = AppConfig(features_dir=str(folder / "features"), max_new_tokens=48)
    return AppEngine(load_chat_model(None, "embedded"), FeatureExtractor(extract, encoder), config,
                     example_path=folder / "example.tiff", work_dir=folder / "work")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="viewer-shots-") as folder:
        engine = untrained_engine(Path(folder))
        demo, url = launch_app(engine, quiet=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_context(viewport={"width": 1500, "height": 1250}).new_page()
                page.goto(url)
                page.click("#example")
                page.wait_for_selector("#status [data-ready]", timeout=600_000)
                page.wait_for_function(f"window.CXPViewer && {V}.overlay", timeout=60_000)
                page.evaluate(f"{V}.root.scrollIntoView()")
                settle(page)
                shoot(page, args.out)
                browser.close()
        finally:
            demo.close()
            engine.close()


def shoot(page, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    overlay = page.evaluate(f"(() => {{ const o = {V}.overlay; return {{side: o.side, top: o.top, "
                            "x: Array.from(o.x), y: Array.from(o.y)}; })()")
    best, side = overlay["top"][0], overlay["side"]
    bx, by = overlay["x"][best], overlay["y"][best]
    page.mouse.click(*screen(page, bx + side / 2, by + side / 2))  # inspect the most-weighted patch
    page.wait_for_function("document.querySelector('#viewer .cxp-inspect img')?.naturalWidth > 0")
    page.locator("#viewer").screenshot(path=str(out / "viewer-overlay.png"))
    page.uncheck("#viewer .cxp-heat")
    page.evaluate(f"(() => {{ {V}.selected = null; {V}.draw(); }})()")
    page.evaluate(f"""{V}.viewer.viewport.zoomTo({V}.viewer.viewport.getMaxZoom() / 4,
        {V}.image().imageToViewportCoordinates({bx}, {by}), false)""")
    page.evaluate(f"{V}.viewer.viewport.panTo({V}.image().imageToViewportCoordinates({bx}, {by}), false)")
    settle(page)
    page.locator("#viewer").screenshot(path=str(out / "viewer.png"))
    page.evaluate(f"{V}.viewer.viewport.goHome(true)")
    page.check("#viewer .cxp-heat")
    settle(page)
    page.click("#viewer .cxp-draw")
    (x0, y0), (x1, y1) = screen(page, bx - side, by - side), screen(page, bx + 2 * side, by + 2 * side)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    page.wait_for_function("document.querySelector('#region textarea, #region input').value.length > 0")
    page.fill("#question textarea", "What do you see in this region?")
    page.click("#send")
    page.wait_for_function("document.querySelector('#chat-status').innerText.includes('tokens')", timeout=300_000)
    page.locator('#chat [data-testid="bot"] .cxp-evidence a').first.click()
    time.sleep(2)
    page.evaluate("""[...document.querySelectorAll('#chat *')].filter(e => e.scrollHeight > e.clientHeight + 4)
        .forEach(e => { e.scrollTop = 0; })""")  # the question, with its region, at the top of the chat
    top = page.evaluate("Math.min(...['#status', '#chat'].map(s => document.querySelector(s)"
                        ".getBoundingClientRect().top)) + window.scrollY")
    page.screenshot(path=str(out / "viewer-region.png"), full_page=True,
                    clip={"x": 0, "y": top - 10, "width": 1500, "height": 1000})
    print(f"screenshots in {out}: viewer.png, viewer-overlay.png, viewer-region.png")


if __name__ == "__main__":
    main()
