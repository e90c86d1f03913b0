"""What a run found: `summary.json`, `report.md`, the per-criterion chart, and side-by-side comparisons.

The acceptance rate counts only answers the judge decided (accepted true or false); judge errors
are reported beside it, never folded into it. Its 95% interval is a percentile bootstrap.
Charts are drawn on matplotlib `Figure` objects with the Agg canvas, never through pyplot, so
nothing depends on (or changes) a global backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .criteria import AcceptanceRule, CriteriaSet, EvalError
from ..fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 10_000
CHART = "criteria.png"


def bootstrap_interval(successes: int, n: int, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of a proportion (`successes` of `n`); None when n is 0.

    Resampling n answers with replacement from n of which k were accepted gives a Binomial(n, k/n)
    count, so drawing that count directly is the exact bootstrap at a fraction of the cost.
    """
    if n <= 0:
        return None
    rates = np.random.default_rng(seed).binomial(n, successes / n, size=resamples) / n
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(rates, [tail, 100 - tail])
    return float(low), float(high)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _breakdown(verdicts: list[dict], key: str) -> dict:
    groups: dict[str, list[dict]] = {}
    for v in verdicts:
        if v.get(key):
            groups.setdefault(str(v[key]), []).append(v)
    out = {}
    for name, members in sorted(groups.items()):
        judged = [m for m in members if m.get("accepted") is not None]
        accepted = sum(1 for m in judged if m["accepted"])
        out[name] = {"n": len(members), "n_judged": len(judged), "n_accepted": accepted,
                     "acceptance_rate": _rate(accepted, len(judged))}
    return out


