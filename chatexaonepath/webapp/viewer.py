"""The slide viewer's server side: its HTTP routes, what a session publishes, and its chat decorations.

The page's viewer (static/viewer.js, on OpenSeadragon served from static/vendor/) gets a small
config through Gradio (token, key, geometry, and `region`/`goto` requests) and fetches everything
else from the routes here, under `viewer/s/<token>/`: deep-zoom tiles, the overlay (every patch's
level-0 square, weight and rank, the tissue outline, the gallery's patches), a patch at full
resolution, a region's thumbnail, the conversation as Markdown. Each of those checks the session's key
cookie (tiles.py). The chat's decorations (a region question's header, an answer's evidence chips) speak
µm and shares of the attention (wording.py), pixels and pooling weights one hover away.
"""

from __future__ import annotations

import html
import logging
import math
import re
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
import numpy as np

from ..chat.regions import Region, SlideTurn, patch_side_of
from ..errors import ChatEXAONEPathError, SlideError
from . import wording
from .tiles import SlideTiles, TileForbidden, TileNotFound, TileRegistry
from .transcript import transcript_markdown

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from .session import WebSession

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
LIBRARY = STATIC_DIR / "vendor" / "openseadragon" / "openseadragon.min.js"
COOKIE = "cxp_viewer"  # the session's key, scoped by the page to viewer/s/<token>/
THUMBNAIL_SIDE = 160  # a region's picture in the chat
MAX_PATCH_SIDE = 1024  # a patch shown on click: full resolution up to this side
MAX_OUTLINE_POINTS = 20_000
NO_STORE = {"Cache-Control": "no-store"}
KEEP = {"Cache-Control": "private, max-age=86400"}  # URLs hold an unguessable token: safe to keep
_PATH_INT = re.compile(r"[0-9]{1,9}")
WHOLE_SLIDE = "the whole slide"  # what a question is about when the region box is empty
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def library_installed() -> bool:
    """True when `make setup` has put OpenSeadragon beside the app (the viewer needs it; nothing comes from a CDN)."""
    return LIBRARY.is_file()


# -- what a session publishes ----------------------------------------------------------------------------
def displayed_map(loaded) -> tuple[np.ndarray, str]:
    """The per-patch weights the page shows for a loaded slide (its `attention`), and what to call them.

    Since the model exposes its projector's pooling weights they are the `attention` (CLAM's own beside
    it as `clam_attention`); before, the attention was CLAM's.
    """
    values = np.asarray(loaded.attention.detach().float().cpu(), np.float64).reshape(-1)
    return values, ("pooling weight" if getattr(loaded, "clam_attention", None) is not None else "attention")


def publish(registry: TileRegistry, session: "WebSession", card=None, goto: dict | None = None) -> dict:
    """Publish the session's slide on show for its viewer (new secrets; the slide shown before stops) and return
    the config; `goto` (a level-0 x, y, w, h) is where the viewer flies once it opens.

    In a case each slide is published when it is put on show; its tissue outline is found once and kept.
    `card` (the engine's `ModelCard`) heads the conversation's Markdown export.
    """
    loaded, path = session.shown_slide, session.slide_path
    if loaded is None or path is None:
        raise ChatEXAONEPathError("Load a slide first.")
    entry, index = session.case[session.shown], session.shown
    owner = weakref.ref(session)
    tiles = registry.publish(session, lambda: session.open_case_slide(loaded, path),
                             alive=lambda: ((s := owner()) is not None and not s.closed
                                            and s.shown_slide is loaded))
    weights, name = displayed_map(loaded)
    coords = loaded.features.coords
    coords = np.asarray(coords.cpu() if hasattr(coords, "cpu") else coords, np.int64).reshape(-1, 2)
    side = patch_side_of(loaded.features)
    tiles.patch_coords, tiles.patch_side = coords, side
    order = np.argsort(-weights, kind="stable")
    ranks = np.empty(len(weights), np.int64)
    ranks[order] = np.arange(1, len(weights) + 1)
    if entry.outline is None:
        with session.shared.model_slot():  # segmentation decodes the slide: one decode at a time, like loads
            entry.outline = tiles.with_slide(lambda slide: _tissue_outline(slide,
                                                                          session.shared.extractor.config.tissue))
    outline = entry.outline
    tiles.overlay = {
        "patch_side": side, "x": coords[:, 0].tolist(), "y": coords[:, 1].tolist(),
        "weight": [float(f"{w:.4g}") for w in weights], "rank": ranks.tolist(), "map": name,
        "top": order[: session.shared.config.top_patches].tolist(), "tissue": outline,
    }
    shown_name = session.display_name(path)
    tiles.config = {"token": tiles.token, "key": tiles.key, "base": f"viewer/s/{tiles.token}/",
                    "name": Path(shown_name).name, "mpp": float(loaded.features.attrs["level0_mpp"]),
                    **tiles.geometry(), "region": None, "goto": None, "slide": index, "slides": len(session.case)}
    if goto is not None:
        tiles.config["goto"] = {**goto, "n": 1}
    # The conversation is read when it is downloaded, so the file always holds every answer so far.
    tiles.transcript = lambda: (transcript_markdown(s, shown_name, tiles.config, card)
                                if (s := owner()) is not None else "")
    return dict(tiles.config)


