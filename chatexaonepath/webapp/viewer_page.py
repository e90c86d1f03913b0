"""The slide viewer's place in the page: its gr.HTML component (toolbar, stage, readouts) and its events.

The component's value is the config `viewer.publish` made (None: no slide yet); static/viewer.js draws
everything else. Its toolbar is the page's one overlay control: the thumbnail of the Thumbnail tab is
composed with the settings the toolbar reports (an `input` event), so the two never disagree.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gradio as gr

from ..chat.regions import Region
from ..errors import ChatEXAONEPathError
from . import wording
from .slide_view import HEAT_SCALES
from .case import strip_html
from .viewer import WHOLE_SLIDE, page_case_region, page_region, publish, session_mpp, top_patch_goto, viewer_update

if TYPE_CHECKING:
    from .session import WebSession

logger = logging.getLogger(__name__)

VIEWER_HEAD = ('<link rel="stylesheet" href="viewer/static/viewer.css">'
               '<link rel="stylesheet" href="viewer/static/page.css">'
               '<script src="viewer/static/vendor/openseadragon/openseadragon.min.js"></script>'
               '<script src="viewer/static/viewer.js"></script>'
               '<script src="viewer/static/page.js"></script>')
# Plain words on the buttons; what each does, and its key, in the tooltip. `#export-view` and `.cxp-scalebar`
# (with `data-microns`) are contracts other tools rely on.
VIEWER_TEMPLATE = """
<div class="cxp-viewer">
  <div class="cxp-toolbar" role="toolbar" aria-label="Slide viewer">
    <span class="cxp-group">
      <label title="Colour each tissue patch by how much the model attended to it (the projector's pooling weights)"><input type="checkbox" class="cxp-heat" checked> Attention</label>
      <select class="cxp-scale" aria-label="Colour scale of the attention" title="Weight: colour proportional to the patch's share of the attention (equal shares look equal). Rank: colour by rank among the patches (spreads small differences over the whole scale).">
        <option value="weight" selected>by weight</option><option value="rank">by rank</option>
      </select>
      <input type="range" class="cxp-opacity" min="0" max="1" step="0.05" value="0.3" aria-label="Opacity of the attention colours" title="Opacity of the attention colours (fainter by itself when zoomed in to cells)">
      <label title="The tissue the model read: outline green, holes blue"><input type="checkbox" class="cxp-outline" checked> Outline</label>
    </span>
    <span class="cxp-group">
      <button type="button" class="cxp-draw" title="Drag over the slide: the next question is about that region only">Draw a region</button>
      <button type="button" class="cxp-view" title="The next question is about what the viewer shows now">Ask about view</button>
      <button type="button" class="cxp-measure" title="Drag a line to measure its length (Esc clears it)">Measure</button>
    </span>
    <span class="cxp-group">
      <button type="button" class="cxp-rotate-left" title="Rotate 90° to the left (Shift+R)" aria-label="Rotate left">⟲</button>
      <button type="button" class="cxp-rotate-right" title="Rotate 90° to the right (R)" aria-label="Rotate right">⟳</button>
      <button type="button" class="cxp-home" title="The whole slide, upright (0)">Reset</button>
      <button type="button" class="cxp-fullpage" title="The slide and the chat fill the screen (Esc leaves)">Full page</button>
      <button type="button" id="export-view" class="cxp-export" title="Save what the viewer shows, with its overlays, a scale bar and the slide's name, as a PNG picture">Save view</button>
      <button type="button" class="cxp-help-button" aria-expanded="false" title="Keyboard shortcuts and what the marks mean">?</button>
    </span>
  </div>
  <div class="cxp-stage">
    <div class="cxp-osd"></div>
    <div class="cxp-empty">Load a slide to pan and zoom it here.</div>
    <div class="cxp-inspect" hidden></div>
    <div class="cxp-readout">
      <div class="cxp-scalebar" data-microns=""><span class="cxp-scalebar-label"></span></div>
      <span class="cxp-mag" title=""></span>
      <span class="cxp-legend" title=""><span class="cxp-legend-low"></span><span class="cxp-legend-bar"></span><span class="cxp-legend-high"></span> <span class="cxp-legend-name"></span></span>
      <span class="cxp-cursor"></span><span class="cxp-measured"></span>
    </div>
    <div class="cxp-key" aria-label="What the marks mean">
      <span><i class="cxp-swatch cxp-swatch-patch"></i>patch shown</span>
      <span><i class="cxp-swatch cxp-swatch-place"></i>place from the chat</span>
      <span><i class="cxp-swatch cxp-swatch-region"></i>next question's region</span>
      <span><i class="cxp-swatch cxp-swatch-tissue"></i>tissue</span>
    </div>
    <div class="cxp-help" hidden role="dialog" aria-label="Keyboard shortcuts">
      <b>Moving around</b> (click the slide first)
      <table>
        <tr><td>drag · arrow keys · W A S D</td><td>pan</td></tr>
        <tr><td>wheel · + − · Shift+↑ Shift+↓</td><td>zoom in, out</td></tr>
        <tr><td>double-click</td><td>zoom in there</td></tr>
        <tr><td>R · Shift+R</td><td>rotate 90° right, left (the overlays turn with the slide)</td></tr>
        <tr><td>0</td><td>reset: the whole slide, upright</td></tr>
        <tr><td>Esc</td><td>stop drawing or measuring; leave full page; close this</td></tr>
      </table>
      <b>Marks</b>
      <table>
        <tr><td><i class="cxp-swatch cxp-swatch-patch"></i></td><td>the patch shown in the panel (clicked, or chosen from the chat or the most-attended patches)</td></tr>
        <tr><td><i class="cxp-swatch cxp-swatch-place"></i></td><td>a region the chat pointed to</td></tr>
        <tr><td><i class="cxp-swatch cxp-swatch-region"></i></td><td>the region the next question is about</td></tr>
        <tr><td><i class="cxp-swatch cxp-swatch-measure"></i></td><td>a measured line</td></tr>
        <tr><td><i class="cxp-swatch cxp-swatch-tissue"></i> <i class="cxp-swatch cxp-swatch-hole"></i></td><td>the tissue the model read, and holes in it</td></tr>
      </table>
    </div>
  </div>
