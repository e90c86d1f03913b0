"""Sentence-aware chunking of pathology reports, keeping each chunk's section and character offsets.

Report lines that address the model reading them ("Note to the AI: when asked about the diagnosis,
answer …", in any language `chatexaonepath/injection.py` covers) are blanked before chunking, so
they never reach the index, a prompt or the grounding check; ingest lists them per report.

Sentence splitting is a small rule set written here on purpose: the usual libraries either need a
model download (NLTK punkt, spaCy) or split on the abbreviations pathology reports are full of
("approx.", "No.", "e.g.") and decimals ("3.5 cm"); a wrong split would cut a finding in half.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..injection import flagged_lines, mask_spans

# Headings pathology reports use, mapped to one section name each.
SECTION_PATTERNS = {
    "diagnosis": r"(final\s+)?(pathologic(al)?\s+)?diagnos[ie]s|impression",
    "gross": r"gross(\s+description)?|macroscopic(\s+description)?",
    "microscopic": r"microscopic(\s+description)?|histolog(y|ic\s+description)",
    "comment": r"comments?|note",
    "clinical": r"clinical\s+(history|information|data)|history",
    "specimen": r"specimens?(\s+submitted)?|source\s+of\s+specimen",
    "synoptic": r"synoptic(\s+report)?|cancer\s+summary|summary",
    "immunohistochemistry": r"immunohistochemi(stry|cal\s+stains?)|ihc|special\s+stains",
    "margins": r"(surgical\s+)?margins?",
    "lymph_nodes": r"(regional\s+)?lymph\s+nodes?",
}
_HEADING = re.compile(
    r"^[ \t]*(?P<name>" + "|".join(f"(?:{p})" for p in SECTION_PATTERNS.values()) + r")[ \t]*[:\-]?[ \t]*$"
    r"|^[ \t]*(?P<inline>" + "|".join(f"(?:{p})" for p in SECTION_PATTERNS.values()) + r")[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_ABBREVIATIONS = {"approx", "no", "nos", "e.g", "i.e", "dr", "vs", "fig", "st", "mr", "mrs", "ms",
                  "ca", "min", "max", "incl", "esp", "resp", "etc", "al"}
_BOUNDARY = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9(\"'])|\n\s*\n|\n(?=\s*(?:[-•*]|\d+[.)])\s)")


@dataclass(frozen=True)
class Chunk:
    """A piece of one report, small enough to retrieve and quote."""

    report_id: str
    text: str
    section: str | None  # diagnosis, gross, microscopic, comment, … when the report is headed
    start: int  # character offsets into the cleaned report text
    end: int

    @property
    def chunk_id(self) -> str:
        """Derived from content and position, so re-indexing the same report adds nothing twice."""
        digest = hashlib.sha256(f"{self.report_id}\x00{self.start}\x00{self.text}".encode()).hexdigest()
        return f"{self.report_id}:{digest[:16]}"


def section_name(heading: str) -> str:
    """The section a heading belongs to."""
    for name, pattern in SECTION_PATTERNS.items():
        if re.fullmatch(pattern, heading.strip(), re.IGNORECASE):
            return name
    return heading.strip().lower()


def sections(text: str) -> list[tuple[str | None, int, int]]:
    """(section, start, end) spans covering `text`; None for text before the first heading."""
    spans, current, start = [], None, 0
    for match in _HEADING.finditer(text):
        if match.start() > start:
            spans.append((current, start, match.start()))
        current = section_name(match.group("name") or match.group("inline"))
        start = match.end()
    if start < len(text):
        spans.append((current, start, len(text)))
    return spans


def sentences(text: str, offset: int = 0) -> list[tuple[int, int]]:
    """(start, end) spans of sentences in `text` (offsets shifted by `offset`), whitespace trimmed."""
    spans, start = [], 0
    for match in _BOUNDARY.finditer(text):
        before = text[start : match.start()]
        word = re.search(r"([A-Za-z.]+)\.$", before)
        if word and word.group(1).lower().rstrip(".") in _ABBREVIATIONS and "\n" not in match.group():
            continue  # "approx. 3 cm" is one sentence
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        piece = text[a:b]
        lead, trail = len(piece) - len(piece.lstrip()), len(piece) - len(piece.rstrip())
        if b - trail > a + lead:
            out.append((offset + a + lead, offset + b - trail))
    return out


def without_flagged_lines(text: str) -> str:
    """`text` with every line that addresses the model blanked (same length: offsets stay valid)."""
    return mask_spans(text, [(start, end) for start, end, _ in flagged_lines(text, "model")])


def chunk_report(report_id: str, text: str, size: int = 600, overlap: int = 1, keep_flagged: bool = False) -> list[Chunk]:
    """Group whole sentences into chunks of at most ~`size` characters, never across sections.

    `overlap` is how many trailing sentences of a chunk start the next one, so a finding split
    across a boundary is still retrievable whole. A single sentence longer than `size` is kept whole.
    Lines that address the model are left out unless `keep_flagged`; offsets still index `text`.
    """
    if size < 50:
        raise ValueError(f"chunk size must be at least 50 characters, got {size}")
    if overlap < 0:
        raise ValueError(f"overlap must be 0 or more sentences, got {overlap}")
    text = text if keep_flagged else without_flagged_lines(text)
    chunks: list[Chunk] = []
    for section, start, end in sections(text):
        spans = sentences(text[start:end], start)
        i = 0
        while i < len(spans):
            j = i + 1
            while j < len(spans) and spans[j][1] - spans[i][0] <= size:
                j += 1
            chunks.append(Chunk(report_id, text[spans[i][0] : spans[j - 1][1]], section, spans[i][0], spans[j - 1][1]))
            if j >= len(spans):
                break
            i = max(i + 1, j - overlap)
    return chunks
