"""`chatexaonepath eval …` commands (joined into the one CLI by chatexaonepath/cli.py).

Heavy imports stay inside the commands so `chatexaonepath --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Seven-criteria LLM-judge evaluation of answers against reports.", no_args_is_help=True)

Judge = Annotated[str, typer.Option("--judge", help="Judge LLM: openai:MODEL@URL (vLLM, llama.cpp…), ollama:MODEL "
                                                    "(e.g. ollama:llama3.1:70b-instruct) or local:embedded.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Run folder (created; a rerun resumes it).")]
Criteria = Annotated[Optional[Path], typer.Option("--criteria", help="Criteria YAML (default: the shipped seven).")]
Accept = Annotated[str, typer.Option("--accept", help="Acceptance rule: major (all major criteria), all, or at-least:K.")]
Votes = Annotated[int, typer.Option("--votes", help="Judge samples per verdict; the majority counts, agreement is reported.")]
Temperature = Annotated[Optional[float], typer.Option("--temperature", help="Judge temperature (default 0, or 0.7 with --votes > 1).")]
PerCriterion = Annotated[bool, typer.Option("--per-criterion", help="One judge call per criterion.")]
Concurrency = Annotated[int, typer.Option("--concurrency", help="Answers judged at once (requests in flight).")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds per judge request.")]
Retries = Annotated[int, typer.Option("--retries", help="Re-sends of a judge request after timeouts or server errors.")]
MaxReport = Annotated[int, typer.Option("--max-report-chars", help="Longer reports are replaced by their most relevant passages.")]
JudgeMaxTokens = Annotated[int, typer.Option("--judge-max-tokens", help="Longest judge reply in tokens (reasoning + JSON).")]
MaxRepairs = Annotated[int, typer.Option("--max-repairs", help="Re-asks after an unusable judge reply, before a judge_error.")]
Structured = Annotated[bool, typer.Option("--structured-output/--free-text", help="Send the verdict's JSON schema "
                                           "(response_format) to the judge server; servers that refuse it get free text.")]
RetryErrors = Annotated[bool, typer.Option("--retry-errors", help="Judge again the answers whose judge reply was unusable.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")]


def _judge_config(votes: int, temperature: float | None, per_criterion: bool, concurrency: int, timeout: float,
                  retries: int, max_report_chars: int, max_tokens: int, max_repairs: int, structured_output: bool):
    from .judge import JudgeConfig

    return JudgeConfig(votes=votes, temperature=temperature, per_criterion=per_criterion, concurrency=concurrency,
                       timeout=timeout, retries=retries, max_report_chars=max_report_chars, max_tokens=max_tokens,
                       max_repairs=max_repairs, structured_output=structured_output)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    from ..progress import console

    ci = summary["acceptance_ci95"]
    rate = "–" if summary["acceptance_rate"] is None else f"{100 * summary['acceptance_rate']:.1f}%"
    table = Table(title=f"{out}: acceptance {rate}" + (f" (95% CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%)" if ci else ""))
    for column in ("criterion", "severity", "pass rate", "passed / judged", "errors"):
        table.add_column(column)
    for cid, c in summary["criteria"].items():
        table.add_row(c["name"], c["severity"], "–" if c["pass_rate"] is None else f"{100 * c['pass_rate']:.1f}%",
                      f"{c['n_passed']} / {c['n']}", str(c["n_errors"]))
    console.print(table)
    console.print(f"{summary['n_accepted']} of {summary['n_judged']} decided answers accepted "
                  f"(rule: {summary['acceptance_rule']}); judge errors {summary['n_judge_errors']}, "
                  f"flagged {summary['n_flagged']}, skipped {summary['n_skipped']}. Report: {out / 'report.md'}")


@app.command("run")
def run(
    model: Annotated[Path, typer.Option("--model", help="A ChatEXAONEPath checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="Test set, LLaVA-format JSON or JSONL.")],
    judge: Judge,
    out: Out,
    features: Annotated[Optional[Path], typer.Option("--features", help="Folder of <slide_id>.h5 / .pt features.")] = None,
    reports: Annotated[Optional[Path], typer.Option("--reports", help="Folder of <report_id>.txt (or <slide_id>.txt) reports.")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions answered per generation batch.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 256,
    stain_norm: Annotated[Optional[str], typer.Option(help="none or macenko: what the test features must have (default: what the checkpoint was trained on).")] = None,
    allow_feature_mismatch: Annotated[bool, typer.Option("--allow-feature-mismatch", help="Answer about test features made differently from the training features (logged).")] = False,
    criteria: Criteria = None, accept: Accept = "major", votes: Votes = 1, temperature: Temperature = None,
    per_criterion: PerCriterion = False, concurrency: Concurrency = 8, timeout: Timeout = 120.0, retries: Retries = 3,
    max_report_chars: MaxReport = 6000, judge_max_tokens: JudgeMaxTokens = 768, max_repairs: MaxRepairs = 2,
    structured_output: Structured = True, retry_errors: RetryErrors = False, quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Answer every test question with a checkpoint, then judge the answers against the reports (resumable).

    The test features must be made like the checkpoint's training features (its feature_provenance).
    """
    from ..progress import progress_bar, setup_logging
    from .answers import GenerateConfig
    from .run import run_eval

    setup_logging(verbose, quiet)
    config = GenerateConfig(model=str(model), data=str(data), features=str(features) if features else None,
                            reports=str(reports) if reports else None, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, stain_norm=stain_norm,
                            allow_feature_mismatch=allow_feature_mismatch)
    judge_config = _judge_config(votes, temperature, per_criterion, concurrency, timeout, retries, max_report_chars,
                                 judge_max_tokens, max_repairs, structured_output)
    with progress_bar(quiet) as progress:
        answering = progress.add_task("answers", total=None, unit="answers")
        judging = progress.add_task("verdicts", total=None, unit="verdicts", start=False)
        result = run_eval(config, out, judge, criteria=criteria, rule=accept, judge_config=judge_config,
                          retry_errors=retry_errors,
                          answer_progress=lambda done, total: progress.update(answering, completed=done, total=total),
                          judge_progress=lambda done, total: (progress.start_task(judging),
                                                              progress.update(judging, completed=done, total=total)))
    if not quiet:
        _print_summary(result.summary, out)
    if result.summary["n_skipped"]:
        raise typer.Exit(1)


