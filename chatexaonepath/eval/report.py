"""What a judged run found: `summary.json`, `report.md` and the per-criterion chart.

The acceptance rate counts only answers the judge decided (accepted true or false); undecided ones
(a judge error on a criterion the rule needs) are counted and shown in their own column, never
folded into the rate. Its 95% interval is a percentile bootstrap that resamples *slides* (several
questions about one slide are not independent); Wilson's interval is given beside it. Every table
that shows acceptance names the rule it applied. Charts are drawn on matplotlib `Figure` objects
with the Agg canvas, never through pyplot, and written atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from ..fileio import atomic_write_json, atomic_write_text, temp_beside
from .criteria import AcceptanceRule, CriteriaSet
from .stats import BOOTSTRAP_RESAMPLES, LEVEL, cluster_bootstrap, wilson_interval

logger = logging.getLogger(__name__)

CHART = "criteria.png"
RULES_SHOWN = ("all", "major")  # the paper's rule is closest to `all` (docs/evaluation.md)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def acceptance(verdicts: list[dict]) -> dict:
    """n, decided, accepted, undecided, rate and its slide-clustered interval of some verdict records."""
    judged = [v for v in verdicts if v.get("accepted") is not None]
    accepted = sum(1 for v in judged if v["accepted"])
    interval = cluster_bootstrap([float(bool(v["accepted"])) for v in judged],
                                 [v.get("slide") or v["id"] for v in judged]) if judged else None
    return {"n": len(verdicts), "n_judged": len(judged), "n_accepted": accepted,
            "n_undecided": len(verdicts) - len(judged), "acceptance_rate": _rate(accepted, len(judged)),
            "acceptance_ci95": list(interval) if interval else None}


def _breakdown(verdicts: list[dict], key: str) -> dict:
    groups: dict[str, list[dict]] = {}
    for v in verdicts:
        if v.get(key):
            groups.setdefault(str(v[key]), []).append(v)
    return {name: acceptance(members) for name, members in sorted(groups.items())}


def _by_rule(verdicts: list[dict], criteria: CriteriaSet) -> dict:
    """Acceptance under `all` and `major` from the same criterion verdicts (flagged answers never accepted)."""
    out = {}
    for text in RULES_SHOWN:
        rule = AcceptanceRule.parse(text, criteria)
        decided = [False if v.get("flags") else rule.decide({k: c.get("pass") for k, c in v["criteria"].items()},
                                                            criteria)
                   for v in verdicts if v.get("error_kind") not in ("backend", "request")]
        known = [d for d in decided if d is not None]
        out[text] = {"n_judged": len(known), "n_accepted": sum(known), "acceptance_rate": _rate(sum(known), len(known))}
    return out


def summarize(verdicts: list[dict], criteria: CriteriaSet, rule: AcceptanceRule, *, n_items: int | None = None,
              skipped: Sequence[dict] = (), extra: dict | None = None) -> dict:
    """summary.json's content from one verdict record per item."""
    overall = acceptance(verdicts)
    wilson = wilson_interval(overall["n_accepted"], overall["n_judged"])
    per_criterion = {}
    for c in criteria.criteria:
        values = [v["criteria"].get(c.id, {}).get("pass") for v in verdicts]
        known = [x for x in values if x is not None]
        per_criterion[c.id] = {"name": c.name, "severity": c.severity, "n": len(known), "n_passed": sum(known),
                               "pass_rate": _rate(sum(known), len(known)), "n_errors": len(values) - len(known)}
    errors = [{"id": v["id"], "kind": v.get("error_kind"), "error": v["judge_error"]}
              for v in verdicts if v.get("judge_error")]
    return {
        "kind": "judge",
        **overall,
        "n_items": len(verdicts) + len(skipped) if n_items is None else n_items,
        "acceptance_ci95_wilson": list(wilson) if wilson else None,
        "bootstrap": {"method": "percentile bootstrap resampling slides", "resamples": BOOTSTRAP_RESAMPLES,
                      "level": LEVEL, "seed": 0, "n_slides": len({v.get("slide") or v["id"] for v in verdicts})},
        "acceptance_rule": str(rule),
        "acceptance_by_rule": _by_rule(verdicts, criteria),
        "n_judge_errors": len(errors),
        "judge_errors": errors,
        "criteria": per_criterion,
        "per_category": _breakdown(verdicts, "category"),
        "per_organ": _breakdown(verdicts, "organ"),
        "judge_agreement": _agreement(verdicts, criteria),
        "n_flagged": sum(1 for v in verdicts if v.get("flags")),
        "flagged": [{"id": v["id"], "flags": v["flags"]} for v in verdicts if v.get("flags")],
        "n_report_excerpted": sum(1 for v in verdicts if v.get("report_excerpted")),
        "n_skipped": len(skipped),
        "skipped": list(skipped),
        "criteria_fingerprint": criteria.fingerprint(),
        **(extra or {}),
    }


