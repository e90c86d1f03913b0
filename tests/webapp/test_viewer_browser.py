"""The slide viewer in real Chromium: tiles, zoom, who may see them, the overlay's registration, regions, evidence.

The app runs in-process on a tiny engine (2-layer LLaMA and ViT) with a 4096² synthetic example
(40 patches of 512 level-0 px), so every scenario takes seconds.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from chatexaonepath.chat.regions import Region, patches_in_region
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.webapp.engine import AppConfig, AppEngine
from chatexaonepath.webapp.viewer import library_installed
from chatexaonepath.webapp.wording import region_size
from tests.webapp.conftest import CHROMIUM, served
from tests.webapp.test_browser import ask, open_app, wait_ready

pytestmark = [pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed"),
              pytest.mark.skipif(not library_installed(), reason="OpenSeadragon is not installed (make setup)")]

V = "window.CXPViewer.viewers[0]"


@pytest.fixture(scope="module")
def app(tiny_chat_model, tiny_encoder, tmp_path_factory):
    """The app on 127.0.0.1 with a tiny engine whose tower calls are recorded; yields (url, engine, calls)."""
    root = tmp_path_factory.mktemp("viewer-browser")
    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=4)
    engine = AppEngine(tiny_chat_model, FeatureExtractor(extract, tiny_encoder),
                       AppConfig(features_dir=str(root / "features"), example_size=4096, max_new_tokens=6,
                                 max_sessions_per_client=16),  # every page comes from loopback
                       example_path=root / "example.tiff", work_dir=root / "work")
    calls: list[torch.Tensor] = []
    real = tiny_chat_model.get_slide_tokens

    def recorded(bags, *args, **kwargs):
        calls.append(bags[0].detach().cpu().clone())
        return real(bags, *args, **kwargs)

    tiny_chat_model.get_slide_tokens = recorded
    try:
        with served(engine) as url:
            yield url, engine, calls
    finally:
        del tiny_chat_model.get_slide_tokens



def open_example(browser, url):
    """A page with the example slide loaded and shown in the viewer; its tile responses are recorded."""
    page = open_app(browser, url)
    page.tiles = []
    page.on("response", lambda r: page.tiles.append((r.status, r.url, r.headers.get("content-type")))
            if "/tiles/" in r.url else None)
    page.click("#example")
    wait_ready(page, "example")
    page.wait_for_function(f"window.CXPViewer && {V}.overlay && {V}.root.dataset.open === '1'", timeout=30_000)
    page.evaluate(f"{V}.root.scrollIntoView()")
    settle(page)
    return page


def settle(page) -> None:
    """Wait for the viewer to reach its target view, then for the overlay's redraw."""
    page.wait_for_function(f"""(() => {{ const vp = {V}.viewer.viewport;
        const a = vp.getCenter(true), b = vp.getCenter(false);
        return Math.abs(vp.getZoom(true) - vp.getZoom(false)) < 1e-9 && Math.abs(a.x - b.x) < 1e-9
            && Math.abs(a.y - b.y) < 1e-9; }})()""", timeout=15_000)
    page.wait_for_timeout(300)  # (Playwright delivers events only while it waits)


def levels(page) -> set[int]:
    return {int(u.split("/tiles/")[1].split("/")[0]) for _, u, _ in page.tiles}


def overlay(page) -> dict:
    return page.evaluate(f"""(() => {{ const o = {V}.overlay;
        return {{side: o.side, x: Array.from(o.x), y: Array.from(o.y), rank: Array.from(o.rank), top: o.top,
                 width: {V}.config.width, height: {V}.config.height}}; }})()""")


def screen_of(page, x: float, y: float) -> tuple[float, float]:
    """Where level-0 (x, y) is in the viewer element, from OpenSeadragon's viewport bounds (not the overlay's maths)."""
    return tuple(page.evaluate(f"""(() => {{ const v = {V}.viewer, b = v.viewport.getBounds(true);
        const w = v.container.clientWidth, width = {V}.config.width;
        return [({x} / width - b.x) * w / b.width, ({y} / width - b.y) * w / b.width]; }})()"""))


def alpha_row(page, y: int, x0: int, x1: int) -> list[int]:
    return page.evaluate(f"""Array.from({V}.canvas.getContext('2d').getImageData({x0}, {y}, {x1 - x0}, 1).data)
        .filter((_, i) => i % 4 === 3)""")


def alpha_column(page, x: int, y0: int, y1: int) -> list[int]:
    return page.evaluate(f"""Array.from({V}.canvas.getContext('2d').getImageData({x}, {y0}, 1, {y1 - y0}).data)
        .filter((_, i) => i % 4 === 3)""")


def click_at_level0(page, x: float, y: float) -> None:
    sx, sy = screen_of(page, x, y)
    box = page.evaluate(f"(() => {{ const r = {V}.viewer.container.getBoundingClientRect(); return [r.left, r.top]; }})()")
    page.mouse.click(box[0] + sx, box[1] + sy)