def summarize(verdicts: list[dict], criteria: CriteriaSet, rule: AcceptanceRule, *, n_items: int | None = None,
              skipped: Sequence[dict] = (), extra: dict | None = None, seed: int = 0) -> dict:
    """summary.json's content from one verdict record per item."""
    judged = [v for v in verdicts if v.get("accepted") is not None]
    accepted = sum(1 for v in judged if v["accepted"])
    interval = bootstrap_interval(accepted, len(judged), seed=seed)
    per_criterion = {}
    for c in criteria.criteria:
        values = [v["criteria"].get(c.id, {}).get("pass") for v in verdicts]
        known = [x for x in values if x is not None]
        per_criterion[c.id] = {"name": c.name, "severity": c.severity, "n": len(known), "n_passed": sum(known),
                               "pass_rate": _rate(sum(known), len(known)), "n_errors": len(values) - len(known)}
    errors = [{"id": v["id"], "kind": v.get("error_kind"), "error": v["judge_error"]}
              for v in verdicts if v.get("judge_error")]
    return {
        "n": len(verdicts),
        "n_items": len(verdicts) + len(skipped) if n_items is None else n_items,
        "n_judged": len(judged),
        "n_accepted": accepted,
        "acceptance_rate": _rate(accepted, len(judged)),
        "acceptance_ci95": list(interval) if interval else None,
        "bootstrap": {"method": "percentile", "resamples": BOOTSTRAP_RESAMPLES, "level": 0.95, "seed": seed},
        "acceptance_rule": str(rule),
        "n_judge_errors": len(errors),
        "n_undecided": len(verdicts) - len(judged),
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


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _ci(summary: dict) -> str:
    ci = summary.get("acceptance_ci95")
    return f"{_pct(summary['acceptance_rate'])} ({_pct(ci[0])}–{_pct(ci[1])})" if ci else _pct(summary["acceptance_rate"])


def report_markdown(summary: dict) -> str:
    """report.md: the headline, per-criterion table, breakdowns, agreement, errors and flags."""
    lines = [f"# Evaluation report: {summary.get('name', 'run')}", "",
             f"- judge: `{summary.get('judge', '?')}`, acceptance rule: `{summary['acceptance_rule']}`",
             f"- **acceptance rate: {_ci(summary)}**"
             f"{' (95% bootstrap interval)' if summary['acceptance_ci95'] else ''} — {summary['n_accepted']} of "
             f"{summary['n_judged']} decided answers; {summary['n']} judged, {summary['n_judge_errors']} judge "
             f"error(s), {summary['n_skipped']} item(s) skipped",
             f"- flagged (pre-check or the judge's evaluator field): {summary['n_flagged']}; reports given as "
             f"excerpts: {summary['n_report_excerpted']}",
             *([f"- judged again because their answer, question, report or judge settings changed since an earlier "
                f"verdict: {summary['n_rejudged_changed']}"] if summary.get("n_rejudged_changed") else []),
             "", "## Per criterion", "",
             "| criterion | severity | pass rate | passed / judged | judge errors |", "|---|---|---|---|---|"]
    for cid, c in summary["criteria"].items():
        lines.append(f"| {c['name']} (`{cid}`) | {c['severity']} | {_pct(c['pass_rate'])} | {c['n_passed']} / {c['n']} "
                     f"| {c['n_errors']} |")
    lines.append(f"\n![per-criterion pass rates]({CHART})\n")
    for key, title in (("per_category", "Per category"), ("per_organ", "Per organ")):
        if summary[key]:
            lines += [f"## {title}", "", "| | n | acceptance |", "|---|---|---|"]
            lines += [f"| {name} | {g['n']} | {_pct(g['acceptance_rate'])} |" for name, g in summary[key].items()]
            lines.append("")
    agreement = summary["judge_agreement"]
    if agreement["mean"] is not None:
        lines += ["## Judge stability", "", f"{agreement['votes']} votes per verdict: mean agreement with the majority "
                  f"{_pct(agreement['mean'])}, unanimous {_pct(agreement['unanimous_rate'])} of verdicts.", ""]
    for key, title, fmt in (("judge_errors", "Judge errors (not counted)", lambda e: f"`{e['id']}` ({e['kind']}): {e['error']}"),
                            ("flagged", "Flagged as addressing the evaluator (not accepted)", lambda f: f"`{f['id']}`: {', '.join(f['flags'])}"),
                            ("skipped", "Skipped items", lambda s: f"`{s['id']}`: {s['error']}")):
        if summary[key]:
            lines += [f"## {title}", ""] + [f"- {fmt(e)}" for e in summary[key][:50]]
            if len(summary[key]) > 50:
                lines.append(f"- … and {len(summary[key]) - 50} more (summary.json lists all)")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _save_figure(figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
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
                   label=f"accepted {_pct(summary['acceptance_rate'])}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("pass rate (%)")
    ax.set_title(f"{summary.get('name', 'run')}: {summary['n_judged']} decided answers", fontsize=10)
    return _save_figure(figure, path)


def write_outputs(out_dir: Path, summary: dict) -> None:
    """summary.json, report.md and the chart, each written atomically."""
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "report.md", report_markdown(summary))
    plot_criteria(summary, out_dir / CHART)


# --- comparing runs -----------------------------------------------------------------------------------
def load_summary(run_dir: str | Path) -> dict:
    """A run folder's summary.json."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise EvalError(f"{run_dir} has no summary.json; run `chatexaonepath eval run` or `eval judge` there first.")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise EvalError(f"{path} is not valid JSON ({e}).") from e


def compare_runs(run_dirs: Sequence[str | Path]) -> tuple[str, list[dict], list[str]]:
    """(markdown table, summaries, criterion ids) comparing runs side by side."""
    if len(run_dirs) < 1:
        raise EvalError("Give at least one run folder to compare.")
    summaries = [load_summary(d) for d in run_dirs]
    names = [Path(d).name or str(d) for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    for summary, name in zip(summaries, names):
        summary["name"] = name
    ids: list[str] = []
    for s in summaries:
        ids += [cid for cid in s["criteria"] if cid not in ids]
    header = "| run | n | acceptance (95% CI) | judge errors | " + " | ".join(ids) + " |"
    lines = [header, "|" + "---|" * (4 + len(ids))]
    for s in summaries:
        cells = [_pct(s["criteria"][cid]["pass_rate"]) if cid in s["criteria"] else "–" for cid in ids]
        lines.append(f"| {s['name']} | {s['n']} | {_ci(s)} | {s['n_judge_errors']} | " + " | ".join(cells) + " |")
    notes = []
    for key, what in (("criteria_fingerprint", "criteria"), ("acceptance_rule", "acceptance rules"),
                      ("judge_model", "judges")):
        if len({str(s.get(key)) for s in summaries}) > 1:
            notes.append(f"- Note: these runs used different {what}; their numbers are not on the same footing.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n", summaries, ids


def plot_comparison(summaries: list[dict], ids: list[str], path: Path) -> Path:
    """Grouped bars: acceptance and each criterion's pass rate, one bar per run."""
    from matplotlib.figure import Figure

    labels = ["accepted"] + [next(s["criteria"][cid]["name"] for s in summaries if cid in s["criteria"]) for cid in ids]
    figure = Figure(figsize=(max(7.0, 1.1 * len(labels) + 1), 4.2))
    ax = figure.add_subplot()
    width = 0.8 / len(summaries)
    x = np.arange(len(labels))
    for i, s in enumerate(summaries):
        values = [s["acceptance_rate"]] + [s["criteria"].get(cid, {}).get("pass_rate") for cid in ids]
        ax.bar(x + (i - (len(summaries) - 1) / 2) * width, [100 * (v or 0) for v in values], width, label=s["name"])
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.set_title("Acceptance and per-criterion pass rates", fontsize=10)
    return _save_figure(figure, path)


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[str, Path, Path]:
    """compare.md and compare.png in `out_dir`; returns (markdown, md path, png path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, summaries, ids = compare_runs(run_dirs)
    md = atomic_write_text(out_dir / "compare.md", "# Run comparison\n\n" + markdown + "\n![comparison](compare.png)\n")
    png = plot_comparison(summaries, ids, out_dir / "compare.png")
    return markdown, md, png
