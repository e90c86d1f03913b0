"""What a closed-ended run found: accuracy per file and category with intervals, the baselines beside
the model, slide dependence, and every answer that named no single option.

Accuracy counts an answer right only when exactly one option can be read from it and it is the
right one; unparsed answers (no option, or two) are wrong and listed. Each accuracy has two 95%
intervals: Wilson's (questions independent — comparable with the papers) and a bootstrap that
resamples slides (honest when a slide carries several questions).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..fileio import atomic_write_json, atomic_write_text
from .baselines import paired_difference
from .leakage import patients_markdown
from .stats import BOOTSTRAP_RESAMPLES, cluster_bootstrap, wilson_interval

CHART = "closed.png"
GROUPS = (("by_file", "file"), ("by_category", "category"), ("by_subcategory", "subcategory"))


def accuracy_block(scored: list[dict]) -> dict:
    """accuracy, n, correct, ci95 (Wilson), ci95_slide_bootstrap, n_slides, unparsed of some scored answers."""
    n, correct = len(scored), sum(1 for s in scored if s["correct"])
    wilson = wilson_interval(correct, n)
    clustered = cluster_bootstrap([float(s["correct"]) for s in scored], [s["slide"] for s in scored]) if n else None
    return {"accuracy": correct / n if n else None, "n": n, "correct": correct,
            "ci95": list(wilson) if wilson else None,
            "ci95_slide_bootstrap": list(clustered) if clustered else None,
            "n_slides": len({s["slide"] for s in scored}), "unparsed": sum(1 for s in scored if s["choice"] is None)}


def condition_summary(scored: list[dict]) -> dict:
    """overall and per file / category / subcategory accuracy of one condition."""
    out = {"overall": accuracy_block(scored)}
    for key, field in GROUPS:
        groups: dict[str, list[dict]] = defaultdict(list)
        for s in scored:
            if s.get(field):
                groups[str(s[field])].append(s)
        if key != "by_subcategory" or groups:
            out[key] = {name: accuracy_block(members) for name, members in sorted(groups.items())}
    return out


def summarize_closed(scored: dict[str, list[dict]], *, n_items: int, skipped: list[dict], not_closed: list[dict],
                     extra: dict | None = None) -> dict:
    """summary.json of `eval closed`: `scored` maps each condition (model, blind, shuffled) to its scored answers."""
    model = scored["model"]
    summary = {"kind": "closed", "n_items": n_items, "n": len(model), **condition_summary(model),
               "unparsed": sum(1 for s in model if s["choice"] is None),
               "unparsed_items": [{"id": s["id"], "answer": s["answer"][:200], "why": s["how"]}
                                  for s in model if s["choice"] is None],
               "n_skipped": len(skipped), "skipped": skipped,
               "n_not_closed": len(not_closed), "not_closed": not_closed[:200],
               "intervals": {"ci95": "Wilson score (questions independent)",
                             "ci95_slide_bootstrap": f"percentile bootstrap resampling slides ({BOOTSTRAP_RESAMPLES} "
                                                     "resamples, seed 0)"}}
    baselines = {c: {**condition_summary(s), "unparsed": sum(1 for x in s if x["choice"] is None)}
                 for c, s in scored.items() if c != "model"}
    if baselines:
        summary["baselines"] = baselines
        for condition, key in (("blind", "slide_dependence"), ("shuffled", "shuffled_gap")):
            if condition in scored:
                summary[key] = _differences(model, scored[condition])
    return {**summary, **(extra or {})}


def _differences(model: list[dict], baseline: list[dict]) -> dict:
    """model − baseline accuracy, paired on the questions both answered, overall and per file/category."""
    with_slide = {s["id"]: float(s["correct"]) for s in model}
    without = {s["id"]: float(s["correct"]) for s in baseline}
    slides = {s["id"]: s["slide"] for s in model}
    out = {"overall": paired_difference(with_slide, without, slides)["overall"]}
    for key, field in GROUPS[:2]:
        out[key] = paired_difference(with_slide, without, slides, {s["id"]: s.get(field) for s in model})["by_group"]
    return out


# --- report.md --------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _with_ci(block: dict | None) -> str:
    if not block or block.get("accuracy") is None:
        return "–"
    ci = block.get("ci95")
    return f"{_pct(block['accuracy'])} ({_pct(ci[0])}–{_pct(ci[1])})" if ci else _pct(block["accuracy"])


def _difference(block: dict | None) -> str:
    if not block or block.get("difference") is None:
        return "–"
    ci = block.get("ci95")
    sign = lambda v: f"{100 * v:+.1f}"  # noqa: E731 - a signed percentage-point figure
    return f"{sign(block['difference'])} pp" + (f" ({sign(ci[0])} to {sign(ci[1])})" if ci else "")


def _table(summary: dict, key: str, title: str) -> list[str]:
    groups = summary.get(key) or {}
    if not groups:
        return []
    baselines = summary.get("baselines", {})
    header = ["", "n", "model (95% Wilson CI)", "slide-bootstrap CI", "unparsed"]
    header += [f"{name} baseline" for name in baselines]
    if "slide_dependence" in summary:
        header.append("slide dependence: model − blind (95% CI)")
    if "shuffled_gap" in summary:
        header.append("model − shuffled (95% CI)")
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, block in groups.items():
        boot = block.get("ci95_slide_bootstrap")
        cells = [name, str(block["n"]), _with_ci(block), f"{_pct(boot[0])}–{_pct(boot[1])}" if boot else "–",
                 str(block["unparsed"])]
        cells += [_with_ci(b.get(key, {}).get(name)) for b in baselines.values()]
        for diff in ("slide_dependence", "shuffled_gap"):
            if diff in summary:
                cells.append(_difference(summary[diff].get(key, {}).get(name)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def closed_markdown(summary: dict) -> str:
    """report.md of a closed-ended run."""
    overall = summary["overall"]
    boot = overall.get("ci95_slide_bootstrap")
    lines = [f"# Closed-ended evaluation: {summary.get('name', 'run')}", "",
             f"- **accuracy: {_with_ci(overall)}** (95% Wilson interval; resampling slides: "
             f"{_pct(boot[0]) + '–' + _pct(boot[1]) if boot else '–'}) — {overall['correct']} of {overall['n']} "
             f"questions on {overall['n_slides']} slides",
             f"- unparsed answers (no single option named; counted wrong): {summary['unparsed']}; skipped "
             f"questions: {summary['n_skipped']}; exchanges that were not closed-ended: {summary['n_not_closed']}"]
    if "slide_dependence" in summary:
        lines.append(f"- **slide dependence (model − blind): {_difference(summary['slide_dependence']['overall'])}**"
                     f"; blind accuracy {_with_ci(summary['baselines']['blind']['overall'])}")
    if "shuffled_gap" in summary:
        lines.append(f"- model − shuffled slides: {_difference(summary['shuffled_gap']['overall'])}; shuffled "
                     f"accuracy {_with_ci(summary['baselines']['shuffled']['overall'])}")
    decoding = summary.get("decoding")
    if decoding:
        lines.append(f"- decoding: greedy, repetition penalty {decoding['repetition_penalty']}, no-repeat n-gram "
                     f"{decoding['no_repeat_ngram_size']}, at most {decoding['max_new_tokens']} new tokens "
                     f"({decoding['source']})")
    lines += patients_markdown(summary.get("patients")) + [""]
    for key, title in (("by_file", "Per file"), ("by_category", "Per category"), ("by_subcategory", "Per subcategory")):
        lines += _table(summary, key, title)
    lines.append(f"![accuracy per category]({CHART})\n")
    for key, title, fmt in (
            ("unparsed_items", "Unparsed answers (counted wrong)", lambda u: f"`{u['id']}` ({u['why']}): {u['answer']!r}"),
            ("skipped", "Skipped questions", lambda s: f"`{s['id']}`: {s['error']}"),
            ("not_closed", "Not closed-ended (not scored)", lambda s: f"{s['file']} {s['row']} `{s['id']}`: {s['reason']}")):
        if summary.get(key):
            lines += [f"## {title}", ""] + [f"- {fmt(e)}" for e in summary[key][:50]]
            if len(summary[key]) > 50:
                lines.append(f"- … and {len(summary[key]) - 50} more (summary.json lists them)")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_closed(summary: dict, path: Path) -> Path:
    """Grouped bars: accuracy per category for the model and each baseline."""
    import numpy as np
    from matplotlib.figure import Figure

    from .report import save_figure

    names = list(summary["by_category"]) or ["all"]
    series = {"model": summary["by_category"] or {"all": summary["overall"]}}
    series.update({c: b["by_category"] or {"all": b["overall"]} for c, b in summary.get("baselines", {}).items()})
    figure = Figure(figsize=(max(6.0, 1.2 * len(names) + 2), 4.0))
    ax = figure.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for i, (label, groups) in enumerate(series.items()):
        values = [100 * ((groups.get(n) or {}).get("accuracy") or 0) for n in names]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title(f"{summary.get('name', 'run')}: {summary['n']} questions", fontsize=10)
    return save_figure(figure, path)


def write_closed_outputs(out_dir: Path, summary: dict) -> None:
    """summary.json, report.md and the chart, each written atomically."""
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "report.md", closed_markdown(summary))
    plot_closed(summary, out_dir / CHART)
