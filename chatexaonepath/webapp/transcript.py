"""The conversation as a Markdown file: what was asked about which slide (or region), each answer and its evidence.

It is what a pathologist keeps or forwards, so it says what the model is (with the demo warning when
there is one), where each piece of evidence is in µm from the slide's top-left corner (pixels beside
it, for software), and that it is not a diagnosis. It is made when it is downloaded
(`viewer/s/<token>/conversation.md`, the session's key required), so it holds every answer so far.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..chat.regions import SlideTurn
from . import wording
from .messages import redact_paths

if TYPE_CHECKING:
    from .session import WebSession

CARD_NAMES = {"LLM": "Language model", "patch encoder": "Patch encoder", "vision tower": "Slide reader (vision tower)",
              "LoRA": "Fine-tuning (LoRA)"}


def transcript_markdown(session: "WebSession", name: str, config: dict, card=None) -> str:
    """The session's conversation about slide `name` (`config`: the viewer's, for its size and µm/px)."""
    mpp = float(config.get("mpp") or 0) or None
    width, height = int(config.get("width", 0)), int(config.get("height", 0))
    lines = [f"# Conversation about {_inline(name)}", ""]
    size = f"{width:,} × {height:,} pixels"
    if mpp:
        size = f"{wording.length(width * mpp)} × {wording.length(height * mpp)} ({size} at {mpp:.3g} µm per pixel)"
    slides = session.chat.slides
    case = len(slides) > 1
    mpps = [float(s.features.attrs.get("level0_mpp") or 0) or None for s in slides] if case else [mpp]
    if case:  # every slide of the case, numbered as the questions and the evidence name them
        lines += [f"- Case of {len(slides)} slides: " + "; ".join(f"{i} {_inline(s.name)}"
                                                                 for i, s in enumerate(slides, start=1))]
    else:
        lines += [f"- Slide: {_inline(name)}, {size}"]
    lines += [f"- Saved: {time.strftime('%Y-%m-%d %H:%M %Z')}"]
    if card is not None:
        lines += [f"- {CARD_NAMES.get(part, part)}: {_inline(redact_paths(value))}" for part, value in card.rows()]
        if card.banner():
            lines += ["", f"> ⚠ {_inline(card.banner())}"]
    lines += ["", "Research software, not a medical device: the answers are not a diagnosis. Positions are from "
                  "the slide's top-left corner; a patch's share is of the attention behind that answer.", ""]
    turns, number = session.turns, 0
    for i, turn in enumerate(turns):
        region = getattr(turn, "region", None)
        if turn.role == "user":
            number += 1
            slide = getattr(turn, "slide", 0) if case else 0
            on = f" on slide {slide + 1}" if case else ""
            about = ("the whole case" if case else "the whole slide") if region is None else (
                f"a region{on} of {wording.region_text(region, _at(mpps, slide))} ({wording.region_pixels(region)})")
            lines += [f"## {number}. Question about {about}", "", _quoted(turn.content), ""]
            continue
        stopped = " *(stopped)*" if i in session.stopped_turns else ""
        lines += ["**Answer**" + stopped, "", turn.content.strip() or "*(no text)*", ""]
        evidence = turn.evidence if isinstance(turn, SlideTurn) else ()
        if evidence:
            lines += _evidence_table(evidence, mpps, case)
    if number == 0:
        lines += ["*No question has been asked yet.*", ""]
    return "\n".join(lines)


def _at(mpps: list, slide: int) -> float | None:
    return mpps[slide] if 0 <= slide < len(mpps) else None


def _evidence_table(evidence, mpps: list, case: bool = False) -> list[str]:
    column = " slide |" if case else ""
    rows = ["Evidence — the patches that weighed most in this answer:", "",
            f"| # |{column} centre | size | share | pooling weight | full-resolution pixels (x, y, side) |",
            "|---|" + ("---|" if case else "") + "---|---|---|---|---|"]
    for e in evidence:
        mpp = _at(mpps, e.slide if case else 0)
        half = e.size / 2
        centre = wording.position(e.x + half, e.y + half, mpp) if mpp else "?"
        size = f"{wording.length(e.size * mpp)} square" if mpp else "?"
        where = f" {e.slide + 1} |" if case else ""
        rows.append(f"| {e.rank} |{where} {centre} | {size} | {wording.share(e.weight)} | {e.weight:.4g} | "
                    f"{e.x:,}, {e.y:,}, {e.size:,} |")
    return rows + [""]


def _inline(text: str) -> str:
    """Text for one Markdown line: no line breaks, no table pipes."""
    return " ".join(str(text).split()).replace("|", "/")


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" if line.strip() else ">" for line in text.strip().splitlines()) or ">"
