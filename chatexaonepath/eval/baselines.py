"""How much the slide matters: the blind and shuffled baselines and the model − baseline differences.

Many benchmark questions can be answered from their text alone (WSI-Bench's prognosis questions
spell out the diagnosis, stage and IHC). Asking every question again with no visual tokens (`blind`:
the LLM alone, same prompt otherwise) and with another test slide's tokens (`shuffled`) measures it:
*slide dependence* is accuracy (or acceptance) with the slide minus without it, paired on the same
questions, with an interval that resamples slides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..patients import patient_id
from .criteria import EvalError
from .stats import cluster_bootstrap

BASELINES = ("blind", "shuffled")


def parse_baselines(text: str | Sequence[str] | None) -> list[str]:
    """`blind,shuffled` (or a list) → the baselines asked for, in a fixed order; unknown names raise EvalError."""
    if not text:
        return []
    names = [n.strip().lower() for part in ([text] if isinstance(text, str) else text) for n in part.split(",")]
    unknown = sorted({n for n in names if n and n not in BASELINES})
    if unknown:
        raise EvalError(f"Unknown baseline(s) {', '.join(unknown)}; use blind, shuffled or blind,shuffled.")
    return [b for b in BASELINES if b in names]


def slide_derangement(features: Sequence[Path], patient_map: Mapping[str, str] | None = None) -> dict[Path, Path]:
    """Each test slide → another test slide whose tokens stand in for it in the `shuffled` baseline.

    Fixed (no randomness): slides are ordered by patient, then rotated by the largest patient's slide
    count, so a slide is replaced by another patient's slide whenever no patient owns more than half of
    them (two slides of one patient look alike and would understate what the slide adds).
    """
    slides = sorted(set(features), key=lambda p: (patient_id(p.stem, patient_map), str(p)))
    if len(slides) < 2:
        raise EvalError("The shuffled baseline needs at least two test slides; this test set has "
                        f"{len(slides)}. Drop 'shuffled' from --baselines.")
    largest = max(sum(1 for q in slides if patient_id(q.stem, patient_map) == patient_id(p.stem, patient_map))
                  for p in slides)
    shift = largest if largest < len(slides) else 1
    return {slide: slides[(i + shift) % len(slides)] for i, slide in enumerate(slides)}


def item_slides(item) -> tuple[Path, ...]:
    """The features of every slide an item asks about: its case's (`case_features`), else its one slide's."""
    return tuple(getattr(item, "case_features", ()) or ()) or ((item.features,) if item.features is not None else ())


def item_source(item) -> Path | tuple[Path, ...] | None:
    """What an item's answer is made from: its slide's features, or for a case the tuple of its slides'."""
    slides = item_slides(item)
    return slides if len(slides) > 1 else (slides[0] if slides else None)


def case_derangement(items: Sequence, patient_map: Mapping[str, str] | None = None) -> dict:
    """Each item's source (`item_source`) → another one's, for the `shuffled` baseline: whole cases are swapped.

    Single slides are deranged as `slide_derangement` does; a case is replaced by another case of as many
    slides (its prompt names that many), ordered and rotated the same way by its first slide's patient.
    """
    sources = {item_source(item) for item in items if item_source(item) is not None}
    singles = [s for s in sources if isinstance(s, Path)]
    swap: dict = slide_derangement(singles, patient_map) if singles else {}
    for size in sorted({len(s) for s in sources if isinstance(s, tuple)}):
        cases = [s for s in sources if isinstance(s, tuple) and len(s) == size]
        if len(cases) < 2:
            raise EvalError(f"The shuffled baseline swaps whole cases, and this test set has only one case of {size} "
                            "slides; drop 'shuffled' from --baselines or add cases of that size.")
        firsts = slide_derangement([c[0] for c in cases], patient_map)
        by_first = {c[0]: c for c in cases}
        swap.update({case: by_first[firsts[case[0]]] for case in cases})
    return swap


def paired_difference(with_slide: Mapping[str, float], without: Mapping[str, float], slides: Mapping[str, str],
                      groups: Mapping[str, str | None] | None = None) -> dict:
    """mean(with) − mean(without) over the items scored in both, overall and per group, each with a
    slide-clustered 95% interval: {"overall": {"difference", "ci95", "n", "with", "without"}, "by_group": …}."""
    common = [i for i in with_slide if i in without]

    def one(ids: list[str]) -> dict:
        if not ids:
            return {"difference": None, "ci95": None, "n": 0, "with": None, "without": None}
        a, b = [with_slide[i] for i in ids], [without[i] for i in ids]
        interval = cluster_bootstrap(a, [slides.get(i) or i for i in ids], paired=b)
        return {"difference": sum(a) / len(a) - sum(b) / len(b), "ci95": list(interval) if interval else None,
                "n": len(ids), "with": sum(a) / len(a), "without": sum(b) / len(b)}

    out = {"overall": one(common), "by_group": {}}
    if groups:
        names = sorted({groups[i] for i in common if groups.get(i)})
        out["by_group"] = {name: one([i for i in common if groups.get(i) == name]) for name in names}
    return out