def _tissue_outline(slide, config) -> list[dict]:
    """The tissue contours (and holes) in level-0 pixels, simplified to about one mask pixel."""
    import cv2

    from ..vision_tower.tissue import segment_tissue

    try:
        tissue = segment_tissue(slide, config)
    except ChatEXAONEPathError as e:  # no tissue: the viewer simply shows no outline
        logger.info("No tissue outline for the viewer: %s", e)
        return []
    rings = [(c, False) for c in tissue.contours] + [(h, True) for holes in tissue.holes for h in holes]
    out, points = [], 0
    for ring, hole in rings:
        simple = cv2.approxPolyDP(ring.astype(np.int32).reshape(-1, 1, 2), float(tissue.downsample), True)
        flat = simple.reshape(-1).tolist()
        points += len(flat) // 2
        if points > MAX_OUTLINE_POINTS:
            logger.info("Tissue outline cut at %d points", MAX_OUTLINE_POINTS)
            break
        out.append({"hole": hole, "points": flat})
    return out


MAX_REGION_CHARS = 64  # "x,y,w,h" of the largest slide is under 45 characters
MAX_COORDINATE = 10**9  # level-0 pixels: no slide is this wide


def page_region(value) -> Region:
    """A region from the page or a scripted client ("x,y,w,h" or four numbers), any malformed value one sentence.

    Bounded before it is parsed: a 5,000-digit string or 1e309 would otherwise escape as ValueError or
    OverflowError (an HTTP 500) instead of a message.
    """
    problem = ChatEXAONEPathError(f"A region is four whole numbers x,y,w,h in full-resolution pixels (e.g. "
                                  f"4096,2048,1024,1024), or one drawn on the slide; got {str(value)[:40]!r}.")
    if isinstance(value, str):
        if len(value) > MAX_REGION_CHARS:
            raise problem
        try:
            return Region.parse(value)
        except ChatEXAONEPathError as e:  # its message is the command line's ("--region …")
            raise problem from e
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError) as e:
        raise problem from e
    if len(numbers) != 4 or not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in numbers):
        raise problem
    return Region.of([round(v) for v in numbers])


_CASE_PREFIX = re.compile(r"\s*([0-9]{1,2})\s*:(.*)", re.DOTALL)


def page_case_region(value, slides: int) -> tuple[int, Region]:
    """(0-based slide, region) from the region box: "x,y,w,h" (slide 1) or "N:x,y,w,h" (slide N of a case of
    `slides`); anything else one sentence."""
    if isinstance(value, str) and (match := _CASE_PREFIX.fullmatch(value)):
        number = int(match.group(1))
        if not 1 <= number <= slides:
            raise ChatEXAONEPathError(f"The region names slide {number}, but this case has {slides} slide"
                                      f"{'s' if slides != 1 else ''}; draw it again on the slide you mean.")
        return number - 1, page_region(match.group(2).strip())
    return 0, page_region(value)


def viewer_update(registry: TileRegistry, session: "WebSession | None", **changes) -> dict | None:
    """The session's current viewer config with `changes` (region, goto); None when it shows no slide."""
    tiles = registry.published(session) if session is not None else None
    if tiles is None:
        return None
    if "goto" in changes and changes["goto"] is not None:
        tiles.config["goto_count"] = tiles.config.get("goto_count", 0) + 1
        changes["goto"] = {**changes["goto"], "n": tiles.config["goto_count"]}
    tiles.config.update(changes)
    return dict(tiles.config)


def top_patch_goto(registry: TileRegistry, session: "WebSession", rank_index: int) -> dict | None:
    """A `goto` request for the gallery's `rank_index`-th patch (0 = the most weighted)."""
    tiles = registry.published(session)
    if tiles is None or not 0 <= rank_index < len(tiles.overlay.get("top", [])):
        return None
    index = tiles.overlay["top"][rank_index]
    x, y = (int(v) for v in tiles.patch_coords[index])
    return {"x": x, "y": y, "w": tiles.patch_side, "h": tiles.patch_side}


