"""Verdict-injection hardening that does not depend on the judge: a deterministic pre-check and escaping.

The candidate answer is data. `precheck_flags` finds text addressed to the evaluator (instructions
to ignore the rubric, dictated verdicts, spoofed delimiters or chat roles) and empty answers; the
judge fails the criteria file's `precheck_criterion` and the answer for any flag, whatever the LLM
replies. `escape_block` keeps an answer from closing its delimited block in the prompt.
"""

from __future__ import annotations

import re
import unicodedata

# --- the deterministic pre-check ---------------------------------------------------------------------
# Instruction-like content a clinical answer never needs. Kept specific (an override verb needs a
# rubric-like object, a verdict word needs "criteria"/"this answer") so normal answers are not flagged.
_OBJECTS = r"(instructions?|rubric|criteria|criterion|rules|prompt|guidelines|system\s+prompt|the\s+above|everything\s+above)"
PRECHECK_PATTERNS: dict[str, re.Pattern] = {
    "injection:override": re.compile(
        r"\b(ignore|disregard|forget|override|bypass|skip)\b(\s+(all|any|the|your|these|those|previous|prior|above|"
        r"earlier|evaluation|grading|scoring|judging|other))*\s+" + _OBJECTS + r"|\bnew\s+instructions?\b", re.I),
    # Clinical text says "meets all criteria for ADH" and "evaluate the response to therapy"; those stay unflagged.
    "injection:verdict": re.compile(
        r"\b(all|every|each)\s+(of\s+the\s+)?(seven\s+|7\s+|evaluation\s+|judging\s+)?(criteria|criterion|checks?)\s+"
        r"(are\s+|is\s+|should\s+|must\s+|will\s+)?(be\s+)?(pass|passes|passed|true)\b"
        r"|\b(mark|rate|judge|label|accept|approve|grade|score)\s+(this|my)\s+(answer|response|output|reply)\b"
        r"|\b(mark|rate|judge|label|accept|approve)\s+the\s+(answer|output|reply)\b"
        r"|[\"']pass[\"']\s*:\s*(true|false)|\b(accepted|verdict)\s*[:=]\s*(true|yes|pass|accept)"
        r"|\b(respond|reply|output|return|print)\s+(only\s+)?(with\s+)?(the\s+)?(json|[\"']?pass[\"']?|accepted)\b", re.I),
    "injection:markup": re.compile(
        r"</?\s*(candidate_answer|answer|report|question|system|instructions?|user|assistant)\s*>|\[/?INST\]|"
        r"<<\s*/?SYS\s*>>|<\|[a-z_]+\|>|(^|\n)\s*(system|assistant|judge|evaluator|grader)\s*:", re.I),
    "injection:addressed": re.compile(
        r"\b(you\s+are|you're|act\s+as|acting\s+as)\s+(an?|the)\s+(ai\s+)?(judge|evaluator|grader|reviewer|assessor)\b"
        r"|\b(note|message|instructions?|reminder)\s+(to|for)\s+(the\s+)?(judge|evaluator|grader|reviewer|ai|model|"
        r"assistant|llm)\b|\b(dear|hey|attention)\s+(judge|evaluator|grader|reviewer)\b"
        r"|\b(judge|evaluator|grader)s?\s+(must|should|will|shall)\b|\brubric\b|\b(seven|7)\s+criteria\b", re.I),
}
_INVISIBLE = re.compile(r"[\u200b-\u200f\u2060-\u2064\ufeff]")


def precheck_flags(answer: str) -> list[str]:
    """Deterministic flags for an answer: `empty_answer`, or `injection:*` kinds of evaluator-directed text."""
    # NFKC folds look-alike letters (full-width, ligatures); zero-width characters would split keywords.
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", answer or ""))
    if not text.strip():
        return ["empty_answer"]
    return [name for name, pattern in PRECHECK_PATTERNS.items() if pattern.search(text)]


def escape_block(text: str) -> str:
    """Escape &, < and > so text inside a delimited block can never close it or open another."""
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