def _agreement(verdicts: list[dict], criteria: CriteriaSet) -> dict:
    """How often the votes agreed with their majority (1.0 = unanimous); null with one vote."""
    import numpy as np

    votes = max((v.get("votes") or 1 for v in verdicts), default=1)
    per_criterion, everything = {}, []
    for c in criteria.criteria:
        values = [v["criteria"][c.id]["agreement"] for v in verdicts
                  if "agreement" in v["criteria"].get(c.id, {})]
        per_criterion[c.id] = float(np.mean(values)) if values else None
        everything += values
    return {"votes": votes, "mean": float(np.mean(everything)) if everything else None,
            "unanimous_rate": float(np.mean([a == 1.0 for a in everything])) if everything else None,
            "per_criterion": per_criterion}


def pct(value: float | None) -> str:
    """A proportion as a percentage with one decimal, or – when unknown."""
    return "–" if value is None else f"{100 * value:.1f}%"


def rate_with_ci(block: dict) -> str:
    """"62.9% (59.1%–66.5%)" from a block with acceptance_rate and acceptance_ci95."""
    ci = block.get("acceptance_ci95")
    rate = pct(block.get("acceptance_rate"))
    return f"{rate} ({pct(ci[0])}–{pct(ci[1])})" if ci else rate


def _acceptance_rows(summary: dict) -> list[str]:
    rule = summary["acceptance_rule"]
    lines = ["## Acceptance", "", f"| answers | n | decided | undecided (judge errors) | accepted | acceptance, rule "
             f"`{rule}` (95% CI, slides resampled) |", "|---|---|---|---|---|---|"]
    rows = [("model", summary)] + [(f"{name} baseline", b) for name, b in summary.get("baselines", {}).items()]
    for name, b in rows:
        lines.append(f"| {name} | {b['n']} | {b['n_judged']} | {b['n_undecided']} | {b['n_accepted']} | "
                     f"{rate_with_ci(b)} |")
    dependence = summary.get("slide_dependence", {}).get("overall")
    if dependence and dependence.get("difference") is not None:
        ci = dependence.get("ci95")
        lines += ["", f"**Slide dependence (model − blind, rule `{rule}`): {100 * dependence['difference']:+.1f} pp**"
                  + (f" (95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}, slides resampled)" if ci else "")
                  + f" on {dependence['n']} answers decided in both."]
    by_rule = summary.get("acceptance_by_rule") or {}
    if by_rule:
        lines += ["", "| rule | accepted / decided | acceptance |", "|---|---|---|"]
        lines += [f"| `{name}`{' (this run)' if name == rule else ''} | {r['n_accepted']} / {r['n_judged']} | "
                  f"{pct(r['acceptance_rate'])} |" for name, r in by_rule.items()]
    return lines + [""]


