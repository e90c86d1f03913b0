"""The page a pathologist expects (issue 30), in real Chromium at a laptop's 1366×768 and a 2560×1440 screen.

The slide first (no scroll on load, the viewer at least 55 % of the window once a slide is ready), a scale bar
whose µm match the slide's µm/px, overlays that turn with the slide, an exported view that holds the overlay
and the scale bar, state that stays true, full-page mode with its toolbar. One app (tiny engine, a 4096²
synthetic example of 40 patches at 0.25 µm/px) and one browser serve the whole module.
"""

from __future__ import annotations

import io
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.webapp.engine import AppConfig, AppEngine
from chatexaonepath.webapp.viewer import library_installed
from tests.webapp.conftest import CHROMIUM, served
from tests.webapp.test_browser import ask, upload, wait_ready

pytestmark = [pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed"),
              pytest.mark.skipif(not library_installed(), reason="OpenSeadragon is not installed (make setup)")]

V = "window.CXPViewer.viewers[0]"
MPP = 0.25  # the example slide's µm per pixel, as written into the file (not read back from the page)
SIZES = [(1366, 768), (2560, 1440)]


@pytest.fixture(scope="module")
def app(tiny_chat_model, tiny_encoder, tmp_path_factory):
    """The app on 127.0.0.1 with a tiny engine, each generation step slowed so an answer runs long enough to see
    Stop enabled; yields (url, engine)."""
    root = tmp_path_factory.mktemp("page-layout")
    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=4)
    engine = AppEngine(tiny_chat_model, FeatureExtractor(extract, tiny_encoder),
                       AppConfig(features_dir=str(root / "features"), example_size=4096, max_new_tokens=12,
                                 max_sessions_per_client=16),  # every page comes from loopback
                       example_path=root / "example.tiff", work_dir=root / "work")
    llm = tiny_chat_model.llm
    plain_forward = llm.forward

    def slowed_forward(*args, **kwargs):
        time.sleep(0.04)
        return plain_forward(*args, **kwargs)

    llm.forward = slowed_forward
    try:
        with served(engine) as url:
            yield url, engine
    finally:
        del llm.forward


def open_page(browser, url, size=SIZES[0]):
    page = browser.new_context(viewport={"width": size[0], "height": size[1]}).new_page()
    page.goto(url)
    for selector in ("#example", "#status", "#chat", "#question textarea", "#viewer .cxp-stage"):
        page.wait_for_selector(selector, state="attached")
    return page


def load_example(page) -> None:
    page.click("#example")
    wait_ready(page, "example")
    page.wait_for_function(f"window.CXPViewer && {V}.overlay && {V}.root.dataset.open === '1'", timeout=30_000)
    settle(page)


def settle(page) -> None:
    """Wait for the viewer to reach its target view (zoom, centre, rotation), then for the overlay's redraw."""
    page.wait_for_function(f"""(() => {{ const vp = {V}.viewer.viewport;
        const a = vp.getCenter(true), b = vp.getCenter(false);
        return Math.abs(vp.getZoom(true) - vp.getZoom(false)) < 1e-9 && Math.abs(a.x - b.x) < 1e-9
            && Math.abs(a.y - b.y) < 1e-9 && Math.abs(vp.getRotation(true) - vp.getRotation(false)) < 1e-9; }})()""",
                           timeout=15_000)
    page.wait_for_timeout(300)


def visible_fraction(page, selector: str) -> float:
    """The share of the window that `selector`'s box covers on screen."""
    return page.evaluate("""s => { const r = document.querySelector(s).getBoundingClientRect();
        const w = Math.max(0, Math.min(r.right, innerWidth) - Math.max(r.left, 0));
        const h = Math.max(0, Math.min(r.bottom, innerHeight) - Math.max(r.top, 0));
        return w * h / (innerWidth * innerHeight); }""", selector)


def on_screen(page, selector: str) -> bool:
    return page.evaluate("""s => { const r = document.querySelector(s).getBoundingClientRect();
        return r.width > 0 && r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth; }""", selector)


def image_zoom(page) -> float:
    """Screen pixels per level-0 pixel, from OpenSeadragon's own zoom (not from the page's overlay maths)."""
    return page.evaluate(f"{V}.image().viewportToImageZoom({V}.viewer.viewport.getZoom(true))")


