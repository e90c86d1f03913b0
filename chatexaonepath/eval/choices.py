"""Closed-ended questions: the options inside a question, and the choice inside a free-text answer.

Options are read as benchmarks ship them: `A) … B) … C) … D) …` inline (WSI-Bench), one per line,
`(A) …`, `A. …` or `A: …`. A model's answer is read for, in order of trust:
  1. an explicit statement — "The answer is C", "Answer: (B)", "option D";
  2. the letter itself — "C", "C)", "(C) Squamous cell carcinoma", "**B.** Moderately …";
  3. the text of one option — "Squamous cell carcinoma, keratinizing type" (an option contained in a
     longer matched option does not count; an option named after "not" or "rather than" does not count);
  4. for yes/no questions, yes/no (or true/false), the first word deciding when both appear.
Two different letters at the same level of trust, or several options' texts, are ambiguous: the
answer is unparsed, counted wrong and listed — a parser that guessed would flatter a model that
lists every option. A letter is only a letter when it is marked as one: the article in "A tumour
with glands" is not option A.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

LETTERS = "ABCDEFGH"
YES, NO = "Yes", "No"
# An option marker: A) (A) A. A: at the start or after whitespace/punctuation, followed by its text.
_MARKER = re.compile(r"(?:^|(?<=[\s?:;,.]))\(?([A-H])[).:](?=\s|$)")
_EXPLICIT = re.compile(
    r"\b(?i:answer|option|choice)\b(?:[^.?!\n]{0,40}?\b(?i:is|be)\b|\s*[:=\-])?\s*[:\-]?\s*\(?"
    r"([A-H])\b(?![’'-]\w)")
_ALSO = re.compile(r"^\)?\s*(?:,|/|\bor\b|\band\b)\s*\(?([A-H])\b")  # "B or C": two letters, not one
_LEADING = re.compile(r"^\W{0,3}([A-H])(?:\s*[).:,\-]|\s*$)")
_ALONE = re.compile(r"^\W{0,3}([a-h])\W{0,3}$")  # a bare lower-case letter is still a letter
_ANYWHERE = re.compile(r"(?:^|(?<=[\s(\[]))\(?([A-H])\)(?=\W|$)")
_NEGATION = re.compile(r"(?:\bnot|\bno|\bnon|rather than|rule[sd]? out|excluding|instead of|unlike)\W+(?:\w+\W+){0,2}$")
_YES_WORDS = {"yes": YES, "true": YES, "no": NO, "false": NO}


@dataclass(frozen=True)
class Choice:
    """What an answer chose (`choice`: a letter, "Yes" or "No", or None) and how it was read."""

    choice: str | None
    how: str  # explicit | letter | option text | yes/no | or why nothing was chosen


def split_options(question: str) -> tuple[str, dict[str, str]]:
    """(question stem, {letter: option text}) of a question listing lettered options; ({}) when it lists none.

    The options are the longest run of markers A, B, C… in order (at least two); a stray "B)" before
    them or inside an option's text does not start or break the run.
    """
    matches = list(_MARKER.finditer(question))
    best: list[re.Match] = []
    for start_index, first in enumerate(matches):
        if first.group(1) != "A":
            continue
        chain, position = [first], first.end()
        for letter in LETTERS[1:]:
            following = next((m for m in matches[start_index + 1:] if m.group(1) == letter and m.start() >= position),
                              None)
            if following is None:
                break
            chain.append(following)
            position = following.end()
        if len(chain) >= max(2, len(best)):
            best = chain
    if len(best) < 2:
        return question.strip(), {}
    options = {}
    for marker, following in zip(best, best[1:] + [None]):
        end = following.start() if following is not None else len(question)
        options[marker.group(1)] = question[marker.end():end].strip()
    if any(not text for text in options.values()):
        return question.strip(), {}
    return question[:best[0].start()].strip(), options


def normalize(text: str) -> str:
    """Lower case, accents and punctuation dropped, whitespace collapsed: for comparing option texts."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def _clean(answer: str) -> str:
    # Markdown emphasis and code marks carry no meaning for the choice.
    return re.sub(r"[*_`]+", "", answer or "").strip()


