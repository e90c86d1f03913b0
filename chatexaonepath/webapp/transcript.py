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
    lines += [f"- Slide: {_inline(name)}, {size}", f"- Saved: {time.strftime('%Y-%m-%d %H:%M %Z')}"]
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
            about = "the whole slide" if region is None else f"a region of {wording.region_text(region, mpp)} " \
                                                             f"({wording.region_pixels(region)})"
            lines += [f"## {number}. Question about {about}", "", _quoted(turn.content), ""]
            continue
        stopped = " *(stopped)*" if i in session.stopped_turns else ""
        lines += ["**Answer**" + stopped, "", turn.content.strip() or "*(no text)*", ""]
        evidence = turn.evidence if isinstance(turn, SlideTurn) else ()
        if evidence:
            lines += _evidence_table(evidence, mpp)
    if number == 0:
        lines += ["*No question has been asked yet.*", ""]
    return "\n".join(lines)


def _evidence_table(evidence, mpp: float | None) -> list[str]:
    rows = ["Evidence — the patches that weighed most in this answer:", "",
            "| # | centre | size | share | pooling weight | full-resolution pixels (x, y, side) |",
            "|---|---|---|---|---|---|"]
    for e in evidence:
        half = e.size / 2
        centre = wording.position(e.x + half, e.y + half, mpp) if mpp else "?"
        size = f"{wording.length(e.size * mpp)} square" if mpp else "?"
        rows.append(f"| {e.rank} | {centre} | {size} | {wording.share(e.weight)} | {e.weight:.4g} | "
                    f"{e.x:,}, {e.y:,}, {e.size:,} |")
    return rows + [""]


def _inline(text: str) -> str:
    """Text for one Markdown line: no line breaks, no table pipes."""
    return " ".join(str(text).split()).replace("|", "/")


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" if line.strip() else ">" for line in text.strip().splitlines()) or ">"