# -- the conversation, as the page shows it --------------------------------------------------------------
def session_mpp(session: "WebSession | None", slide: int | None = None) -> float | None:
    """The level-0 µm per pixel of the slide on show, or of the case's slide `slide` (None without one)."""
    if session is None:
        return None
    slides = session.chat.slides
    loaded = session.shown_slide if slide is None else slides[slide] if 0 <= slide < len(slides) else None
    try:
        return float(loaded.features.attrs["level0_mpp"]) if loaded is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def chat_messages(session: "WebSession", registry: TileRegistry) -> list[dict]:
    """`session.messages()` with region turns headed by their thumbnail and size, and answers followed by their
    evidence chips — once per distinct set: an answer whose evidence an earlier answer showed says which.

    In a case the chips and region headers name their slide (a click shows that slide first), and a region's
    thumbnail is drawn only for the slide on show (the only one the viewer publishes).
    """
    messages = session.messages()
    tiles = registry.published(session)
    case = len(session.chat.slides) > 1
    shown: dict[tuple, int] = {}  # the evidence's patches → the number of the answer that showed them
    answers = 0
    unlike = case_warnings(session)
    for message, turn in zip(messages, session.turns):
        if turn.role == "assistant":
            answers += 1
            if unlike:  # beside every answer: a reader may scroll past the note over the chat
                message["content"] += "".join(f'\n\n<span class="cxp-untypical" data-untypical="1">⚠ {html.escape(text)}'
                                              "</span>" for text in unlike)
        if not isinstance(turn, SlideTurn):
            continue
        slide = getattr(turn, "slide", 0)
        if turn.role == "user" and turn.region is not None:
            on_show = tiles if slide == session.shown else None
            message["content"] = (region_header(turn.region, on_show, session_mpp(session, slide),
                                                slide=slide if case else None) + message["content"])
        elif turn.role == "assistant" and turn.evidence:
            key = tuple((e.slide, e.index) for e in turn.evidence)
            if key in shown:
                message["content"] += evidence_seen(len(key), shown[key])
            else:
                shown[key] = answers
                mpps = {e.slide: session_mpp(session, e.slide) for e in turn.evidence}
                message["content"] += evidence_chips(turn.evidence, mpps.get(0) if not case else None,
                                                     by_slide=mpps if case else None)
    return messages


def case_warnings(session: "WebSession") -> list[str]:
    """The typicality warnings of the case's slides (chat/typicality.py), each naming its slide in a case."""
    slides = session.chat.slides
    if len(slides) <= 1:
        warning = slides[0].typicality_warning if slides else None
        return [warning] if warning else []
    return [f"Slide {i} ({loaded.name}): {loaded.typicality_warning}"
            for i, loaded in enumerate(slides, start=1) if loaded.typicality_warning]


def region_header(region: Region, tiles: SlideTiles | None, mpp: float | None = None,
                  slide: int | None = None) -> str:
    """What heads a question about a region: its thumbnail (when the viewer shows the slide) and its size in µm;
    `slide` (0-based) names its slide in a case."""
    picture = ""
    if tiles is not None:
        src = f"{tiles.config['base']}region/{region.x},{region.y},{region.width},{region.height}.jpeg"
        picture = f'<img class="cxp-region-thumb" src="{html.escape(src)}" alt="region" width="72"> '
        mpp = mpp or tiles.config.get("mpp")
    where = f"Slide {slide + 1}, region" if slide is not None else "Region"
    label = f"{where}: {wording.region_size(region, mpp)}" if mpp else f"{where}: {region.describe()}"
    title = (f"{wording.region_text(region, mpp)}; {wording.region_pixels(region)}. Show it on the slide"
             if mpp else "Show this place on the slide")
    chip = _chip(region, label, title, slide)
    return f'<div class="cxp-region-turn" data-region="{region}">{picture}{chip}</div>\n\n'


def evidence_chips(evidence, mpp: float | None = None, by_slide: dict[int, float | None] | None = None) -> str:
    """The chips under an answer: the patches that weighed most in it (centre in µm, share of the answer's
    attention), each a link the viewer flies to; pixels and the pooling weight in the tooltip. With `by_slide`
    (a case: each slide's µm/px) each chip names its slide, and a click shows that slide first."""
    chips = []
    for e in evidence:
        if by_slide is not None:
            mpp = by_slide.get(e.slide)
        half = e.size / 2
        place = wording.position(e.x + half, e.y + half, mpp) if mpp else f"({e.x:,}, {e.y:,}) px"
        size = f"{wording.length(e.size * mpp)} square, " if mpp else ""
        title = (f"A {size}centre at {place}; top-left pixel ({e.x:,}, {e.y:,}) at full resolution; pooling "
                 f"weight {e.weight:.3g} in this answer. Show it on the slide")
        where = f"slide {e.slide + 1} · " if by_slide is not None else ""
        chips.append(_chip(e.region, f"#{e.rank} · {where}{wording.share(e.weight)} · {place}", title,
                           e.slide if by_slide is not None else None))
    return f'\n\n<div class="cxp-evidence">Evidence: {" ".join(chips)}</div>'