def _letters(pattern: re.Pattern, text: str, options: dict[str, str]) -> set[str]:
    found = set()
    for match in pattern.finditer(text):
        # "A" followed by a lower-case word is the article ("the answer is a tumour…"), not option A.
        if match.group(1) == "A" and re.match(r"\s+[a-z]", text[match.end():]):
            continue
        found.add(match.group(1))
        if pattern is _EXPLICIT and (also := _ALSO.match(text[match.end():])):
            found.add(also.group(1))
    return found & set(options)


def extract_choice(answer: str, options: dict[str, str]) -> Choice:
    """The option an answer chose; `options` is {letter: text}, or {"Yes": "Yes", "No": "No"} for yes/no."""
    text = _clean(answer)
    if not text:
        return Choice(None, "empty answer")
    if set(options) == {YES, NO}:
        return _yes_no(text)
    explicit = _letters(_EXPLICIT, text, options)
    if len(explicit) == 1:
        return Choice(explicit.pop(), "explicit")
    if len(explicit) > 1:
        return Choice(None, f"ambiguous: {', '.join(sorted(explicit))}")
    alone = _ALONE.match(text)
    marked = {alone.group(1).upper()} & set(options) if alone else \
        _letters(_LEADING, text, options) | _letters(_ANYWHERE, text, options)
    if len(marked) == 1:
        return Choice(marked.pop(), "letter")
    if len(marked) > 1:
        return Choice(None, f"ambiguous: {', '.join(sorted(marked))}")
    return _by_option_text(text, options)


def _by_option_text(text: str, options: dict[str, str]) -> Choice:
    said = normalize(text)
    texts = {letter: normalize(option) for letter, option in options.items()}
    exact = [letter for letter, option in texts.items() if option and option == said]
    if len(exact) == 1:
        return Choice(exact[0], "option text")
    named = []
    for letter, option in texts.items():
        if not option:
            continue
        for match in re.finditer(rf"(?:^|(?<=\s)){re.escape(option)}(?=\s|$)", said):
            if not _NEGATION.search(said[:match.start()]):
                named.append(letter)
                break
    # "squamous cell carcinoma" inside "squamous cell carcinoma keratinizing type": the longer one was meant.
    named = [a for a in named if not any(a != b and texts[a] in texts[b] for b in named)]
    if len(named) == 1:
        return Choice(named[0], "option text")
    if len(named) > 1:
        return Choice(None, f"ambiguous: {', '.join(sorted(named))}")
    inside = [letter for letter, option in texts.items() if len(said.split()) >= 2 and f" {said} " in f" {option} "]
    if len(inside) == 1:  # a distinctive part of one option ("keratinizing type")
        return Choice(inside[0], "option text")
    return Choice(None, "no option found" if not inside else f"ambiguous: {', '.join(sorted(inside))}")


def _yes_no(text: str) -> Choice:
    words = normalize(text).split()
    if words and words[0] in _YES_WORDS:
        return Choice(_YES_WORDS[words[0]], "yes/no")
    found = {_YES_WORDS[w] for w in words if w in _YES_WORDS}
    if len(found) == 1:
        return Choice(found.pop(), "yes/no")
    return Choice(None, "ambiguous: yes and no" if found else "no yes/no found")


def yes_no_answer(reference: str) -> str | None:
    """"Yes" / "No" for a reference answer that is one (with punctuation or True/False), else None."""
    words = normalize(reference).split()
    return _YES_WORDS.get(words[0]) if len(words) == 1 and words[0] in ("yes", "no", "true", "false") else None


def letter_answer(reference: str, options: dict[str, str]) -> str | None:
    """The letter a reference answer names — "C", "C)", "(C)", "C. Squamous…", or exactly one option's text."""
    text = _clean(reference)
    match = re.fullmatch(r"\(?([A-H])\)?[.:]?|\(?([A-H])[).:]\s+.+", text, re.S)
    letter = match and (match.group(1) or match.group(2))
    if letter and letter in options:
        return letter
    said = normalize(text)
    exact = [letter for letter, option in options.items() if normalize(option) == said]
    return exact[0] if len(exact) == 1 else None