def test_the_viewer_loads_tiles_and_zooming_in_fetches_deeper_levels(app, browser):
    url, _, _ = app
    page = open_example(browser, url)
    assert page.tiles and all(status == 200 and kind == "image/jpeg" for status, _, kind in page.tiles)
    before = max(levels(page))
    page.evaluate(f"{V}.viewer.viewport.zoomBy(8, null, true)")
    deadline = time.monotonic() + 20
    while max(levels(page)) < before + 2 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert max(levels(page)) >= before + 2  # 8× closer: three levels finer, two at least already in
    assert all(status == 200 for status, _, _ in page.tiles)
    page.context.close()


def test_another_session_or_a_guessed_url_gets_no_tiles(app, browser):
    url, _, _ = app
    owner = open_example(browser, url)
    tile = next(u for status, u, _ in owner.tiles if status == 200)
    assert owner.evaluate("u => fetch(u).then(r => r.status)", tile) == 200
    other = open_app(browser, url)  # another browser session, with its own cookies
    assert other.evaluate("u => fetch(u).then(r => r.status)", tile) == 403
    assert other.request.get(tile).status == 403
    token = tile.split("/viewer/s/")[1].split("/")[0]
    guessed = tile.replace(token, token[::-1])
    assert owner.evaluate("u => fetch(u).then(r => r.status)", guessed) == 404
    owner.context.close()
    other.context.close()


def edge_offsets(page, cells: set, side: int, zoom: float) -> list[float]:
    """For each side, a patch without a neighbour there, centred in the view at `zoom` × the home zoom: how far
    (screen px) its overlay square's edge is from the patch's own edge."""
    offsets = []
    for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        x, y = next((x, y) for x, y in sorted(cells) if (x + dx * side, y + dy * side) not in cells)
        page.evaluate(f"""(() => {{ const vp = {V}.viewer.viewport;
            vp.zoomTo(vp.getHomeZoom() * {zoom}, null, true);
            vp.panTo({V}.image().imageToViewportCoordinates({x + side / 2}, {y + side / 2}), true); }})()""")
        settle(page)
        left, top = screen_of(page, x, y)
        right, bottom = screen_of(page, x + side, y + side)
        if dx:  # a row through the middle of the patch, across its left or right edge
            edge, across = (left if dx < 0 else right), (top + bottom) / 2
            values = alpha_row(page, round(across), round(edge) - 4, round(edge) + 4)
        else:
            edge, across = (top if dy < 0 else bottom), (left + right) / 2
            values = alpha_column(page, round(across), round(edge) - 4, round(edge) + 4)
        inside = [i for i, a in enumerate(values) if a > 0]
        assert inside, (dx, dy, values)
        found = (inside[0] if dx + dy < 0 else inside[-1] + 1) + round(edge) - 4  # the square's edge, in pixels
        offsets.append(found - edge)
    return offsets


def test_overlay_squares_cover_their_patches_at_two_zoom_levels_and_toggle(app, browser):
    url, _, _ = app
    page = open_example(browser, url)
    page.uncheck("#viewer .cxp-outline")
    page.evaluate(f"(() => {{ const v = {V}; v.opacity = 1; v.draw(); }})()")
    data = overlay(page)
    side, cells = data["side"], set(zip(data["x"], data["y"]))
    for zoom in (1.0, 3.0):
        offsets = edge_offsets(page, cells, side, zoom)
        scale = screen_of(page, side, 0)[0] - screen_of(page, 0, 0)[0]
        assert scale > 20 * zoom  # a patch spans many screen pixels, so an off-by-a-tile error would show
        assert all(abs(o) <= 1.0 for o in offsets), (zoom, offsets)  # every edge within one screen pixel
    best = data["top"][0]
    page.evaluate(f"{V}.viewer.viewport.goHome(true)")
    settle(page)
    cx, cy = screen_of(page, data["x"][best] + side / 2, data["y"][best] + side / 2)
    assert alpha_row(page, round(cy), round(cx), round(cx) + 1) == [255]
    page.uncheck("#viewer .cxp-heat")
    assert alpha_row(page, round(cy), round(cx), round(cx) + 1) == [0]
    page.check("#viewer .cxp-heat")
    assert alpha_row(page, round(cy), round(cx), round(cx) + 1) == [255]
    page.context.close()


def test_clicking_shows_the_patch_at_full_resolution_and_the_gallery_flies_there(app, browser):
    url, _, _ = app
    page = open_example(browser, url)
    data = overlay(page)
    best = data["top"][0]
    side = data["side"]
    click_at_level0(page, data["x"][best] + side / 2, data["y"][best] + side / 2)
    page.wait_for_function("document.querySelector('#viewer .cxp-inspect img')?.naturalWidth > 0", timeout=10_000)
    assert page.evaluate("document.querySelector('#viewer .cxp-inspect img').naturalWidth") == side
    assert f"ranked 1 of {len(data['x'])}" in page.inner_text("#viewer .cxp-inspect")
    page.click("#patches-tab-button")
    page.locator("#patches img").nth(2).click()  # the third most-weighted patch
    third = data["top"][2]
    page.wait_for_function(f"{V}.root.dataset.highlight === '{data['x'][third]},{data['y'][third]},{side},{side}'",
                           timeout=10_000)
    assert page.evaluate(f"{V}.inspect.dataset.index") == str(third)  # the panel follows the flight
    settle(page)
    centre = page.evaluate(f"(() => {{ const c = {V}.image().viewportToImageCoordinates({V}.viewer.viewport.getCenter(true));"
                           " return [c.x, c.y]; })()")
    assert abs(centre[0] - (data["x"][third] + side / 2)) < side / 4
    assert abs(centre[1] - (data["y"][third] + side / 2)) < side / 4
    page.context.close()