def evidence_seen(count: int, answer: int) -> str:
    """An answer whose evidence is the same patches an earlier answer showed: said once, without chips."""
    patches = f"{COUNT_WORDS.get(count, count)} patch{'es' if count != 1 else ''}"
    return f'\n\n<div class="cxp-evidence cxp-evidence-seen">Evidence: the same {patches} as answer {answer}.</div>'


def _chip(region: Region, label: str, title: str = "Show this place on the slide", slide: int | None = None) -> str:
    # "#cxp-region=x,y,w,h" flies the viewer there; "@N" (a case) shows slide N (from 1) first (static/viewer.js).
    target = f"{region}@{slide + 1}" if slide is not None else str(region)
    return (f'<a class="cxp-chip" href="#cxp-region={target}" title="{html.escape(title)}">'
            f'{html.escape(label)}</a>')


# -- HTTP ------------------------------------------------------------------------------------------------
def viewer_routes(registry: TileRegistry) -> list["BaseRoute"]:
    """The viewer's routes, for the app's FastAPI (`launch(app_kwargs={"routes": …})`)."""
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def answer(request, make) -> Response:
        try:
            params = {name: _path_int(value) if name != "token" else value
                      for name, value in request.path_params.items()}
            tiles = registry.find(params["token"], request.cookies.get(COOKIE))
            body = make(tiles, params)
        except TileNotFound:
            return PlainTextResponse("Not found.", 404, headers=NO_STORE)
        except TileForbidden:
            return PlainTextResponse("This slide belongs to another session.", 403, headers=NO_STORE)
        except SlideError as e:
            return PlainTextResponse(str(e), 500, headers=NO_STORE)
        if isinstance(body, dict):
            return JSONResponse(body, headers=KEEP)
        if isinstance(body, str):  # the conversation: changes with every answer, so never cached
            filename = re.sub(r"[^\w.-]+", "_", Path(tiles.config.get("name", "slide")).stem) + "-conversation.md"
            return Response(body, media_type="text/markdown; charset=utf-8",
                            headers={**NO_STORE, "Content-Disposition": f'attachment; filename="{filename}"'})
        return Response(body, media_type="image/jpeg", headers=KEEP)

    def patch(tiles: SlideTiles, params) -> bytes:
        index = params["index"]
        if not 0 <= index < len(tiles.patch_coords):
            raise TileNotFound(f"There is no patch {index}.")
        x, y = (int(v) for v in tiles.patch_coords[index])
        return tiles.region(x, y, tiles.patch_side, tiles.patch_side, min(tiles.patch_side, MAX_PATCH_SIDE))

    def region(tiles: SlideTiles, params) -> bytes:
        if not (params["w"] and params["h"]):
            raise TileNotFound("An empty region has no picture.")
        return tiles.region(params["x"], params["y"], params["w"], params["h"], THUMBNAIL_SIDE)

    # Numbers are taken as text and read by `_path_int`: Starlette's `int` converter turns a 5,000-digit
    # level into an exception (HTTP 500) instead of a missing tile.
    prefix = "/viewer/s/{token}"
    return [
        Mount("/viewer/static", app=StaticFiles(directory=STATIC_DIR, check_dir=False), name="viewer-static"),
        Route(prefix + "/tiles/{level}/{col}_{row}.jpeg",
              lambda r: answer(r, lambda t, p: t.tile(p["level"], p["col"], p["row"]))),
        Route(prefix + "/overlay.json", lambda r: answer(r, lambda t, p: t.overlay)),
        Route(prefix + "/patch/{index}.jpeg", lambda r: answer(r, patch)),
        Route(prefix + "/region/{x},{y},{w},{h}.jpeg", lambda r: answer(r, region)),
        Route(prefix + "/conversation.md", lambda r: answer(r, lambda t, p: t.transcript()
                                                            if getattr(t, "transcript", None) else "")),
    ]


def _path_int(text: str) -> int:
    """A whole number from a URL: up to 9 digits (a slide is never 10^9 px wide), else no such tile (404)."""
    if not _PATH_INT.fullmatch(text):
        raise TileNotFound(f"{text[:20]!r} is not a tile coordinate.")
    return int(text)


def __getattr__(name: str):
    """The viewer's page component and its events live in viewer_page.py (which imports this module); the old
    names still resolve here for callers that imported them from viewer.py."""
    if name in ("ViewerHandlers", "viewer_component", "VIEWER_TEMPLATE", "VIEWER_HEAD", "VIEWER_JS"):
        from . import viewer_page

        return getattr(viewer_page, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