def report_markdown(summary: dict) -> str:
    """report.md: the headline, acceptance with undecided and baselines, per criterion, breakdowns,
    judge–human agreement, stability, errors and flags."""
    from .agreement import agreement_markdown
    from .leakage import patients_markdown

    rule = summary["acceptance_rule"]
    wilson = summary.get("acceptance_ci95_wilson")
    lines = [f"# Evaluation report: {summary.get('name', 'run')}", "",
             f"- judge: `{summary.get('judge', '?')}`, acceptance rule: `{rule}`",
             f"- **acceptance rate (rule `{rule}`): {rate_with_ci(summary)}** (95% bootstrap interval, slides "
             f"resampled; Wilson {pct(wilson[0]) + '–' + pct(wilson[1]) if wilson else '–'}) — "
             f"{summary['n_accepted']} of {summary['n_judged']} decided answers; {summary['n_undecided']} undecided; "
             f"{summary['n']} judged, {summary['n_judge_errors']} judge error(s), {summary['n_skipped']} item(s) skipped",
             f"- flagged (pre-check or the judge's evaluator field): {summary['n_flagged']}; reports given as "
             f"excerpts: {summary['n_report_excerpted']}",
             *([f"- judged again because their answer, question, report or judge settings changed since an earlier "
                f"verdict: {summary['n_rejudged_changed']}"] if summary.get("n_rejudged_changed") else []),
             *([f"- decoding: greedy, repetition penalty {d['repetition_penalty']}, no-repeat n-gram "
                f"{d['no_repeat_ngram_size']} ({d['source']})"] if (d := summary.get("decoding")) else []),
             *patients_markdown(summary.get("patients")), ""]
    lines += _acceptance_rows(summary)
    lines += ["## Per criterion", "", f"Acceptance rule `{rule}`: "
              + {"major": "every major criterion must pass.", "all": "every criterion must pass."}.get(
                  rule, f"at least {rule.partition(':')[2]} criteria must pass."), "",
              "| criterion | severity | pass rate | passed / judged | judge errors |", "|---|---|---|---|---|"]
    for cid, c in summary["criteria"].items():
        lines.append(f"| {c['name']} (`{cid}`) | {c['severity']} | {pct(c['pass_rate'])} | {c['n_passed']} / {c['n']} "
                     f"| {c['n_errors']} |")
    lines.append(f"\n![per-criterion pass rates]({CHART})\n")
    for key, title in (("per_category", "Per category"), ("per_organ", "Per organ")):
        if summary[key]:
            lines += [f"## {title}", "", f"| | n | decided | undecided | acceptance, rule `{rule}` (95% CI) |",
                      "|---|---|---|---|---|"]
            lines += [f"| {name} | {g['n']} | {g['n_judged']} | {g['n_undecided']} | {rate_with_ci(g)} |"
                      for name, g in summary[key].items()]
            lines.append("")
    lines += agreement_markdown(summary.get("human_agreement"), rule)
    agreement = summary["judge_agreement"]
    if agreement["mean"] is not None:
        lines += ["## Judge stability", "", f"{agreement['votes']} votes per verdict: mean agreement with the majority "
                  f"{pct(agreement['mean'])}, unanimous {pct(agreement['unanimous_rate'])} of verdicts.", ""]
    for key, title, fmt in (("judge_errors", "Judge errors (undecided criteria)", lambda e: f"`{e['id']}` ({e['kind']}): {e['error']}"),
                            ("flagged", "Flagged as addressing the evaluator (not accepted)", lambda f: f"`{f['id']}`: {', '.join(f['flags'])}"),
                            ("skipped", "Skipped items", lambda s: f"`{s['id']}`: {s['error']}")):
        if summary[key]:
            lines += [f"## {title}", ""] + [f"- {fmt(e)}" for e in summary[key][:50]]
            if len(summary[key]) > 50:
                lines.append(f"- … and {len(summary[key]) - 50} more (summary.json lists all)")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def save_figure(figure, path: Path) -> Path:
    """Render a matplotlib Figure to PNG atomically: a writer-unique temp file, fsynced, then renamed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    tmp = temp_beside(path, ".png")
    try:
        with open(tmp, "wb") as f:
            figure.savefig(f, format="png", dpi=120, bbox_inches="tight")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_criteria(summary: dict, path: Path) -> Path:
    """A horizontal bar chart of per-criterion pass rates, with the acceptance rate as a line."""
    from matplotlib.figure import Figure

    names = [c["name"] for c in summary["criteria"].values()][::-1]
    rates = [100 * (c["pass_rate"] or 0) for c in summary["criteria"].values()][::-1]
    figure = Figure(figsize=(7, 0.45 * len(names) + 1.4))
    ax = figure.add_subplot()
    bars = ax.barh(names, rates, color="#4C78A8")
    ax.bar_label(bars, labels=[f"{r:.0f}%" for r in rates], padding=3, fontsize=8)
    if summary["acceptance_rate"] is not None:
        ax.axvline(100 * summary["acceptance_rate"], color="#E45756", linestyle="--",
                   label=f"accepted {pct(summary['acceptance_rate'])} (rule {summary['acceptance_rule']})")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("pass rate (%)")
    ax.set_title(f"{summary.get('name', 'run')}: {summary['n_judged']} decided answers", fontsize=10)
    return save_figure(figure, path)


def write_outputs(out_dir: Path, summary: dict) -> None:
    """summary.json, report.md and the chart, each written atomically."""
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "report.md", report_markdown(summary))
    plot_criteria(summary, out_dir / CHART)
