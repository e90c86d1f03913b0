"""`chatexaonepath raider …` commands (joined into the one CLI by chatexaonepath/cli.py).

Heavy imports stay inside the commands so `chatexaonepath --help` stays fast.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import ChatEXAONEPathError
from ..progress import console, progress_bar, setup_logging

app = typer.Typer(help="RAIDER: pathology reports → retrieval → instruction data.", no_args_is_help=True)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")]
Db = Annotated[Optional[Path], typer.Option("--db", help="Chroma index folder (local, persistent).")]
ChromaHost = Annotated[Optional[str], typer.Option(help="A Chroma server's host instead of --db.")]
ChromaPort = Annotated[int, typer.Option(help="The Chroma server's port.")]
EmbedderOpt = Annotated[str, typer.Option(help="sentence-transformers model id or path; 'embedded' = all-MiniLM-L6-v2.")]


@app.command("ingest")
def ingest(
    reports: Annotated[list[Path], typer.Argument(help="Report files or folders: PDF, scans (PNG/JPEG/TIFF), .txt, .md, CSV.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for reports/, reports.jsonl, unreadable.jsonl, slide_map.json.")],
    slides: Annotated[Optional[list[Path]], typer.Option("--slides", help="Slides (files/folders) or a features folder, to map reports to slides.")] = None,
    slide_map: Annotated[Optional[Path], typer.Option(help="CSV with report_id,slide_id rows; checked before stems and TCGA barcodes.")] = None,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Read reports into clean text (OCR for scans) and map each to its slide(s)."""
    from .ingest import read_reports, read_slide_map_csv, slide_ids_in, write_ingested

    setup_logging(verbose, quiet)
    found, unreadable = read_reports(reports)
    explicit = read_slide_map_csv(slide_map) if slide_map else None
    if explicit and not slides:
        raise ChatEXAONEPathError("--slide-map needs --slides, to check that the slides it names exist.")
    slide_ids = slide_ids_in(slides) if slides else None
    mapped = write_ingested(out, found, unreadable, slide_ids, explicit)
    if quiet:
        return
    methods = Counter(r.method for r in found)
    console.print(f"{len(found)} reports read ({', '.join(f'{n} {m}' for m, n in sorted(methods.items())) or 'none'}); "
                  f"{len(unreadable)} unreadable → {out}")
    for u in unreadable[:10]:
        console.print(f"  [yellow]unreadable[/] {u.source}: {u.reason}", highlight=False)
    flagged = [(r.report_id, f) for r in found for f in r.flagged]
    if flagged:
        n_reports = len({rid for rid, _ in flagged})
        console.print(f"{len(flagged)} line{'s' * (len(flagged) > 1)} in {n_reports} report{'s' * (n_reports > 1)} "
                      f"address{'es' * (len(flagged) == 1)} the model and {'is' if len(flagged) == 1 else 'are'} left "
                      f"out of the index (all listed in {out / 'ingest_summary.json'}):", highlight=False)
        for rid, f in flagged[:10]:
            console.print(f"  [yellow]flagged[/] {rid}:{f['line']} ({', '.join(f['kinds'])}): {f['text'][:100]}",
                          highlight=False)
    if mapped:
        console.print(f"{len(mapped['mapping'])} reports mapped to slides; "
                      f"{len(mapped['unmatched_reports'])} reports and {len(mapped['unmatched_slides'])} slides "
                      "unmatched (listed in slide_map.json).")
        for kind in ("unmatched_reports", "unmatched_slides"):
            if mapped[kind]:
                shown = ", ".join(mapped[kind][:8]) + (" …" if len(mapped[kind]) > 8 else "")
                console.print(f"  {kind.replace('_', ' ')}: {shown}", highlight=False)
    else:
        console.print("No --slides given: each report's id is taken as its slide id.")


def _open_index(db: Optional[Path], chroma_host: Optional[str], chroma_port: int, embedder: str, rebuild: bool = False):
    from .index import ChunkIndex, Embedder

    return ChunkIndex(db, Embedder(embedder), host=chroma_host, port=chroma_port, rebuild=rebuild)


