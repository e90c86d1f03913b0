"""Runs side by side: `compare.md` and `compare.png`.

Judged runs get the paper's v1/v2/v3 table — acceptance with its interval and rule, undecided
answers, each criterion's pass rate — plus slide dependence when the run had baselines and
judge–human κ when pathologists graded it. Closed-ended runs get accuracy, the baselines and slide
dependence. A note says when runs are not on the same footing (criteria, rules, judges, data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..fileio import atomic_write_text
from .criteria import EvalError
from .report import pct, rate_with_ci, save_figure


def load_summary(run_dir: str | Path) -> dict:
    """A run folder's summary.json."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise EvalError(f"{run_dir} has no summary.json; run `chatexaonepath eval run`, `eval judge` or `eval closed` "
                        "there first.")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise EvalError(f"{path} is not valid JSON ({e}).") from e


def _difference(block: dict | None) -> str:
    if not block or block.get("difference") is None:
        return "–"
    ci = block.get("ci95")
    return f"{100 * block['difference']:+.1f} pp" + (f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else "")


def _kappa(summary: dict) -> str:
    pooled = (summary.get("human_agreement") or {}).get("pooled")
    if not pooled:
        return "–"
    table = pooled["acceptance"]
    reviewers = len(summary["human_agreement"]["reviewers"])
    kappa = "undefined" if table["kappa"] is None else f"{table['kappa']:.2f}"
    return f"{kappa} (n {table['n']}, {reviewers} reviewer{'s' if reviewers != 1 else ''})"


def _judged_table(summaries: list[dict]) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    for s in summaries:
        ids += [cid for cid in s["criteria"] if cid not in ids]
    header = ["run", "n", "acceptance (95% CI)", "rule", "undecided", "judge errors", *ids,
              "slide dependence (model − blind)", "κ acceptance, judge vs human"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [pct(s["criteria"][cid]["pass_rate"]) if cid in s["criteria"] else "–" for cid in ids]
        lines.append(f"| {s['name']} | {s['n']} | {rate_with_ci(s)} | `{s['acceptance_rule']}` | "
                     f"{s.get('n_undecided', '–')} | {s['n_judge_errors']} | " + " | ".join(cells)
                     + f" | {_difference((s.get('slide_dependence') or {}).get('overall'))} | {_kappa(s)} |")
    return lines, ids


def _closed_table(summaries: list[dict]) -> list[str]:
    def accuracy(block: dict | None) -> str:
        if not block or block.get("accuracy") is None:
            return "–"
        ci = block.get("ci95")
        return f"{pct(block['accuracy'])} ({pct(ci[0])}–{pct(ci[1])})" if ci else pct(block["accuracy"])

    lines = ["| run | n | accuracy (95% Wilson CI) | unparsed | blind | shuffled | slide dependence (model − blind) |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        baselines = s.get("baselines", {})
        lines.append(f"| {s['name']} | {s['n']} | {accuracy(s['overall'])} | {s['unparsed']} | "
                     f"{accuracy((baselines.get('blind') or {}).get('overall'))} | "
                     f"{accuracy((baselines.get('shuffled') or {}).get('overall'))} | "
                     f"{_difference((s.get('slide_dependence') or {}).get('overall'))} |")
    return lines


def compare_runs(run_dirs: Sequence[str | Path]) -> tuple[str, list[dict], list[str]]:
    """(markdown tables, judged summaries, criterion ids) comparing runs side by side."""
    if len(run_dirs) < 1:
        raise EvalError("Give at least one run folder to compare.")
    summaries = [load_summary(d) for d in run_dirs]
    names = [Path(d).name or str(d) for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    for summary, name in zip(summaries, names):
        summary["name"] = name
    judged = [s for s in summaries if s.get("kind", "judge") == "judge"]
    closed = [s for s in summaries if s.get("kind") == "closed"]
    lines, ids, notes = [], [], []
    if judged:
        table, ids = _judged_table(judged)
        lines += table
        for key, what in (("criteria_fingerprint", "criteria"), ("acceptance_rule", "acceptance rules"),
                          ("judge_model", "judges")):
            if len({str(s.get(key)) for s in judged}) > 1:
                notes.append(f"- Note: these runs used different {what}; their numbers are not on the same footing.")
    if closed:
        lines += ([""] if lines else []) + _closed_table(closed)
        if len({json.dumps(s.get("data"), sort_keys=True) for s in closed}) > 1:
            notes.append("- Note: these closed-ended runs scored different test data; their accuracies are not on the "
                         "same footing.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n", judged, ids


def plot_comparison(summaries: list[dict], ids: list[str], path: Path) -> Path:
    """Grouped bars: acceptance (or accuracy) and each criterion's pass rate, one bar per run."""
    from matplotlib.figure import Figure

    labels = ["accepted"] + [next(s["criteria"][cid]["name"] for s in summaries if cid in s["criteria"]) for cid in ids]
    figure = Figure(figsize=(max(7.0, 1.1 * len(labels) + 1), 4.2))
    ax = figure.add_subplot()
    width = 0.8 / max(1, len(summaries))
    x = np.arange(len(labels))
    for i, s in enumerate(summaries):
        values = [s["acceptance_rate"]] + [s["criteria"].get(cid, {}).get("pass_rate") for cid in ids]
        ax.bar(x + (i - (len(summaries) - 1) / 2) * width, [100 * (v or 0) for v in values], width, label=s["name"])
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    if summaries:
        ax.legend(fontsize=8)
    ax.set_title("Acceptance and per-criterion pass rates", fontsize=10)
    return save_figure(figure, path)


def plot_closed_comparison(summaries: list[dict], path: Path) -> Path:
    """Grouped bars: each closed-ended run's accuracy with its blind and shuffled baselines."""
    from matplotlib.figure import Figure

    conditions = ["model", "blind", "shuffled"]
    figure = Figure(figsize=(max(6.0, 1.6 * len(summaries) + 2), 4.0))
    ax = figure.add_subplot()
    x = np.arange(len(summaries))
    for i, condition in enumerate(conditions):
        values = [(s["overall"] if condition == "model" else (s.get("baselines", {}).get(condition) or {}).get("overall")
                   or {}).get("accuracy") or 0 for s in summaries]
        ax.bar(x + (i - 1) * 0.27, [100 * v for v in values], 0.27, label=condition)
    ax.set_xticks(x, [s["name"] for s in summaries], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title("Closed-ended accuracy with and without the slide", fontsize=10)
    return save_figure(figure, path)


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[str, Path, Path]:
    """compare.md and compare.png in `out_dir`; returns (markdown, md path, png path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, judged, ids = compare_runs(run_dirs)
    md = atomic_write_text(out_dir / "compare.md", "# Run comparison\n\n" + markdown + "\n![comparison](compare.png)\n")
    if judged:
        png = plot_comparison(judged, ids, out_dir / "compare.png")
    else:
        png = plot_closed_comparison([load_summary(d) | {"name": Path(d).name} for d in run_dirs], out_dir / "compare.png")
    return markdown, md, png
