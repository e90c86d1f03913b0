"""A session's case as the page shows it: its slides, each with its view and status, and the strip that lists them.

A case is the slides of one conversation (chat/session.py: 1–8, each pooled alone and named to the LLM).
The page keeps one `CaseSlide` per ready slide, in the chat's order, and at most one more that is loading
or failed (`WebSession.pending_slide`): the strip shows them all, the chat only the ready ones. The
example case is a held-out case of the demo model's cohort (its slides: one with a lesion, the others without, as
the model was trained on cases), picked by a rule that never sees the model.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ChatEXAONEPathError

logger = logging.getLogger(__name__)

STRIP_THUMBNAIL_SIDE = 72  # pixels: a picture to tell slides apart, not to read them
EXAMPLE_CASE_SLIDES = 3  # the example case: enough to ask "which slide shows the lesion?", quick to load
STATUS_WORDS = {"loading": "loading …", "ready": "ready", "failed": "failed"}


@dataclass(eq=False)  # eq=False: compared (and found) by identity, like the LoadedSlide it shows
class CaseSlide:
    """One slide of a session's case: its file, where loading it stands, and what the page shows of it."""

    path: Path
    name: str  # as the page names it: the file's name inside its upload, never a server folder
    status: str = "loading"  # loading | ready | failed
    view: object | None = None  # its `SlideView` once ready
    outline: list | None = None  # the viewer's tissue outline, found once (publishing a slide again reuses it)
    thumbnail: str = ""  # a small PNG as a data URL, for the strip
    message: str = ""  # why it failed, one sentence
    joins: bool = False  # loaded to join the case (else to replace it)


def thumbnail_url(image: np.ndarray, side: int = STRIP_THUMBNAIL_SIDE) -> str:
    """A small PNG data URL of an (H, W, 3) uint8 image, its long side `side` pixels."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def strip_html(slides: list[CaseSlide], shown: int, adding: bool = False) -> str:
    """The case strip: one button per slide (thumbnail, number, name, status), the shown one marked; empty for a
    lone slide that is ready and not being added to (the page has nothing to switch between)."""
    if not slides or (len(slides) == 1 and slides[0].status == "ready" and not adding):
        return '<div class="cxp-case-strip" data-slides="0"></div>'
    items = []
    for i, slide in enumerate(slides):
        current = i == shown and slide.status == "ready"
        picture = (f'<img src="{slide.thumbnail}" alt="" width="{STRIP_THUMBNAIL_SIDE}">' if slide.thumbnail
                   else '<span class="cxp-case-blank"></span>')
        tip = slide.message or f"Slide {i + 1}: {slide.name} ({STATUS_WORDS.get(slide.status, slide.status)})"
        disabled = "" if slide.status == "ready" else " disabled"
        items.append(f'<button type="button" class="cxp-case-slide{" cxp-current" if current else ""}" '
                     f'data-slide="{i}" data-status="{slide.status}" aria-pressed="{str(current).lower()}" '
                     f'title="{html.escape(tip)}"{disabled}>{picture}<span class="cxp-case-name">'
                     f"<b>{i + 1}</b> {html.escape(slide.name)}</span><span class=\"cxp-case-status\">"
                     f"{STATUS_WORDS.get(slide.status, slide.status)}</span></button>")
    ready = sum(s.status == "ready" for s in slides)
    return (f'<div class="cxp-case-strip" data-slides="{len(slides)}" data-ready="{ready}" role="toolbar" '
            f'aria-label="The slides of this case">{"".join(items)}</div>')


# Runs once when the strip mounts: a click on a slide asks the server to show it, and the chat's evidence chips
# of another slide go through the same event (static/viewer.js calls `window.CXPCase.show`).
STRIP_JS = """
window.CXPCase = {show: (slide, goto) => trigger('select', {slide, goto: goto || null})};
element.addEventListener('click', (event) => {
  const button = event.target.closest && event.target.closest('.cxp-case-slide');
  if (button && !button.disabled) window.CXPCase.show(Number(button.dataset.slide), null);
});
"""


def example_case_slides(demo, count: int = EXAMPLE_CASE_SLIDES) -> list[Path]:
    """The example case of a demo build, by fixed rules that never see the model.

    When its cohort has cases (cases.csv): a held-out case with a lesion — the one holding the demo's example slide
    (itself chosen before any scoring) if one does, with as many slides as there are up to `count`, ties by case id
    — its slides in the case's order, as the model was trained and checked on it. Else (a cohort drawn before
    cases): the first `count` held-out slides, by id, of the first organ of its cohort that has at least two.
    """
    folder = Path(demo.folder) / "cohort"
    try:
        with open(folder / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ChatEXAONEPathError("The demo model's cohort has no labels, so it has no example case; rebuild the "
                                  "demo.") from e
    held_out_case = _held_out_case(folder, (demo.card.get("example") or {}).get("slide"), count)
    if held_out_case:
        return held_out_case
    organs = list(demo.card.get("organs") or []) or sorted({row.get("organ", "") for row in rows})
    for organ in organs:
        held_out = sorted(row["slide_id"] for row in rows if row.get("split") == "test" and row.get("organ") == organ)
        paths = [folder / "slides" / f"{slide_id}.tiff" for slide_id in held_out]
        paths = [path for path in paths if path.is_file()][:count]
        if len(paths) >= 2:
            return paths
    raise ChatEXAONEPathError("The demo model's cohort has no organ with two held-out slides, so it has no "
                              "example case.")


def _held_out_case(folder: Path, example_slide: str | None, count: int) -> list[Path]:
    """The slides of the held-out case `example_case_slides` offers, or [] when the cohort has no such case."""
    try:
        with open(folder / "cases.csv", newline="") as f:
            cases = [row for row in csv.DictReader(f) if row.get("split") == "test" and row.get("lesion_slide")]
    except OSError:
        return []
    candidates = []
    for row in cases:
        paths = [folder / "slides" / f"{slide_id}.tiff" for slide_id in row["slides"].split()]
        if 2 <= len(paths) <= count and all(path.is_file() for path in paths):
            holds_example = example_slide is not None and example_slide in row["slides"].split()
            candidates.append(((not holds_example, -len(paths), row["case_id"]), paths))
    return min(candidates, key=lambda c: c[0])[1] if candidates else []