@app.command("judge")
def judge_command(
    answers: Annotated[Path, typer.Option("--answers", help="JSONL: id, question, answer, and report or report_id.")],
    judge: Judge,
    out: Out,
    reports: Annotated[Optional[Path], typer.Option("--reports", help="Folder of <report_id>.txt reports.")] = None,
    criteria: Criteria = None, accept: Accept = "major", votes: Votes = 1, temperature: Temperature = None,
    per_criterion: PerCriterion = False, concurrency: Concurrency = 8, timeout: Timeout = 120.0, retries: Retries = 3,
    max_report_chars: MaxReport = 6000, judge_max_tokens: JudgeMaxTokens = 768, max_repairs: MaxRepairs = 2,
    structured_output: Structured = True, retry_errors: RetryErrors = False, quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Judge answers from any system (e.g. a baseline) on the same criteria (resumable)."""
    from ..progress import progress_bar, setup_logging
    from .run import judge_answers_file

    setup_logging(verbose, quiet)
    judge_config = _judge_config(votes, temperature, per_criterion, concurrency, timeout, retries, max_report_chars,
                                 judge_max_tokens, max_repairs, structured_output)
    with progress_bar(quiet) as progress:
        task = progress.add_task("verdicts", total=None, unit="verdicts")
        result = judge_answers_file(answers, out, judge, reports=reports, criteria=criteria, rule=accept,
                                    judge_config=judge_config, retry_errors=retry_errors,
                                    progress=lambda done, total: progress.update(task, completed=done, total=total))
    if not quiet:
        _print_summary(result.summary, out)


@app.command("compare")
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with a summary.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for compare.md and compare.png.")] = Path("eval_compare"),
) -> None:
    """Side-by-side acceptance and per-criterion pass rates of several runs (markdown table and chart)."""
    from .report import write_comparison

    markdown, md, png = write_comparison(runs, out)
    typer.echo(markdown)
    typer.echo(f"written: {md}, {png}")


@app.command("criteria")
def show_criteria(criteria: Criteria = None) -> None:
    """List the judging criteria (the shipped seven, or a --criteria file, validated)."""
    from .criteria import load_criteria

    loaded = load_criteria(criteria)
    for c in loaded.criteria:
        typer.echo(f"{c.id} [{c.severity}] {c.name}: {c.definition}")
    if loaded.precheck_criterion:
        typer.echo(f"(answers flagged by the pre-check fail: {loaded.precheck_criterion})")
