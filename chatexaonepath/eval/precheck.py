"""Verdict-injection hardening that does not depend on the judge: a deterministic pre-check and escaping.

The candidate answer is data. `precheck_flags` runs the shared steering detector
(`chatexaonepath/injection.py`, the same one RAIDER runs on reports) with the evaluator as the
audience: instructions to ignore or override the rubric, dictated verdicts and verdict-shaped JSON,
text addressed to the evaluator, chat or block markup, words that mix scripts — in English, French,
Spanish, German, Korean, Chinese and Japanese, after folding look-alike letters. The judge fails the
criteria file's `precheck_criterion` and the answer for any flag, whatever the LLM replies.
`escape_block` keeps an answer from writing markup into its block of the prompt.
"""

from __future__ import annotations

from ..injection import injection_kinds, skeleton


def precheck_flags(answer: str) -> list[str]:
    """Deterministic flags for an answer: `empty_answer`, or `injection:<kind>` for each kind of steering found."""
    if not skeleton(answer or "").strip():
        return ["empty_answer"]
    return [f"injection:{kind}" for kind in injection_kinds(answer, "evaluator")]


def escape_block(text: str) -> str:
    """Escape &, < and > so text inside a delimited block can never write markup of its own."""
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