</div>
"""
VIEWER_JS = "window.CXPViewer ? window.CXPViewer.mount(element, props, trigger, watch) : " \
            "(element.querySelector('.cxp-empty').textContent = 'The slide viewer is not installed (run make setup).')"


def viewer_component():
    """The viewer's place in the page: a gr.HTML whose value is the published config (None: no slide yet)."""
    return gr.HTML(None, html_template=VIEWER_TEMPLATE, js_on_load=VIEWER_JS, head=VIEWER_HEAD, elem_id="viewer",
                   apply_default_css=False, padding=False)


def region_box(region: Region | None, mpp: float | None, slide: int | None = None, case: bool = False):
    """The region box's update: the region in pixels (what the ask API takes; "N:x,y,w,h" for slide N of a case),
    its size and place in µm as its label; empty, the whole slide (the whole `case`)."""
    if region is None:
        return gr.update(value="", label=region_label(None, None, case=case))
    value = f"{slide + 1}:{region}" if slide is not None else str(region)
    return gr.update(value=value, label=region_label(region, mpp, slide))


def region_label(region: Region | None, mpp: float | None, slide: int | None = None, case: bool = False) -> str:
    """What the next question is about, in µm: the region box's label."""
    if region is None:
        return f"Next question about: {'the whole case' if case else WHOLE_SLIDE}"
    where = f" on slide {slide + 1}" if slide is not None else ""
    return f"Next question about: a region{where} of {wording.region_text(region, mpp)}"


def case_slide(session: "WebSession | None") -> int | None:
    """The slide on show as a region names it: its index in a case of several, None for a lone slide."""
    return session.shown if session is not None and len(session.case) > 1 else None