@app.command("index")
def index(
    directory: Annotated[Path, typer.Argument(help="The folder `raider ingest` wrote.")],
    db: Db = None, chroma_host: ChromaHost = None, chroma_port: ChromaPort = 8000,
    embedder: EmbedderOpt = "embedded",
    chunk_size: Annotated[int, typer.Option(help="Longest chunk in characters (sentences are never split).")] = 600,
    overlap: Annotated[int, typer.Option(help="Sentences repeated between neighbouring chunks.")] = 1,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Delete the index and start over.")] = False,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Chunk the ingested reports and embed them into Chroma (re-running adds only what is new)."""
    import time

    from .chunking import chunk_report
    from .ingest import load_ingested

    setup_logging(verbose, quiet)
    reports = load_ingested(directory)
    chunks = [c for r in reports for c in chunk_report(r.report_id, r.text, size=chunk_size, overlap=overlap)]
    chunk_index = _open_index(db, chroma_host, chroma_port, embedder, rebuild)
    started = time.perf_counter()
    with progress_bar(quiet) as progress:
        task = progress.add_task("indexing", total=len(chunks), unit="chunks")
        update = chunk_index.add(chunks, progress=lambda done: progress.update(task, completed=done))
    seconds = time.perf_counter() - started
    if not quiet:
        console.print(f"{len(reports)} reports → {len(chunks)} chunks: {update.added} added, {update.present} already "
                      f"indexed, {update.removed} superseded ones of edited reports removed "
                      f"({len(chunks) / max(seconds, 1e-9):.0f} chunks/s); the index holds {len(chunk_index)}.")


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Instruction data (.json or .jsonl); captions, rejects, summary and log go beside it.")],
    db: Db = None, chroma_host: ChromaHost = None, chroma_port: ChromaPort = 8000,
    embedder: EmbedderOpt = "embedded",
    questions: Annotated[Optional[Path], typer.Option(help="Question bank YAML (default: the one shipped).")] = None,
    llm: Annotated[str, typer.Option(help="openai:MODEL@URL, ollama:MODEL or local:embedded|ID|PATH.")] = "local:embedded",
    reports: Annotated[Optional[Path], typer.Option(help="The ingest folder, for its report → slide map (default: slide id = report id).")] = None,
    k: Annotated[int, typer.Option("--k", help="Chunks retrieved per question, from that report only.")] = 4,
    max_attempts: Annotated[int, typer.Option(help="Answers tried per question before it is rejected.")] = 3,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 1,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 120.0,
    request_retries: Annotated[int, typer.Option(help="Retries per failed request, with backoff.")] = 2,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of first attempts.")] = 0.0,
    phrasings: Annotated[int, typer.Option(help="Phrasings asked per category and report (0: all).")] = 1,
    captions: Annotated[bool, typer.Option("--captions/--no-captions", help="Also write phase-1 captions.")] = True,
    multi_turn: Annotated[bool, typer.Option("--multi-turn", help="One multi-turn conversation per slide.")] = False,
    cases: Annotated[bool, typer.Option("--cases", help="A report mapped to several slides (ingest --slides) gives case records listing them (one <image> for the list) instead of one record per slide.")] = False,
    keep_not_mentioned: Annotated[bool, typer.Option("--keep-not-mentioned", help="Keep 'not mentioned in the report' answers in the data.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N reports (for a trial run).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Forget earlier answers in the log and start over.")] = False,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Ask every (report, question), validate the short answers, and write LLaVA-format data (resumable)."""
    from ..backends import BackendOptions, build_backend
    from .generate import GenerateConfig, current_records, generate_answers, load_questions
    from .ingest import load_slide_map
    from .records import OutputPaths, RecordOptions, write_outputs

    setup_logging(verbose, quiet)
    config = GenerateConfig(k=k, max_attempts=max_attempts, concurrency=concurrency, timeout=timeout,
                            request_retries=request_retries, temperature=temperature, phrasings=phrasings,
                            captions=captions)
    question_bank = load_questions(questions)
    slide_map = load_slide_map(reports) if reports else None
    paths = OutputPaths.for_out(out)
    if fresh:
        paths.log.unlink(missing_ok=True)
    chunk_index = _open_index(db, chroma_host, chroma_port, embedder)
    indexed = chunk_index.report_ids()
    if not indexed:
        raise ChatEXAONEPathError("The index holds no reports; run `chatexaonepath raider index` first.")
    report_ids = [r for r in indexed if slide_map is None or r in slide_map]
    report_ids = report_ids[:limit] if limit else report_ids
    backend = build_backend(llm, BackendOptions(timeout=timeout, max_retries=request_retries))
    with progress_bar(quiet) as progress:
        task = progress.add_task(f"asking {backend.name}", total=None, unit="answers")
        log, stats = generate_answers(
            chunk_index, backend, question_bank, paths.log, config, report_ids,
            on_plan=lambda total, done: progress.update(task, total=total, completed=done),
            on_record=lambda record: progress.advance(task))
    records = current_records(log, chunk_index.report_versions(), report_ids)
    categories = list(dict.fromkeys(q.category for q in question_bank))
    summary = write_outputs(paths, records, slide_map, RecordOptions(multi_turn, keep_not_mentioned, cases), categories, {
        "backend": backend.name, "config": asdict(config), "asked_this_run": stats.asked,
        "already_done": stats.skipped, "seconds_this_run": round(stats.seconds, 1), "tokens_this_run": stats.usage,
        "reports_without_slides": sorted(set(indexed) - set(slide_map)) if slide_map is not None else [],
    })
    if not quiet:
        _print_summary(summary, paths)


def _print_summary(summary: dict, paths) -> None:
    table = Table(title="RAIDER answers per category")
    for column in ("category", "generated", "not mentioned", "rejected"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category, n in summary["per_category"].items():
        table.add_row(category, str(n["generated"]), str(n["not_mentioned"]), str(n["rejected"]))
    table.add_row("[bold]all", str(summary["generated"]), str(summary["not_mentioned"]), str(summary["rejected"]))
    console.print(table)
    tokens = summary["tokens_this_run"]
    console.print(f"this run: {summary['asked_this_run']} asked ({summary['already_done']} already done) in "
                  f"{summary['seconds_this_run']} s; {tokens.get('prompt_tokens', 0)} prompt + "
                  f"{tokens.get('completion_tokens', 0)} completion tokens.")
    if summary["reports_without_slides"]:
        console.print(f"{len(summary['reports_without_slides'])} indexed reports have no slide and were not asked.")
    console.print(f"{summary['instruction_records']} instruction records → {paths.instructions}\n"
                  f"{summary['caption_records']} caption records → {paths.captions}\n"
                  f"{summary['rejected']} rejects → {paths.rejects}; summary → {paths.summary}")