def test_a_drawn_region_is_asked_about_with_exactly_its_patches_and_its_chips_fly_there(app, browser):
    url, engine, calls = app
    page = open_example(browser, url)
    page.click("#viewer .cxp-draw")
    box = page.evaluate(f"(() => {{ const r = {V}.viewer.container.getBoundingClientRect();"
                        " return [r.left, r.top, r.width, r.height]; })()")
    x0, y0 = box[0] + box[2] * 0.35, box[1] + box[3] * 0.3
    page.mouse.move(x0, y0)
    page.mouse.down()
    dx, dy = box[2] * 0.22, box[3] * 0.25  # a quarter of the view: several patches, not all
    page.mouse.move(x0 + dx / 2, y0 + dy / 2, steps=4)
    page.mouse.move(x0 + dx, y0 + dy, steps=4)
    page.mouse.up()
    page.wait_for_function("document.querySelector('#region textarea, #region input').value.length > 0",
                           timeout=10_000)
    region = Region.parse(page.input_value("#region textarea, #region input"))
    session = next(s for s in engine._sessions.values() if s.chat.slide is not None and not s.turns)
    loaded = session.chat.slide
    coords = loaded.features.coords.numpy()
    side = int(loaded.features.attrs["patch_size_level0"])
    centres = coords + side / 2
    expected = np.flatnonzero((centres[:, 0] >= region.x) & (centres[:, 0] < region.x + region.width) &
                              (centres[:, 1] >= region.y) & (centres[:, 1] < region.y + region.height))
    assert 0 < len(expected) < len(coords)
    assert patches_in_region(coords, side, region).tolist() == expected.tolist()
    calls.clear()
    answer = ask(page, "What is in this region?")
    assert answer
    assert len(calls) == 1  # the tower ran once, on exactly the region's cached features
    torch.testing.assert_close(calls[0], loaded.features.features[torch.as_tensor(expected)].float())
    user = page.locator('#chat [data-testid="user"]').last
    assert f"Region: {region_size(region, 0.25)}" in user.inner_text()  # its size in µm (the example: 0.25 µm/px)
    page.wait_for_function("document.querySelector('#chat [data-testid=\"user\"] img.cxp-region-thumb')"
                           "?.naturalWidth > 0", timeout=10_000)  # the thumbnail came from the session's route
    chips = page.locator('#chat [data-testid="bot"] .cxp-evidence a')
    assert chips.count() == 3 and len(expected) >= 3
    target = Region.parse(chips.first.get_attribute("href").split("=", 1)[1])
    assert int(np.flatnonzero((coords[:, 0] == target.x) & (coords[:, 1] == target.y))[0]) in expected
    chips.first.scroll_into_view_if_needed()
    chips.first.click()
    page.wait_for_function(f"{V}.root.dataset.highlight === '{target}'", timeout=10_000)
    settle(page)
    centre = page.evaluate(f"(() => {{ const c = {V}.image().viewportToImageCoordinates({V}.viewer.viewport.getCenter(true));"
                           " return [c.x, c.y]; })()")
    assert abs(centre[0] - (target.x + target.width / 2)) < side / 4
    assert abs(centre[1] - (target.y + target.height / 2)) < side / 4
    # The next question is about the whole slide again: the history keeps saying which was which.
    page.click("#whole-slide")
    page.wait_for_function("document.querySelector('#region textarea, #region input').value === ''")
    calls.clear()
    ask(page, "And the whole slide?")
    assert calls == []  # the whole slide's tokens were made at load
    users = page.locator('#chat [data-testid="user"]').all_inner_texts()
    assert "Region:" in users[0] and users[1].strip() == "And the whole slide?"
    page.context.close()


def test_a_region_without_tissue_gets_a_message_not_an_answer(app, browser):
    url, _, _ = app
    page = open_example(browser, url)
    data = overlay(page)
    side, cells = data["side"], set(zip(data["x"], data["y"]))
    empty = next((x, y) for y in range(0, data["height"], side) for x in range(0, data["width"], side)
                 if (x, y) not in cells)
    page.fill("#region textarea, #region input", f"{empty[0] + 8},{empty[1] + 8},64,64")
    page.fill("#question textarea", "What is here?")
    page.click("#send")
    page.wait_for_function("document.querySelector('#chat-status').innerText.includes('no tissue patches')",
                           timeout=30_000)
    assert page.locator('#chat [data-testid="bot"]').count() == 0
    page.context.close()