class ViewerHandlers:
    """The page's viewer events: publishing a loaded slide, regions drawn or typed, flights to the gallery's patches,
    the toolbar's overlay settings."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def _session(self, request: gr.Request) -> "WebSession | None":
        return self.engine.find_session(request.session_hash, getattr(request, "username", None))

    def show(self, request: gr.Request) -> tuple:
        """After a load: the new slide's config (new secrets) and an empty region box; nothing when the slide did
        not change (the load failed or was cancelled: the slide on show stays)."""
        session = self._session(request)
        if session is None or session.chat.slide is None:
            return None, region_box(None, None)
        if self.engine.tiles.published(session) is not None:
            return gr.skip(), gr.skip()
        try:
            return (publish(self.engine.tiles, session, self.engine.card),
                    region_box(None, None, case=len(session.case) > 1))
        except ChatEXAONEPathError as e:
            logger.warning("The viewer could not show the slide: %s", e)
            return None, region_box(None, None)

    def region_drawn(self, request: gr.Request, event: gr.EventData) -> tuple:
        """A rectangle drawn on the viewer (or its current view) becomes the next question's region."""
        data = getattr(event, "_data", None) or {}
        try:
            region = page_region(data.get("region"))
        except ChatEXAONEPathError:
            return gr.skip(), gr.skip()
        session = self._session(request)
        return (region_box(region, session_mpp(session), case_slide(session)),
                viewer_update(self.engine.tiles, session, region=list(region.as_tuple())))

    def region_typed(self, text: str, request: gr.Request):
        """A region typed into the box is drawn on the viewer (an unreadable one is left to the question's check)."""
        session = self._session(request)
        slides = len(session.case) if session is not None else 1
        try:
            slide, region = page_case_region(text, max(slides, 1)) if text and text.strip() else (0, None)
        except ChatEXAONEPathError:
            return gr.skip(), gr.skip()
        on_show = session is not None and slide == session.shown
        rect = None if region is None or not on_show else list(region.as_tuple())  # drawn on its own slide only
        box = region_box(region, session_mpp(session, slide) if session is not None else None,
                         slide if slides > 1 else None)
        box.pop("value", None)  # the text stays as typed
        return viewer_update(self.engine.tiles, session, region=rect) or gr.skip(), box

    def switch_slide(self, show: bool, opacity: float, request: gr.Request, event: gr.EventData) -> tuple:
        """A slide of the case clicked in the strip (or an evidence chip of another slide): the viewer, the thumbnail
        and the top patches show it, the viewer flying to the chip's place; the region box keeps its slide's region."""
        data = getattr(event, "_data", None) or {}
        session = self._session(request)
        skip = (gr.skip(),) * 4
        if session is None or not session.case or not isinstance(data, dict):  # a scripted client's oddity: nothing
            return skip
        try:
            goto, target = data.get("goto"), None
            if goto is not None:  # checked before the slide changes: a bad one changes nothing
                region = page_region(goto)
                target = {"x": region.x, "y": region.y, "w": region.width, "h": region.height}
            entry = session.show_slide(data.get("slide"))
            config = publish(self.engine.tiles, session, self.engine.card, goto=target)
        except ChatEXAONEPathError as e:
            logger.info("The viewer could not switch slides: %s", e)
            return skip
        try:
            opacity = min(max(float(opacity), 0.0), 1.0)
        except (TypeError, ValueError):
            opacity = 0.3
        view = entry.view
        return (config, strip_html(session.strip(), session.shown, session.adding), view.compose(bool(show), opacity),
                view.gallery())

    def whole_slide(self, request: gr.Request) -> tuple:
        """Back to questions about the whole slide."""
        session = self._session(request)
        case = session is not None and len(session.case) > 1
        return region_box(None, None, case=case), viewer_update(self.engine.tiles, session, region=None) or gr.skip()

    def goto_patch(self, request: gr.Request, event: gr.SelectData):
        """A gallery patch clicked: the viewer flies to it (and shows it in its panel)."""
        session = self._session(request)
        index = getattr(event, "index", None)
        found = session is not None and isinstance(index, int)
        target = top_patch_goto(self.engine.tiles, session, index) if found else None
        return gr.skip() if target is None else viewer_update(self.engine.tiles, session, goto=target)

    def overlay_settings(self, request: gr.Request, event: gr.EventData) -> tuple:
        """The toolbar's attention settings changed: the thumbnail follows, and so do the next loads' (the hidden
        show/opacity the load handlers read)."""
        data = getattr(event, "_data", None) or {}
        show = bool(data.get("heat", True))
        try:
            opacity = min(max(float(data.get("opacity", 0.3)), 0.0), 1.0)
        except (TypeError, ValueError):
            opacity = 0.3
        scale = data.get("scale") if data.get("scale") in HEAT_SCALES else HEAT_SCALES[0]
        session = self._session(request)
        view = session.view if session is not None else None
        image = gr.skip() if view is None else view.compose(show, opacity, scale)
        return image, show, opacity
