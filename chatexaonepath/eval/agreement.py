"""Judge–human agreement: pathologists' grades (`human.jsonl`) beside the judge's verdicts.

Each grade is one reviewer's pass/fail per criterion and accept/reject for one answer, recorded
blind to the judge (review.py). Agreement is Cohen's κ with percent agreement and the four counts,
per criterion and for acceptance (the judge's under the run's rule against the reviewer's own
accept/reject), per reviewer and pooled over reviewers (each reviewer–answer pair one observation);
with two or more reviewers, their agreement with each other too. A grade made on an answer that has
since changed (its `answer_sha256` differs) is stale and left out, and counted.
"""

from __future__ import annotations

import hashlib
from itertools import combinations

from .data import JsonlLog
from .stats import agreement_table

HUMAN_FILE = "human.jsonl"


def answer_sha256(answer: str) -> str:
    """What a grade is tied to: the answer text it was made on."""
    return hashlib.sha256(answer.encode("utf-8")).hexdigest()


def latest_grades(log: JsonlLog) -> dict[tuple[str, str], dict]:
    """(reviewer, item id) → that reviewer's last grade of the item."""
    return {(str(r.get("reviewer")), str(r["id"])): r for r in log.records() if r.get("reviewer")}


def _pairs(first: dict[str, dict], second: dict[str, dict], ids: list[str], criteria_ids: list[str]) -> dict:
    """Agreement tables between two raters' {id: {"accepted", "criteria"}} on the ids both decided."""
    acceptance = [(first[i]["accepted"], second[i]["accepted"]) for i in ids
                  if first[i].get("accepted") is not None and second[i].get("accepted") is not None]
    per_criterion = {}
    for cid in criteria_ids:
        both = [(first[i]["criteria"].get(cid), (second[i].get("criteria") or {}).get(cid)) for i in ids]
        both = [(a, b) for a, b in both if a is not None and b is not None]
        per_criterion[cid] = agreement_table([a for a, _ in both], [b for _, b in both])
    return {"acceptance": agreement_table([a for a, _ in acceptance], [b for _, b in acceptance]),
            "criteria": per_criterion}


def compute_agreement(verdicts: dict[str, dict], answers: dict[str, str], grades: dict[tuple[str, str], dict],
                      criteria_ids: list[str]) -> dict | None:
    """`human_agreement` of summary.json; None when nobody has graded yet."""
    if not grades:
        return None
    judge = {i: {"accepted": v.get("accepted"),
                 "criteria": {c: (v.get("criteria") or {}).get(c, {}).get("pass") for c in criteria_ids}}
             for i, v in verdicts.items()}
    by_reviewer: dict[str, dict[str, dict]] = {}
    stale = 0
    for (reviewer, item_id), grade in grades.items():
        if item_id not in answers:
            continue
        if grade.get("answer_sha256") != answer_sha256(answers[item_id]):
            stale += 1
            continue
        by_reviewer.setdefault(reviewer, {})[item_id] = {
            "accepted": grade.get("accepted"), "criteria": {c: (grade.get("criteria") or {}).get(c) for c in criteria_ids}}
    if not by_reviewer:
        return {"reviewers": {}, "n_stale": stale, "pooled": None, "by_reviewer": {}, "between_reviewers": {}}
    result = {"reviewers": {r: len(g) for r, g in sorted(by_reviewer.items())}, "n_stale": stale,
              "n_items_graded": len({i for g in by_reviewer.values() for i in g}), "by_reviewer": {},
              "between_reviewers": {}}
    pooled_judge, pooled_human = {}, {}
    for reviewer, graded in sorted(by_reviewer.items()):
        ids = [i for i in graded if i in judge]
        result["by_reviewer"][reviewer] = _pairs(judge, graded, ids, criteria_ids)
        pooled_judge.update({f"{reviewer}\x00{i}": judge[i] for i in ids})
        pooled_human.update({f"{reviewer}\x00{i}": graded[i] for i in ids})
    result["pooled"] = _pairs(pooled_judge, pooled_human, list(pooled_judge), criteria_ids)
    humans = [g["accepted"] for graded in by_reviewer.values() for g in graded.values() if g["accepted"] is not None]
    result["human_acceptance_rate"] = sum(humans) / len(humans) if humans else None
    for a, b in combinations(sorted(by_reviewer), 2):
        common = [i for i in by_reviewer[a] if i in by_reviewer[b]]
        result["between_reviewers"][f"{a} vs {b}"] = _pairs(by_reviewer[a], by_reviewer[b], common, criteria_ids)
    return result


def _kappa(table: dict | None) -> str:
    if not table or not table["n"]:
        return "–"
    return "undefined" if table["kappa"] is None else f"{table['kappa']:.2f}"


def _row(name: str, t: dict) -> str:
    agree = "–" if t["percent_agreement"] is None else f"{100 * t['percent_agreement']:.1f}%"
    return (f"| {name} | {t['n']} | {_kappa(t)} | {agree} | {t['both_yes']} | {t['first_only']} | {t['second_only']} "
            f"| {t['both_no']} |")


def agreement_markdown(agreement: dict | None, rule: str) -> list[str]:
    """report.md's judge–human section: κ per criterion and for acceptance, pooled and per reviewer."""
    if not agreement or not agreement.get("pooled"):
        return []
    reviewers = ", ".join(f"{r} ({n})" for r, n in agreement["reviewers"].items())
    human = agreement.get("human_acceptance_rate")
    lines = ["## Judge–human agreement", "",
             f"Reviewers (answers graded, blind to the judge): {reviewers}; human acceptance "
             f"{'–' if human is None else f'{100 * human:.1f}%'}; stale grades (answer changed since) left out: "
             f"{agreement['n_stale']}. κ is Cohen's kappa (undefined when both raters gave one same value to every "
             "answer).", "",
             f"| pooled over reviewers | n | κ | agreement | both pass | judge only | human only | both fail |",
             "|---|---|---|---|---|---|---|---|"]
    pooled = agreement["pooled"]
    lines.append(_row(f"acceptance (judge under rule `{rule}`)", pooled["acceptance"]))
    lines += [_row(f"`{cid}`", t) for cid, t in pooled["criteria"].items()]
    lines += ["", f"| reviewer | κ acceptance (rule `{rule}`) | " + " | ".join(f"κ `{c}`" for c in pooled["criteria"])
              + " |", "|---|---|" + "---|" * len(pooled["criteria"])]
    for reviewer, tables in agreement["by_reviewer"].items():
        lines.append(f"| {reviewer} | {_kappa(tables['acceptance'])} | "
                     + " | ".join(_kappa(tables["criteria"].get(c)) for c in pooled["criteria"]) + " |")
    for pair, tables in agreement.get("between_reviewers", {}).items():
        lines.append(f"| between reviewers: {pair} | {_kappa(tables['acceptance'])} | "
                     + " | ".join(_kappa(tables["criteria"].get(c)) for c in pooled["criteria"]) + " |")
    return lines + [""]
