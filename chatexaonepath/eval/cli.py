"""`chatexaonepath eval …` commands (joined into the one CLI by chatexaonepath/cli.py).

Heavy imports stay inside the commands so `chatexaonepath --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Evaluation: the seven-criteria LLM judge, closed-ended benchmark accuracy, baselines without "
                       "the slide, and pathologists' grades beside the judge's.", no_args_is_help=True)

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
Baselines = Annotated[Optional[str], typer.Option("--baselines", help="Also answer without the slide: blind (no visual "
                                                "tokens), shuffled (another test slide's), or blind,shuffled.")]
PatientMap = Annotated[Optional[Path], typer.Option("--patient-map", help="CSV slide_id,patient_id for non-TCGA ids "
                                                    "(TCGA ids give their patient themselves).")]
Strict = Annotated[bool, typer.Option("--strict", help="Refuse to run when a test patient was seen in training (or the "
                                                       "checkpoint does not record its training patients).")]
RepetitionPenalty = Annotated[Optional[float], typer.Option("--repetition-penalty", help="Default: what the app and "
                                                            "`chat` use (the LLM's own, else 1.15).")]
NoRepeat = Annotated[Optional[int], typer.Option("--no-repeat-ngram-size", help="Default: what the app and `chat` use "
                                                 "(the LLM's own, else 6).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")]


def _judge_config(votes: int, temperature: float | None, per_criterion: bool, concurrency: int, timeout: float,
                  retries: int, max_report_chars: int, max_tokens: int, max_repairs: int, structured_output: bool):
    from .judge import JudgeConfig

    return JudgeConfig(votes=votes, temperature=temperature, per_criterion=per_criterion, concurrency=concurrency,
                       timeout=timeout, retries=retries, max_report_chars=max_report_chars, max_tokens=max_tokens,
                       max_repairs=max_repairs, structured_output=structured_output)


def _condition_bars(progress, unit: str):
    """A progress callback (condition, done, total) that keeps one bar per answering condition."""
    tasks: dict[str, object] = {}

    def update(condition: str, done: int, total: int) -> None:
        if condition not in tasks:
            tasks[condition] = progress.add_task(unit if condition == "model" else f"{unit} ({condition})",
                                                 total=total, unit=unit)
        progress.update(tasks[condition], completed=done, total=total)

    return update


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
                  f"(rule: {summary['acceptance_rule']}); undecided {summary['n_undecided']}, judge errors "
                  f"{summary['n_judge_errors']}, flagged {summary['n_flagged']}, skipped {summary['n_skipped']}. "
                  f"Report: {out / 'report.md'}")
    dependence = (summary.get("slide_dependence") or {}).get("overall") or {}
    if dependence.get("difference") is not None:
        console.print(f"Slide dependence (model − blind acceptance): {100 * dependence['difference']:+.1f} pp.")


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
    structured_output: Structured = True, retry_errors: RetryErrors = False, baselines: Baselines = None,
    patient_map: PatientMap = None, strict: Strict = False, repetition_penalty: RepetitionPenalty = None,
    no_repeat_ngram_size: NoRepeat = None, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Answer every test question with a checkpoint, then judge the answers against the reports (resumable).

    The test features must be made like the checkpoint's training features (its feature_provenance).
    Answers are decoded as the app and `chat` decode by default.
    """
    from ..progress import progress_bar, setup_logging
    from .answers import GenerateConfig
    from .run import run_eval

    setup_logging(verbose, quiet)
    config = GenerateConfig(model=str(model), data=str(data), features=str(features) if features else None,
                            reports=str(reports) if reports else None, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, stain_norm=stain_norm,
                            allow_feature_mismatch=allow_feature_mismatch, repetition_penalty=repetition_penalty,
                            no_repeat_ngram_size=no_repeat_ngram_size)
    judge_config = _judge_config(votes, temperature, per_criterion, concurrency, timeout, retries, max_report_chars,
                                 judge_max_tokens, max_repairs, structured_output)
    with progress_bar(quiet) as progress:
        answering = _condition_bars(progress, "answers")
        judging = progress.add_task("verdicts", total=None, unit="verdicts", start=False)
        result = run_eval(config, out, judge, criteria=criteria, rule=accept, judge_config=judge_config,
                          retry_errors=retry_errors, baselines=baselines or (), patient_map=patient_map, strict=strict,
                          answer_progress=answering,
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
    """Runs side by side: acceptance (rule, undecided, criteria, slide dependence, judge–human κ) or closed-ended
    accuracy with its baselines (markdown table and chart)."""
    from .compare import write_comparison

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


@app.command("closed")
def closed(
    data: Annotated[list[Path], typer.Option("--data", help="Closed-ended test file(s): WSI-Bench *_choice_test.json / "
                                             "*_TF_question_test.json, SlideBench-VQA CSV, or LLaVA JSON/JSONL with options.")],
    out: Out,
    model: Annotated[Optional[Path], typer.Option("--model", help="A checkpoint that answers every question.")] = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="Folder of the test slides' features (with --model).")] = None,
    answers: Annotated[Optional[Path], typer.Option("--answers", help="Or: another system's answers, JSONL {id, answer}.")] = None,
    baselines: Baselines = None, patient_map: PatientMap = None, strict: Strict = False,
    instruction: Annotated[str, typer.Option(help="Text appended to every question (e.g. \"Answer with the option's letter.\").")] = "",
    batch_size: Annotated[int, typer.Option(help="Questions answered per generation batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 32,
    stain_norm: Annotated[Optional[str], typer.Option(help="none or macenko: what the test features must have.")] = None,
    allow_feature_mismatch: Annotated[bool, typer.Option("--allow-feature-mismatch", help="Answer about features made unlike the training ones (logged).")] = False,
    repetition_penalty: RepetitionPenalty = None, no_repeat_ngram_size: NoRepeat = None,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Closed-ended accuracy (multiple choice, yes/no) per file and category, with intervals (resumable).

    With --baselines the same model answers again without the slide; the report shows slide dependence.
    """
    from ..progress import console, progress_bar, setup_logging
    from .closed import ClosedConfig, run_closed

    setup_logging(verbose, quiet)
    config = ClosedConfig(data=[str(d) for d in data], model=str(model) if model else None,
                          answers=str(answers) if answers else None, features=str(features) if features else None,
                          baselines=baselines or [], instruction=instruction, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, stain_norm=stain_norm,
                          allow_feature_mismatch=allow_feature_mismatch, repetition_penalty=repetition_penalty,
                          no_repeat_ngram_size=no_repeat_ngram_size, patient_map=str(patient_map) if patient_map else None,
                          strict=strict)
    with progress_bar(quiet) as progress:
        result = run_closed(config, out, progress=_condition_bars(progress, "answers"))
    summary = result.summary
    if not quiet:
        overall = summary["overall"]
        ci = overall["ci95"]
        console.print(f"{out}: accuracy {100 * overall['accuracy']:.1f}% (95% CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%) "
                      f"on {overall['n']} questions; unparsed {summary['unparsed']}, skipped {summary['n_skipped']}."
                      if overall["accuracy"] is not None else f"{out}: no question was answered.", highlight=False)
        dependence = (summary.get("slide_dependence") or {}).get("overall") or {}
        if dependence.get("difference") is not None:
            console.print(f"Slide dependence (model − blind accuracy): {100 * dependence['difference']:+.1f} pp.",
                          highlight=False)
        console.print(f"Report: {out / 'report.md'}", highlight=False)
    if summary["n_skipped"]:
        raise typer.Exit(1)


@app.command("review")
def review(
    run_dir: Annotated[Path, typer.Argument(help="A judged run folder (eval run or eval judge).")],
    reviewer: Annotated[str, typer.Option("--reviewer", help="Your name, recorded with each grade.")],
    host: Annotated[str, typer.Option(help="Address to serve on (another than 127.0.0.1 needs --auth).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 7870,
    auth: Annotated[Optional[list[str]], typer.Option(envvar="CHATEXAONEPATH_REVIEW_AUTH", help="Require a login "
                                                      "USER:PASSWORD (repeat for more users).")] = None,
    verbose: Verbose = False,
) -> None:
    """Serve a page where a pathologist grades the run's answers blind to the judge (human.jsonl; Ctrl-C to stop)."""
    import time

    from ..progress import console, setup_logging
    from .review import ReviewSession, parse_auth, serve_review

    setup_logging(verbose, False)
    session = ReviewSession(run_dir, reviewer)
    with serve_review(session, host, port, parse_auth(auth)) as url:
        console.print(f"Grading {len(session.items)} answers of {run_dir} as {reviewer}: open {url} (Ctrl-C to stop).",
                      highlight=False)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("Stopped; grades are in " + str(run_dir / "human.jsonl"), highlight=False)
