"""Scripted judges behind a real OpenAI-compatible HTTP server on 127.0.0.1, and small answer sets."""

from __future__ import annotations

import json
import re

from chatexaonepath.eval.criteria import load_criteria

IDS = load_criteria().ids
REPORT = ("FINAL DIAGNOSIS: Left breast, core biopsy: invasive ductal carcinoma, Nottingham grade 2. "
          "No lymphovascular invasion is identified.")


def block(messages: list[dict], name: str) -> str:
    """The text of the data block `name` in a judge prompt (still escaped), fenced by its per-call boundary."""
    match = re.search(rf"<<<BEGIN {name} (DATA-[0-9A-F]+)>>>\n(.*?)\n<<<END {name} \1>>>", messages[1]["content"], re.S)
    return match.group(2) if match else ""


def boundary(messages: list[dict]) -> str:
    """The random boundary code of a judge prompt."""
    return re.search(r"<<<BEGIN report (DATA-[0-9A-F]+)>>>", messages[1]["content"]).group(1)


def asked_ids(messages: list[dict]) -> list[str]:
    """The criterion ids a judge prompt asks about."""
    return re.search(r"Judge the candidate answer on: (.*?)\.\n", messages[1]["content"]).group(1).split(", ")


def verdict(ids, passed=True, fences=True, reasoning=True, addresses=False) -> str:
    """A well-formed judge reply: reasoning lines, then the JSON verdict in a fenced block."""
    passes = passed if isinstance(passed, dict) else {i: passed for i in ids}
    body = json.dumps({**{i: {"reason": f"{i} checked.", "pass": passes[i]} for i in ids},
                       "addresses_evaluator": addresses})
    lines = [f"{i}: looks {'fine' if passes[i] else 'wrong'}." for i in ids] if reasoning else []
    return "\n".join(lines + ([f"```json\n{body}\n```"] if fences else [body]))


def keyword_judge(messages: list[dict]) -> str:
    """A plausible judge: an answer passes every criterion when it says 'carcinoma', else fails the first four."""
    ids = asked_ids(messages)
    good = "carcinoma" in block(messages, "candidate_answer").lower()
    return verdict(ids, {i: good or i not in IDS[:4] for i in ids})


def write_answers(path, answers: list[str], **extra) -> list[str]:
    """An answers JSONL (id, question, answer, report) for `eval judge`; returns the ids."""
    ids = [f"q{i}" for i in range(len(answers))]
    with open(path, "w") as f:
        for i, answer in zip(ids, answers):
            f.write(json.dumps({"id": i, "question": "What is the diagnosis?", "answer": answer, "report": REPORT,
                                **extra}) + "\n")
    return ids
