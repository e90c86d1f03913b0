"""RAIDER's log → training data: LLaVA-format instruction records, phase-1 captions, rejects, a summary.

Everything here is a pure function of the log, so the outputs can be rebuilt at any time (after
a kill, or with other grouping options) without asking the LLM again.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..constants import IMAGE_TOKEN, MAX_CASE_SLIDES
from ..fileio import atomic_write_json, atomic_write_jsonl
from .generate import CAPTION, CAPTION_INSTRUCTIONS, PROMPT_VERSION


@dataclass
class RecordOptions:
    """How answers become training records."""

    multi_turn: bool = False  # one conversation per slide instead of one record per question
    keep_not_mentioned: bool = False  # "not mentioned in the report" says nothing a slide shows
    cases: bool = False  # a report mapped to several slides gives case records (`image`: the list) instead of per-slide


@dataclass(frozen=True)
class OutputPaths:
    """The files `raider generate --out X.json` writes beside X.json."""

    instructions: Path
    captions: Path
    rejects: Path
    summary: Path
    log: Path

    @classmethod
    def for_out(cls, out: str | Path) -> "OutputPaths":
        """Sibling files named after the instructions file: X.captions.json, X.rejects.jsonl, …"""
        out = Path(out)
        stem = out.name.removesuffix(".jsonl").removesuffix(".json")
        return cls(out, out.with_name(f"{stem}.captions.json"), out.with_name(f"{stem}.rejects.jsonl"),
                   out.with_name(f"{stem}.summary.json"), out.with_name(f"{stem}.log.jsonl"))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _provenance(record: dict) -> dict:
    return {"report_id": record["report_id"], "report_version": record.get("report_version"),
            "chunks": record["chunks"], "backend": record["backend"],
            "prompt_version": record.get("prompt_version", PROMPT_VERSION), "attempts": len(record["attempts"])}


def _slides(report_id: str, slide_map: dict[str, list[str]] | None) -> list[str]:
    """A report's slides: from the ingest map, or the report id itself when there is no map."""
    return [report_id] if slide_map is None else slide_map.get(report_id, [])


def _subjects(report_id: str, slide_map: dict[str, list[str]] | None, cases: bool) -> list[tuple[str, str | list[str]]]:
    """What a report's records are about, as (id prefix, `image`): each of its slides, or with `cases` the
    whole case when it covers several (1–8, sorted; `image` the list, one `<image>` for it, as SlideChat ships)."""
    slides = sorted(_slides(report_id, slide_map))
    if cases and 1 < len(slides) <= MAX_CASE_SLIDES:
        return [(f"{report_id}:case", slides)]
    return [(slide, slide) for slide in slides]


def instruction_records(records: Iterable[dict], slide_map: dict[str, list[str]] | None = None,
                        options: RecordOptions | None = None, category_order: list[str] | None = None) -> list[dict]:
    """LLaVA records (`<image>\\n` + question → answer) for every accepted answer, per mapped slide."""
    options = options or RecordOptions()
    rank = {c: i for i, c in enumerate(category_order or [])}
    keep = {"ok", "not_mentioned"} if options.keep_not_mentioned else {"ok"}
    answers = sorted((r for r in records if r["category"] != CAPTION and r["status"] in keep),
                     key=lambda r: (r["report_id"], rank.get(r["category"], len(rank)), r["category"], r["question"]))
    per_slide: dict[str, list[dict]] = {}
    images: dict[str, str | list[str]] = {}
    for record in answers:
        for slide, image in _subjects(record["report_id"], slide_map, options.cases):
            per_slide.setdefault(slide, []).append(record)
            images[slide] = image
    out = []
    for slide in sorted(per_slide):
        group, image = per_slide[slide], images[slide]
        if options.multi_turn:
            conversations = []
            for i, record in enumerate(group):
                prefix = f"{IMAGE_TOKEN}\n" if i == 0 else ""
                conversations += [{"from": "human", "value": prefix + record["question"]},
                                  {"from": "gpt", "value": record["answer"]}]
            out.append({"id": f"{slide}:raider", "image": image, "conversations": conversations,
                        "categories": [r["category"] for r in group],
                        "provenance": [_provenance(r) for r in group]})
        else:
            out += [{"id": f"{slide}:{r['category']}:{_short_hash(r['question'])}", "image": image,
                     "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{r['question']}"},
                                       {"from": "gpt", "value": r["answer"]}],
                     "category": r["category"], "provenance": _provenance(r)} for r in group]
    return out


def caption_records(records: Iterable[dict], slide_map: dict[str, list[str]] | None = None,
                    cases: bool = False) -> list[dict]:
    """Phase-1 records: a caption instruction → the report's one-sentence summary, per mapped slide (or case)."""
    out = []
    for record in sorted((r for r in records if r["category"] == CAPTION and r["status"] == "ok"),
                         key=lambda r: r["report_id"]):
        for slide, image in _subjects(record["report_id"], slide_map, cases):
            instruction = CAPTION_INSTRUCTIONS[int(_short_hash(slide), 16) % len(CAPTION_INSTRUCTIONS)]
            out.append({"id": f"{slide}:caption", "image": image,
                        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{instruction}"},
                                          {"from": "gpt", "value": record["answer"]}],
                        "category": CAPTION, "provenance": _provenance(record)})
    return sorted(out, key=lambda r: r["id"])


def reject_records(records: Iterable[dict]) -> list[dict]:
    """Requests whose every attempt broke the rules, with each attempt's answer and reasons."""
    return [{"report_id": r["report_id"], "category": r["category"], "question": r["question"],
             "attempts": r["attempts"], "chunks": r["chunks"], "backend": r["backend"]}
            for r in sorted(records, key=lambda r: r["key"]) if r["status"] == "rejected"]


def summarize(records: list[dict], instructions: list[dict], captions: list[dict]) -> dict:
    """Counts per category (generated / not mentioned / rejected), and what was written."""
    per_category: dict[str, Counter] = {}
    for record in records:
        per_category.setdefault(record["category"], Counter())[record["status"]] += 1
    return {
        "requests": len(records),
        "reports": len({r["report_id"] for r in records}),
        "per_category": {c: {"generated": n["ok"], "not_mentioned": n["not_mentioned"], "rejected": n["rejected"]}
                         for c, n in sorted(per_category.items())},
        "generated": sum(r["status"] == "ok" for r in records),
        "not_mentioned": sum(r["status"] == "not_mentioned" for r in records),
        "rejected": sum(r["status"] == "rejected" for r in records),
        "retried": sum(len(r["attempts"]) > 1 for r in records),
        "instruction_records": len(instructions),
        "caption_records": len(captions),
        "prompt_version": PROMPT_VERSION,
    }


def write_outputs(paths: OutputPaths, records: list[dict], slide_map: dict[str, list[str]] | None,
                  options: RecordOptions, category_order: list[str], extra_summary: dict | None = None) -> dict:
    """Assemble and atomically write instructions, captions, rejects and the summary; returns the summary."""
    instructions = instruction_records(records, slide_map, options, category_order)
    captions = caption_records(records, slide_map, options.cases)
    for path, data in ((paths.instructions, instructions), (paths.captions, captions)):
        if path.suffix == ".jsonl":
            atomic_write_jsonl(path, data)
        else:
            atomic_write_json(path, data)
    atomic_write_jsonl(paths.rejects, reject_records(records))
    summary = summarize(records, instructions, captions) | (extra_summary or {})
    atomic_write_json(paths.summary, summary)
    return summary