def osd_screen(page, x: float, y: float) -> tuple[float, float]:
    """Where level-0 (x, y) is drawn in the viewer element, by OpenSeadragon (rotation included)."""
    return tuple(page.evaluate(f"""(() => {{ const p = {V}.image().imageToViewerElementCoordinates(
        new OpenSeadragon.Point({x}, {y})); return [p.x, p.y]; }})()"""))


def canvas_pixels(page, which: str) -> np.ndarray:
    """The RGBA pixels of the tiles' canvas ("tiles") or the overlay's ("overlay"), as (H, W, 4) uint8."""
    source = f"{V}.viewer.drawer.canvas" if which == "tiles" else f"{V}.canvas"
    data = page.evaluate(f"""(() => {{ const c = {source};
        return [c.width, c.height, c.toDataURL('image/png')]; }})()""")
    import base64

    png = base64.b64decode(data[2].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


# -- the slide first ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_page_opens_at_its_top_and_the_slide_takes_the_window(app, browser, size):
    """Nothing takes focus on load (the question box's autofocus scrolled the page past the warning); once a slide is
    ready the question box has the focus, nothing scrolled, and the viewer covers at least 55 % of the window
    (before: 0 % visible at 1366×768, 12 % at 2560×1440)."""
    url, _ = app
    page = open_page(browser, url, size)
    page.wait_for_timeout(1500)  # Gradio mounts the page and runs its load events
    assert page.evaluate("window.scrollY") == 0
    assert page.evaluate("document.activeElement === document.body || document.activeElement === null")
    assert on_screen(page, ".cxp-title") and on_screen(page, "#banner")
    assert "Demo weights — answers are not diagnostic" in page.inner_text("#banner")
    assert page.evaluate("document.querySelector('#model-card').open")  # the card, on this browser's first visit
    assert page.is_disabled("#cancel") and page.is_disabled("#stop")  # nothing runs yet
    load_example(page)
    assert page.evaluate("window.scrollY") == 0
    assert on_screen(page, ".cxp-title") and on_screen(page, "#banner")
    fraction = visible_fraction(page, "#viewer .cxp-stage")
    assert fraction >= 0.55, fraction
    assert page.evaluate("document.activeElement === document.querySelector('#question textarea')")
    assert not page.evaluate("document.querySelector('#model-card').open")  # folded: the slide needs the room
    assert on_screen(page, "#viewer .cxp-toolbar") and on_screen(page, "#question textarea")
    page.reload()  # a later visit: the card stays folded
    page.wait_for_selector("#model-card", state="attached")
    page.wait_for_timeout(500)
    assert not page.evaluate("document.querySelector('#model-card').open")
    page.context.close()


# -- scale ---------------------------------------------------------------------------------------------------
def test_the_scale_bar_shows_the_slides_microns_at_three_zoom_levels(app, browser):
    url, _ = app
    page = open_page(browser, url)
    load_example(page)
    seen = set()
    for factor in (1, 6, 30):
        page.evaluate(f"(() => {{ const vp = {V}.viewer.viewport; vp.zoomTo(vp.getHomeZoom() * {factor}, null, true); }})()")
        settle(page)
        bar = page.evaluate("""(() => { const b = document.querySelector('#viewer .cxp-scalebar');
            return [b.getBoundingClientRect().width, Number(b.dataset.microns), b.innerText]; })()""")
        width_px, microns, label = bar
        shown = width_px / image_zoom(page) * MPP  # the bar's length on the slide, in µm
        assert microns > 0 and abs(shown - microns) / microns <= 0.02, (factor, width_px, microns, shown)
        assert label.replace(",", "").startswith(f"{microns:g}") or label.endswith("mm"), label
        magnification = page.inner_text("#viewer .cxp-mag")
        expected = 10 / (MPP / image_zoom(page))  # 10 µm/px ÷ µm per screen pixel: the objective's ×
        assert abs(float(magnification.strip("≈× ")) - expected) / expected < 0.06, (magnification, expected)
        seen.add(microns)
    assert len(seen) == 3  # a different, rounded length at each zoom
    page.context.close()


def test_a_measured_line_and_the_cursor_speak_microns(app, browser):
    url, _ = app
    page = open_page(browser, url)
    load_example(page)
    box = page.evaluate(f"(() => {{ const r = {V}.viewer.container.getBoundingClientRect(); return [r.left, r.top]; }})()")
    page.click("#viewer .cxp-measure")
    start = (box[0] + 200, box[1] + 200)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(start[0] + 150, start[1] + 100, steps=5)
    page.mouse.move(start[0] + 300, start[1] + 200, steps=5)
    page.mouse.up()
    page.wait_for_function(f"{V}.root.dataset.measured !== undefined")
    measured = float(page.evaluate(f"{V}.root.dataset.measured"))
    expected = (300**2 + 200**2) ** 0.5 / image_zoom(page) * MPP
    assert abs(measured - expected) / expected < 0.02, (measured, expected)
    assert "µm" in page.inner_text("#viewer .cxp-measured")
    centre = page.evaluate(f"[{V}.viewer.container.clientWidth / 2, {V}.viewer.container.clientHeight / 2]")
    page.mouse.move(box[0] + centre[0], box[1] + centre[1])
    x0, y0 = page.evaluate(f"{V}.toImage(new OpenSeadragon.Point({centre[0]}, {centre[1]}))")
    cursor = page.inner_text("#viewer .cxp-cursor")
    shown = [float(v.replace(",", "")) for v in re.fullmatch(r"x ([\d,]+) µm · y ([\d,]+) µm", cursor).groups()]
    assert abs(shown[0] - x0 * MPP) <= 1 and abs(shown[1] - y0 * MPP) <= 1, (cursor, x0 * MPP, y0 * MPP)
    page.keyboard.press("Escape")  # clears the line
    assert page.inner_text("#viewer .cxp-measured") == ""
    page.context.close()


# -- rotation -------------------------------------------------------------------------------------------------
def tissue_mask(pixels: np.ndarray) -> np.ndarray:
    """Tissue in the tiles as drawn on screen: saturated pixels (the glass is grey)."""
    rgb = pixels[..., :3].astype(np.int16)
    return (rgb.max(-1) - rgb.min(-1)) > 40


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def yellow_box(page, ratio: float) -> tuple[int, int, int, int]:
    """The screen box (CSS pixels) of the region's yellow frame on the overlay."""
    overlay = canvas_pixels(page, "overlay")
    yellow = (np.abs(overlay[..., :3].astype(int) - (250, 204, 21)).sum(-1) < 60) & (overlay[..., 3] > 200)
    return tuple(round(v / ratio) for v in box_of(yellow))


def test_after_a_rotation_the_outline_and_a_region_sit_on_the_tissue(app, browser):
    """Rotated 90°: the tissue outline runs along the tissue's edge as the tiles draw it, a region drawn around the
    tissue frames the tissue, and a region at the tissue's left edge frames as much tissue as it holds on the slide
    (before, outline and regions stayed unrotated and the heatmap vanished)."""
    import cv2

    url, _ = app
    page = open_page(browser, url)
    load_example(page)
    page.uncheck("#viewer .cxp-heat")
    rings = page.evaluate(f"{V}.overlay.tissue")
    outer = np.asarray(max((r["points"] for r in rings if not r["hole"]), key=len), float).reshape(-1, 2)
    (x0, y0), (x1, y1) = outer.min(0), outer.max(0)
    page.click("#viewer .cxp-rotate-right")
    settle(page)
    assert page.evaluate(f"{V}.rotation()") == 90
    tissue = tissue_mask(canvas_pixels(page, "tiles"))
    ratio = tissue.shape[1] / page.evaluate(f"{V}.viewer.container.clientWidth")
    tx0, ty0, tx1, ty1 = (round(v / ratio) for v in box_of(tissue))
    height, width = (round(v / ratio) for v in tissue.shape)
    assert tx0 > 2 and ty0 > 2 and tx1 < width - 3 and ty1 < height - 3  # all of the tissue on screen
    # The outline's green pixels lie on the tissue's edge as the tiles show it.
    overlay = canvas_pixels(page, "overlay")
    green = (np.abs(overlay[..., :3].astype(int) - (0, 160, 60)).sum(-1) < 60) & (overlay[..., 3] > 200)
    edge = cv2.dilate((cv2.Canny(tissue.astype(np.uint8) * 255, 50, 150) > 0).astype(np.uint8),
                      np.ones((3, 3), np.uint8), iterations=round(10 * ratio)) > 0
    assert green.sum() > 200 and edge[green].mean() > 0.9, edge[green].mean()
    # A region around the whole tissue (chosen the page's own way) frames the tissue on screen.
    page.evaluate(f"{V}.choose([{x0}, {y0}, {x1 - x0}, {y1 - y0}])")
    page.wait_for_function("document.querySelector('#region textarea, #region input').value.length > 0")
    box = yellow_box(page, ratio)
    tolerance = 0.03 * max(tx1 - tx0, ty1 - ty0) + 4
    assert all(abs(a - b) <= tolerance for a, b in zip(box, (tx0, ty0, tx1, ty1))), (box, (tx0, ty0, tx1, ty1))
    # A region at the tissue's left edge, taller than wide: turned, it lies along the top of the screen, wider than
    # tall, and holds on screen the share of tissue it holds on the slide.
    left = outer[np.argmin(outer[:, 0])]
    region = [int(left[0]) - 96, int(left[1]) - 600, 700, 1200]
    page.evaluate(f"{V}.choose({region})")
    page.wait_for_function(f"{V}.config.region && {V}.config.region[2] === 700")
    page.wait_for_timeout(200)
    rx0, ry0, rx1, ry1 = yellow_box(page, ratio)
    assert rx1 - rx0 > 1.4 * (ry1 - ry0) and ry0 < (ty0 + ty1) / 2 - 100  # turned: wide, and near the top
    level0 = np.zeros((4096 // 8, 4096 // 8), np.uint8)
    for ring in rings:
        points = np.round(np.asarray(ring["points"], float).reshape(-1, 1, 2) / 8).astype(np.int32)
        cv2.fillPoly(level0, [points], 0 if ring["hole"] else 1)
    x, y, w, h = (v // 8 for v in region)
    expected = level0[y: y + h, x: x + w].mean()
    inside = tissue[round((ry0 + 3) * ratio): round((ry1 - 3) * ratio), round((rx0 + 3) * ratio): round((rx1 - 3) * ratio)]
    assert 0.15 < expected < 0.85 and abs(inside.mean() - expected) < 0.1, (inside.mean(), expected)
    # The heatmap turns too: back on, its squares cover the tissue's patches.
    page.check("#viewer .cxp-heat")
    page.evaluate(f"(() => {{ const v = {V}; v.opacity = 1; v.draw(); }})()")
    heat = canvas_pixels(page, "overlay")[..., 3] > 0
    assert tissue[heat].mean() > 0.5 and heat[tissue].mean() > 0.8
    # Reset: upright again.
    page.click("#viewer .cxp-home")
    settle(page)
    assert page.evaluate(f"{V}.rotation()") == 0
    page.context.close()


# -- the exported view ------------------------------------------------------------------------------------------
def test_the_exported_view_holds_the_overlay_the_region_and_the_scale_bar(app, browser, tmp_path):
    url, _ = app
    page = open_page(browser, url)
    load_example(page)
    page.uncheck("#viewer .cxp-outline")
    page.evaluate(f"(() => {{ const v = {V}; v.opacity = 1; v.draw(); }})()")
    data = page.evaluate(f"(() => {{ const o = {V}.overlay; return {{side: o.side, top: o.top, "
                         "x: Array.from(o.x), y: Array.from(o.y)}; })()")
    best, side = data["top"][0], data["side"]
    region = [data["x"][best] - side, data["y"][best] - side, 3 * side, 3 * side]
    page.evaluate(f"{V}.choose({region})")
    with page.expect_download() as download:
        page.click("#export-view")
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    assert path.name == "example-view.png"
    picture = np.asarray(Image.open(path).convert("RGB"))
    width = page.evaluate(f"{V}.viewer.drawer.canvas.width")
    assert picture.shape[1] == width and picture.shape[0] > page.evaluate(f"{V}.viewer.drawer.canvas.height")
    # The heat square of the most-weighted patch, at full opacity, in the picture: viridis's top colour.
    cx, cy = osd_screen(page, data["x"][best] + side / 2, data["y"][best] + side / 2)
    assert np.abs(picture[round(cy), round(cx)].astype(int) - (253, 231, 37)).max() <= 3
    # The region's yellow frame, along its top edge.
    (ax, ay), (bx, _) = osd_screen(page, region[0], region[1]), osd_screen(page, region[0] + region[2], region[1])
    row = picture[round(ay) - 1: round(ay) + 2, round(ax) + 8: round(bx) - 8].reshape(-1, 3).astype(int)
    assert (np.abs(row - (250, 204, 21)).sum(-1) < 60).mean() > 0.3  # a dashed line: a third of it at least
    # The scale bar: black, as long as its µm at the slide's µm/px.
    bar = page.evaluate(f"JSON.parse({V}.root.dataset.exportBar)")
    block = picture[bar["y"]: bar["y"] + bar["h"], bar["x"]: bar["x"] + bar["w"]]
    assert block.size and block.max() < 40
    assert picture[bar["y"] + bar["h"] // 2, bar["x"] + bar["w"] + 3].min() > 200  # it ends where it says
    shown = bar["w"] / image_zoom(page) * MPP
    assert abs(shown - bar["microns"]) / bar["microns"] <= 0.02
    page.context.close()


# -- state that stays true ----------------------------------------------------------------------------------------
def test_controls_and_words_follow_what_runs_and_what_is_loaded(app, browser, slides):
    url, _ = app
    page = open_page(browser, url)
    page.evaluate("""() => { window.__enabled = {cancel: false, stop: false};
        for (const id of ['cancel', 'stop']) new MutationObserver(() => {
            if (!document.getElementById(id).disabled) window.__enabled[id] = true;
        }).observe(document.getElementById(id), {attributes: true}); }""")
    placeholder = page.inner_text("#chat")
    assert "Load a slide, then ask about it." in placeholder
    upload(page, slides["stroma"])
    wait_ready(page, "stroma")
    page.wait_for_function(f"window.CXPViewer && {V}.root.dataset.open === '1'")
    page.wait_for_function("document.getElementById('cancel').disabled")
    assert page.evaluate("window.__enabled.cancel")  # enabled while it loaded, off again now
    page.wait_for_function("document.querySelector('#chat').innerText.includes('stroma.tiff is loaded')")
    assert "Load a slide, then ask about it." not in page.inner_text("#chat")
    ask(page, "What is the diagnosis?")
    page.wait_for_function("document.getElementById('stop').disabled")
    assert page.evaluate("window.__enabled.stop")
    ask(page, "And the grade?")
    answers = page.locator('#chat [data-testid="bot"]')
    assert answers.nth(0).locator(".cxp-evidence a").count() == 3
    assert answers.nth(1).locator(".cxp-evidence a").count() == 0  # the same three patches: said once
    assert "the same three patches as answer 1" in answers.nth(1).inner_text()
    # A chip moves the viewer and the patch panel with it.
    chips = answers.nth(0).locator(".cxp-evidence a")
    for k in (1, 0):
        chips.nth(k).click()
        target = chips.nth(k).get_attribute("href").split("=", 1)[1]
        page.wait_for_function(f"{V}.root.dataset.highlight === '{target}'")
        x, y = (int(v) for v in target.split(",")[:2])
        index = page.evaluate(f"{V}.inspect.dataset.index")
        assert page.evaluate(f"[{V}.overlay.x[{index}], {V}.overlay.y[{index}]]") == [x, y]
        assert "µm" in page.inner_text("#viewer .cxp-inspect")
    # So does a click on the most-attended patches.
    page.click("#patches-tab-button")
    page.locator("#patches img").nth(1).click()
    second = page.evaluate(f"{V}.overlay.top[1]")
    page.wait_for_function(f"{V}.inspect.dataset.index === '{second}'")
    # Plain words: no pixel levels, pooling weights or vision towers in what the page says (tooltips may).
    text = page.evaluate("document.body.innerText")
    for word in ("level-0", "level 0", "pooling weight", "vision tower", "generic-tiff"):
        assert word not in text, word
    assert re.search(r"\de-\d", text) is None  # no scientific notation
    assert "µm" in text and "%" in text
    assert page.locator("#viewer .cxp-key span").count() == 4  # the key to the marks
    page.context.close()


def test_cancel_names_the_slide_still_loaded(make_engine, slides):
    """After Cancel the status says which slide is still on show ("the previous slide (if any)" said nothing)."""
    from chatexaonepath.webapp.session import LoadCancelled

    engine = make_engine()
    session = engine.session("tab")
    with pytest.raises(LoadCancelled, match="no slide is loaded"):
        session.load(slides["tumor"], on_progress=lambda progress: session.cancel())
    session.load(slides["tumor"])
    with pytest.raises(LoadCancelled, match=r"^Loading was cancelled; tumor\.tiff is still loaded\.$"):
        session.load(slides["stroma"], on_progress=lambda progress: session.cancel())
    assert session.view.name == "tumor"


def test_the_heatmap_scales_are_honest_and_fade_at_cell_zoom(app, browser):
    """Weights that are nearly equal look nearly equal by weight (by rank they span the whole map, and the legend
    says they are nearly equal); at cell zoom the colours fade so the stain shows through."""
    url, _ = app
    page = open_page(browser, url)
    load_example(page)
    page.evaluate(f"(() => {{ const v = {V}; v.opacity = 1; v.draw(); }})()")
    low, high = page.evaluate(f"[{V}.overlay.low, {V}.overlay.high]")
    assert high <= 1.5 * low  # an untrained tower: nearly equal weights
    lowest = page.evaluate(f"{V}.overlay.rank.indexOf({V}.overlay.n)")

    def colour_of(index: int) -> np.ndarray:
        side = page.evaluate(f"{V}.overlay.side")
        x, y = page.evaluate(f"[{V}.overlay.x[{index}], {V}.overlay.y[{index}]]")
        sx, sy = osd_screen(page, x + side / 2, y + side / 2)
        ratio = page.evaluate("window.devicePixelRatio")
        return canvas_pixels(page, "overlay")[round(sy * ratio), round(sx * ratio), :3].astype(int)

    by_weight = colour_of(lowest)
    assert np.abs(by_weight - (253, 231, 37)).max() < 60  # close to the top: the weight is close to the largest
    page.select_option("#viewer .cxp-scale", "rank")
    by_rank = colour_of(lowest)
    assert np.abs(by_rank - (68, 1, 84)).max() < 10  # the bottom of the map, for a difference of a few %
    assert "nearly equal" in page.inner_text("#viewer .cxp-legend")
    assert f"rank of {page.evaluate(f'{V}.overlay.n')}" in page.inner_text("#viewer .cxp-legend")
    # The thumbnail follows the toolbar: it is composed anew when the scale changes.
    page.click("#thumbnail-tab-button")
    page.wait_for_selector("#slide-view img")
    before = page.get_attribute("#slide-view img", "src")
    page.select_option("#viewer .cxp-scale", "weight")
    page.wait_for_function("s => document.querySelector('#slide-view img').getAttribute('src') !== s", arg=before)
    assert page.evaluate("document.querySelector('#viewer .cxp-opacity').value") == "0.3"  # the default
    assert float(page.evaluate(f"{V}.root.dataset.fade")) == 1.0
    page.evaluate(f"(() => {{ const vp = {V}.viewer.viewport; vp.zoomTo(vp.getMaxZoom(), null, true); }})()")
    settle(page)
    assert float(page.evaluate(f"{V}.root.dataset.fade")) < 0.5
    page.context.close()


# -- full page, help, the conversation ------------------------------------------------------------------------
def test_full_page_keeps_the_toolbar_and_the_chat_and_the_keys_are_listed(app, browser):
    url, _ = app
    page = open_page(browser, url)
    load_example(page)
    page.click("#viewer .cxp-fullpage")
    page.wait_for_function("document.body.classList.contains('cxp-fullpage')")
    page.wait_for_timeout(500)
    for selector in ("#viewer .cxp-toolbar", "#viewer .cxp-draw", "#viewer .cxp-opacity", "#viewer .cxp-heat",
                     "#question textarea"):
        assert on_screen(page, selector), selector
    assert not on_screen(page, ".cxp-title")  # the page's header gives its room to the slide
    assert visible_fraction(page, "#viewer .cxp-stage") > 0.6
    page.click("#viewer .cxp-help-button")
    help_text = page.inner_text("#viewer .cxp-help")
    for keys in ("R · Shift+R", "0", "Esc", "W A S D"):
        assert keys in help_text
    page.keyboard.press("Escape")  # closes the help
    assert page.is_hidden("#viewer .cxp-help")
    page.keyboard.press("Escape")  # leaves full page
    page.wait_for_function("!document.body.classList.contains('cxp-fullpage')")
    page.context.close()


def test_the_conversation_downloads_as_markdown_with_its_evidence(app, browser, tmp_path):
    url, _ = app
    page = open_page(browser, url)
    load_example(page)
    ask(page, "What is the diagnosis?")
    with page.expect_download() as download:
        page.click("#export-chat")
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    text = path.read_text()
    assert path.name == "example-conversation.md"
    assert text.startswith("# Conversation about example.tiff") and "> What is the diagnosis?" in text
    assert "Evidence — the patches that weighed most in this answer" in text
    assert text.count("| x ") == 3 and "µm" in text and "Demo weights" in text
    assert "/" not in text.split("- Slide:")[1].split("\n")[0]  # no server folder
    other = browser.new_context().new_page()  # the same URL from another browser session: refused
    conversation = page.evaluate(f"{V}.base") + "conversation.md"
    assert other.request.get(conversation).status == 403
    other.context.close()
    page.context.close()
