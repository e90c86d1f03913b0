"""The `chatexaonepath` command line: one typer app, one group per pipeline stage.

User mistakes (`ChatEXAONEPathError`) print one sentence and exit with code 2, no traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .errors import ChatEXAONEPathError
from .eval.cli import app as eval_app
from .progress import console, progress_bar, setup_logging
from .quickstart import QuickstartConfig
from .raider.cli import app as raider_app
from .train.cli import app as train_app
from .vision_tower.slide import DEFAULT_MAX_LEVEL_PIXELS as MAX_LEVEL_PIXELS
from .vision_tower.slide import DEFAULT_MAX_PIXELS as MAX_PIXELS
from .webapp.cli import app_command, serve_command

app = typer.Typer(help="Chat with a multimodal LLM about whole-slide pathology images.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
slide_app = typer.Typer(help="Whole-slide images → patch features.", no_args_is_help=True)
synth_app = typer.Typer(help="Synthetic slides for tests, demos and benchmarks.", no_args_is_help=True)
app.add_typer(slide_app, name="slide")
app.add_typer(synth_app, name="synth")
# Each stage keeps its commands beside its code (train/cli.py, …) so this file stays a table of contents.
app.add_typer(raider_app, name="raider")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.command("app")(app_command)  # the Gradio chat app; `python app.py` runs the same
app.command("serve")(serve_command)  # the same engine's OpenAI-compatible API without the page

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")]


@slide_app.command("extract")
def slide_extract(
    slides: Annotated[list[Path], typer.Argument(help="Slide files, or folders of slides.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <slide_id>.h5, thumbnails/ and errors.jsonl.")],
    encoder: Annotated[str, typer.Option(help="Patch encoder: exaonepath (real weights) or random-vit-b16 (testing).")] = "exaonepath",
    encoder_weights: Annotated[Optional[str], typer.Option(help="EXAONEPath.ckpt, a weights folder, or a hub repo id to download.")] = None,
    stain_norm: Annotated[str, typer.Option(help="none (paper v3) or macenko.")] = "none",
    stain_target: Annotated[Optional[Path], typer.Option(help="With --stain-norm macenko: fit the reference to this H&E image (EXAONEPath's TCGA target; docs/weights.md).")] = None,
    batch_size: Annotated[int, typer.Option(help="Patches per encoder batch.")] = 32,
    num_workers: Annotated[Optional[int], typer.Option(help="Loader processes (default: none on small CPUs, spare cores with a GPU).")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 (auto: bf16 where the hardware runs it).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px for slides whose metadata lacks it (overrides metadata).")] = None,
    patch_size: Annotated[int, typer.Option(help="Patch side in pixels at --target-mpp.")] = 256,
    target_mpp: Annotated[float, typer.Option(help="µm/px of the patches (0.5 ≈ 20×).")] = 0.5,
    min_tissue: Annotated[float, typer.Option(help="Minimum tissue fraction of a kept patch.")] = 0.25,
    min_saturation: Annotated[int, typer.Option(help="Lowest saturation threshold (0–255) counted as tissue.")] = 12,
    skip_errors: Annotated[bool, typer.Option("--skip-errors/--fail-fast", help="Record bad slides and go on (default), or stop at the first.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for random encoders.")] = 0,
    decoder: Annotated[str, typer.Option(help="auto (DCT-scaled JPEG tiles where a slide allows, else OpenSlide), openslide or dct.")] = "auto",
    max_pixels: Annotated[int, typer.Option(help="Most pixels decoded at once (a whole PNG/JPEG, a TIFF strip or tile); larger slides are refused.")] = MAX_PIXELS,
    max_level_pixels: Annotated[int, typer.Option(help="Largest smallest-level of a slide, read whole (in strips) for the tissue map; larger slides are refused.")] = MAX_LEVEL_PIXELS,
    max_patches_per_slide: Annotated[int, typer.Option(help="Refuse slides with more tissue patches than this (counted from the grid, before any is read).")] = 200_000,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Extract patch features from slides into CLAM/TRIDENT-compatible .h5 files (resumable).

    Under `torchrun` or `accelerate launch` each rank extracts its share of the slides on its own
    GPU and rank 0 prints the whole job's summary (docs/gpu.md).
    """
    from .vision_tower.batch import extract_slides
    from .vision_tower.extraction import ExtractConfig
    from .vision_tower.sharding import Shard
    from .vision_tower.tissue import TissueConfig

    setup_logging(verbose, quiet)
    config = ExtractConfig(
        encoder=encoder, encoder_weights=encoder_weights, stain_norm=stain_norm,
        stain_target=str(stain_target) if stain_target else None, batch_size=batch_size,
        num_workers=num_workers, precision=precision, device=device, mpp=mpp, patch_size=patch_size,
        target_mpp=target_mpp, min_tissue=min_tissue, seed=seed, tissue=TissueConfig(min_saturation=min_saturation),
        decoder=decoder, max_pixels=max_pixels, max_patches_per_slide=max_patches_per_slide,
        max_level_pixels=max_level_pixels,
    )
    shard = Shard.from_env()
    with progress_bar(quiet or not shard.is_main) as progress:  # one rank's bars are enough on a terminal
        def on_slide_start(slide, total):
            task = progress.add_task(slide.slide_id, total=total, unit="patches")
            return lambda done, _total: progress.update(task, completed=done)

        summary = extract_slides(slides, out, config, skip_errors=skip_errors, on_slide_start=on_slide_start,
                                 shard=shard)
    if not shard.is_main:
        return  # rank 0 reports (and fails) for the whole job; an early exit here would cut its output
    if not quiet:
        _print_extract_summary(summary, out)
    if summary.failed:
        console.print(f"[red]{len(summary.failed)} slide(s) failed; see {summary.errors_file}.")
        raise typer.Exit(1)


def _print_extract_summary(summary, out: Path) -> None:
    ranks = f" ({summary.world_size} ranks)" if summary.world_size > 1 else ""
    table = Table(title=f"Features in {out}{ranks}")
    for column in ("slide", "status", "patches", "seconds", "patches/s", "note"):
        table.add_column(column)
    for r in summary.results:
        rate = f"{r.num_patches / r.seconds:.1f}" if r.status == "extracted" and r.seconds > 0 else ""
        table.add_row(r.slide_id, r.status, str(r.num_patches) if r.num_patches >= 0 else "",
                      f"{r.seconds:.1f}" if r.seconds else "", rate, r.error or "")
    console.print(table)
    console.print(f"extracted {summary.count('extracted')}, skipped (already done) {summary.count('skipped')}, "
                  f"locked by another process {summary.count('locked')}, failed {len(summary.failed)}")


@slide_app.command("info")
def slide_info(
    slide: Annotated[Path, typer.Argument(help="A slide file or DICOM folder.")],
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px override.")] = None,
) -> None:
    """Show a slide's format, resolution and pyramid."""
    from .vision_tower.slide import open_slide

    with open_slide(slide, mpp) as s:
        table = Table(title=str(slide))
        table.add_column("level")
        table.add_column("size (px)")
        table.add_column("downsample")
        table.add_column("µm/px")
        for level, ((w, h), ds) in enumerate(zip(s.level_dimensions, s.level_downsamples)):
            table.add_row(str(level), f"{w}×{h}", f"{ds:.3g}", f"{s.mpp * ds:.4g}")
        console.print(f"format: {s.vendor}   level-0 µm/px: {s.mpp:.4g} ({s.mpp_source})")
        console.print(table)


@slide_app.command("encoders")
def slide_encoders() -> None:
    """List the registered patch encoders."""
    from .vision_tower.encoder import available_encoders

    for name in available_encoders():
        typer.echo(name)


@synth_app.command("slide")
def synth_slide(
    out: Annotated[Path, typer.Argument(help="Output .tiff path.")],
    tissue: Annotated[str, typer.Option(help="Tissue class: tumor, stroma, normal, necrosis, lymphoid, adipose.")] = "tumor",
    size: Annotated[int, typer.Option(help="Width and height in level-0 pixels.")] = 4096,
    mpp: Annotated[float, typer.Option(help="Level-0 µm/px (0.25 ≈ 40×, 0.5 ≈ 20×).")] = 0.25,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    no_mpp: Annotated[bool, typer.Option("--no-mpp", help="Omit µm/px from the file (to test that error).")] = False,
    blank: Annotated[bool, typer.Option("--blank", help="Glass only, no tissue.")] = False,
) -> None:
    """Write a pyramidal, tiled, JPEG-compressed synthetic H&E slide that OpenSlide opens."""
    from .synthetic.slides import make_synthetic_slide, tissue_classes

    if tissue not in tissue_classes():
        raise ChatEXAONEPathError(f"Unknown tissue class {tissue!r}; choose one of {', '.join(tissue_classes())}.")
    if size < 256:
        raise ChatEXAONEPathError(f"--size must be at least 256 pixels, got {size}.")
    path = make_synthetic_slide(out, tissue, (size, size), mpp, seed, blank=blank, write_mpp=not no_mpp)
    typer.echo(str(path))


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _write_cohort(make, out: Path, config, slides: int, quiet: bool) -> None:
    """Run a cohort writer (`make(out, config, progress)`) with a bar, then list what it wrote."""
    with progress_bar(quiet) as progress:
        task = progress.add_task("slides", total=slides, unit="slides")
        paths = make(out, config, lambda done, total: progress.update(task, completed=done))
    if not quiet:
        for name, path in paths.items():
            console.print(f"{name:<14} {path}")
        console.print(f"next: chatexaonepath slide extract {paths['slides']} --out {out / 'features'}")


@synth_app.command("cohort")
def synth_cohort(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for slides/, reports/, the data files and labels.csv.")],
    slides: Annotated[int, typer.Option(help="Number of slides (classes in turn).")] = 60,
    classes: Annotated[str, typer.Option(help="Comma-separated tissue classes (tumor, stroma, normal, necrosis, lymphoid, adipose).")] = "tumor,stroma,normal,necrosis,lymphoid",
    size: Annotated[int, typer.Option(help="Slide width and height in level-0 pixels.")] = 1024,
    mpp: Annotated[float, typer.Option(help="Level-0 µm/px.")] = 0.5,
    test_fraction: Annotated[float, typer.Option(help="Fraction of each class's slides held out for testing.")] = 0.25,
    questions: Annotated[int, typer.Option(help="Instruction records per training slide.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Write a synthetic cohort for training checks: slides, reports, caption/QA data, a split by slide."""
    from .synthetic.tissue_cohort import CohortConfig, make_cohort

    config = CohortConfig(slides=slides, classes=_comma_list(classes), size=size,
                          mpp=mpp, test_fraction=test_fraction, questions_per_slide=questions, seed=seed)
    _write_cohort(make_cohort, out, config, slides, quiet)


def _split_sizes(text: str) -> tuple[int, ...]:
    """--split-sizes "3,1,2" → (3, 1, 2): slides per organ × diagnosis in train, validation, test."""
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError as e:
        raise ChatEXAONEPathError(f"--split-sizes takes three whole numbers (train,validation,test), got {text!r}.") from e


@synth_app.command("lesions")
def synth_lesions(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for slides/, masks/, reports/, the data files and labels.csv.")],
    split_sizes: Annotated[str, typer.Option(help="Slides per organ × diagnosis in the train, validation and test splits (a quarter of the diagnoses is no lesion).")] = "3,1,2",
    organs: Annotated[str, typer.Option(help="Comma-separated organs (colon, liver, lymph node).")] = "colon,liver,lymph node",
    lesions: Annotated[str, typer.Option(help="Comma-separated lesion types (adenocarcinoma, squamous cell carcinoma, melanoma).")] = "adenocarcinoma,squamous cell carcinoma,melanoma",
    size: Annotated[int, typer.Option(help="Slide width and height in level-0 pixels at 0.5 µm/px.")] = 3072,
    eval_lesion_area: Annotated[float, typer.Option(help="Lesion share of the tissue on every validation and test slide with a lesion.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Write a lesion cohort (docs/learning.md): organ slides with small lesions, their masks and reports, QA data."""
    from .synthetic.lesions import LesionCohortConfig, make_lesion_cohort

    config = LesionCohortConfig(per_combination=_split_sizes(split_sizes), organs=_comma_list(organs), lesions=_comma_list(lesions),
                                size=size, eval_lesion_area=eval_lesion_area, seed=seed)
    _write_cohort(make_lesion_cohort, out, config, config.slides, quiet)


@app.command("chat")
def chat(
    slides: Annotated[list[Path], typer.Argument(help="The slide to talk about, or the 2-8 slides of one case (asked about together).")],
    model: Annotated[Optional[Path], typer.Option("--model", help="A trained ChatEXAONEPath checkpoint folder.")] = None,
    llm: Annotated[str, typer.Option(help="LLM when no --model is given: a HF id, a path, or 'embedded'.")] = "embedded",
    encoder: Annotated[Optional[str], typer.Option(help="Patch encoder (default: the one the --model was trained on; without one exaonepath if found, else random-vit-b16).")] = None,
    encoder_weights: Annotated[Optional[str], typer.Option(help="EXAONEPath weights file, folder or hub id.")] = None,
    stain_norm: Annotated[Optional[str], typer.Option(help="none or macenko (default: what the --model was trained on).")] = None,
    stain_target: Annotated[Optional[Path], typer.Option(help="Macenko target image (default: the one the --model's features were fitted to).")] = None,
    allow_feature_mismatch: Annotated[bool, typer.Option("--allow-feature-mismatch", help="Use features made differently from the model's training features, with a warning.")] = False,
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px for slides whose metadata lacks it.")] = None,
    question: Annotated[Optional[str], typer.Option("--question", help="Ask one question, print the answer, exit.")] = None,
    region: Annotated[Optional[str], typer.Option(help="Ask about this part of a slide only: level-0 x,y,w,h (e.g. 4096,2048,1024,1024), of the first slide, or N:x,y,w,h of slide N of a case; the model sees the patches inside it (and the case's other slides whole).")] = None,
    heatmap: Annotated[Optional[Path], typer.Option(help="Write the heatmap of the weights the visual tokens were pooled with to this PNG.")] = None,
    clam_heatmap: Annotated[Optional[Path], typer.Option(help="Also write CLAM's gated attention softmax(a) to this PNG (a second view).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy (reproducible) answers.")] = 0.0,
    max_pixels: Annotated[int, typer.Option(help="Most pixels decoded at once (a whole PNG/JPEG, a TIFF strip or tile).")] = MAX_PIXELS,
    max_level_pixels: Annotated[int, typer.Option(help="Largest smallest-level of a slide, read whole (in strips) for the tissue map.")] = MAX_LEVEL_PIXELS,
    max_patches_per_slide: Annotated[int, typer.Option(help="Refuse slides with more tissue patches than this.")] = 200_000,
    verbose: Verbose = False,
) -> None:
    """Chat about a slide, or a case of several, in the terminal (streamed, multi-turn), or ask one --question."""
    from .chat.conversation import MAX_CASE_SLIDES
    from .chat.provenance import serving_extractor
    from .chat.regions import parse_case_region
    from .chat.session import ChatSession, load_chat_model
    from .vision_tower.slide import SlideLimits, open_slide

    limits = SlideLimits(max_pixels=max_pixels, max_patches=max_patches_per_slide, max_level_pixels=max_level_pixels)
    if len(slides) > MAX_CASE_SLIDES:
        raise ChatEXAONEPathError(f"A case has at most {MAX_CASE_SLIDES} slides, got {len(slides)}.")
    # a malformed region (or one naming no slide of the case) fails before the model loads
    slide_index, scope = parse_case_region(region, len(slides)) if region else (0, None)

    setup_logging(verbose)
    chat_model = load_chat_model(model, llm)
    extractor, mismatch = serving_extractor(  # the checkpoint's training settings unless overridden (and refused)
        chat_model.config, encoder=encoder, encoder_weights=encoder_weights, stain_norm=stain_norm,
        stain_target=str(stain_target) if stain_target else None, allow_feature_mismatch=allow_feature_mismatch,
        mpp=mpp)
    if mismatch:
        console.print(f"[bold yellow]Warning:[/] {mismatch}", highlight=False)
    session = ChatSession(chat_model, extractor.config, extractor=extractor, max_new_tokens=max_new_tokens,
                          temperature=temperature, allow_feature_mismatch=allow_feature_mismatch)
    case = len(slides) > 1
    for number, slide in enumerate(slides, start=1):
        with open_slide(slide, mpp, limits=limits) as opened, progress_bar() as progress:
            task = progress.add_task("features", total=None, unit="patches")
            loaded = session.load_slide(opened, mpp, lambda done, total: progress.update(task, completed=done,
                                                                                        total=total), add=number > 1)
            progress.update(task, visible=loaded.extracted)
        console.print(f"{f'Slide {number} ' if case else ''}[bold]{slide.name}[/]: {len(loaded.features)} patches"
                      f"{' (features from cache)' if not loaded.extracted else ''}.", highlight=False)
        if loaded.feature_warning and not mismatch:
            console.print(f"[bold yellow]Warning:[/] {loaded.feature_warning}", highlight=False)
        if loaded.typicality_warning:  # per slide: one unusual slide of a case is worth knowing about
            console.print(f"[bold yellow]Warning:[/] {f'slide {number}: ' if case else ''}"
                          f"{loaded.typicality_warning}", highlight=False)
        _write_heatmaps(slide, loaded, mpp, limits, number if case else None, heatmap, clam_heatmap)
    if not question:
        console.print(f"{f'A case of {len(slides)} slides. ' if case else ''}Type a question; Ctrl-D to quit.")
    questions = [question] if question else None
    while True:
        if questions is not None:
            if not questions:
                break
            text = questions.pop()
        else:
            try:
                text = console.input("[bold cyan]you> [/]")
            except EOFError:
                break
            if not text.strip():
                continue
        sys.stdout.write("model> " if questions is None else "")
        try:
            answer = session.ask(text, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
                                 region=scope, slide=slide_index)
        except ChatEXAONEPathError as e:
            if questions is not None:
                raise
            console.print(f"[bold red]Error:[/] {e}", highlight=False)  # the conversation goes on
            continue
        sys.stdout.write("\n")
        about = f"region {answer.region} ({len(answer.coords)} patches)" if answer.region else "the whole slide"
        if case:
            about = f"{about} of slide {answer.slide_index + 1}" if answer.region else f"the whole case ({len(slides)} slides)"
        chips = ", ".join(f"#{e.rank} {f'slide {e.slide + 1} ' if case else ''}({e.x},{e.y}) {e.weight:.3g}"
                          for e in answer.evidence)
        console.print(f"[dim]about {about}; evidence (level-0 x,y, weight): {chips}[/]", highlight=False)


def _write_heatmaps(slide: Path, loaded, mpp: float | None, limits, number: int | None,
                    heatmap: Path | None, clam_heatmap: Path | None) -> None:
    """The chat command's heatmap PNGs of one slide; in a case each slide's file name gets `-N` before its suffix."""
    from .vision_tower.slide import open_slide

    maps = [(path if number is None else path.with_name(f"{path.stem}-{number}{path.suffix}"), weights, name)
            for path, weights, name in ((heatmap, loaded.attention, "pooling-weight heatmap"),
                                        (clam_heatmap, loaded.clam_attention, "CLAM heatmap")) if path is not None]
    if not maps:
        return
    from .vision_tower.heatmap import render_heatmap

    with open_slide(slide, mpp, limits=limits) as s:
        for path, weights, name in maps:
            render_heatmap(s, loaded.features.coords, weights,
                           patch_size_level0=loaded.features.attrs.get("patch_size_level0")).save(path)
            console.print(f"{name}: {path}")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo slide and its features.")] = Path("demo_out"),
    encoder: Annotated[Optional[str], typer.Option(help="Patch encoder (default: exaonepath if its weights are found, else random-vit-b16).")] = None,
    quiet: Quiet = False,
) -> None:
    """Run the vision tower end to end on a synthetic slide and print what it produced."""
    from .synthetic.tower_demo import run_demo

    setup_logging(quiet=quiet)
    with progress_bar(quiet) as progress:
        report = run_demo(out, encoder, progress)
    table = Table(title="ChatEXAONEPath vision tower demo", show_header=False)
    for key, value in report.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every stage's outputs (a rerun resumes).")] = Path("quickstart"),
    split_sizes: Annotated[str, typer.Option(help="Synthetic slides per organ × diagnosis in the train, validation and test splits.")] = ",".join(map(str, QuickstartConfig.split_sizes)),
    encoder: Annotated[Optional[str], typer.Option(help="Patch encoder (default: exaonepath if its weights are found, else random-vit-b16).")] = None,
    raider_llm: Annotated[str, typer.Option(help="LLM backend RAIDER asks (see `raider generate --help`).")] = "local:embedded",
    judge: Annotated[Optional[str], typer.Option(help="LLM backend of the seven-criteria judge, e.g. openai:MODEL@URL (default: the judge is skipped; the embedded 135M LLM cannot write verdicts).")] = None,
    judge_items: Annotated[int, typer.Option(help="Held-out answers the judge reads.")] = 6,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """The whole pipeline on this machine: lesion cohort → features → RAIDER → phase 1 → phase 2 → evaluation."""
    from .quickstart import Quickstart, QuickstartConfig

    setup_logging(verbose, quiet)
    config = QuickstartConfig(split_sizes=_split_sizes(split_sizes), encoder=encoder, raider_llm=raider_llm,
                              judge=judge, judge_items=judge_items)
    with progress_bar(quiet) as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: Optional[int], total: Optional[int]) -> None:
            if stage not in tasks:
                for other in tasks.values():  # the previous stage is over
                    progress.update(other, total=progress.tasks[other].completed or 1,
                                    completed=progress.tasks[other].completed or 1)
                tasks[stage] = progress.add_task(stage, total=None, unit="steps")
            if done is not None:
                progress.update(tasks[stage], completed=done, total=total)

        results = Quickstart(out, config, on_progress).run()
    table = Table(title=f"Quickstart in {out}", show_header=False)
    for stage, outcome in results.items():
        table.add_row(stage, ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in outcome.items()))
    console.print(table)
    evaluation = results.get("evaluation", {})
    if "judge" in evaluation:  # skipped: one clear line, not minutes spent on certain judge errors
        console.print(f"Judge {evaluation['judge']}.", highlight=False)
    if "diagnosis_accuracy" in evaluation:  # the figures bench/learn_lesions.py reports, for this run
        console.print(f"lesion_accuracy: {evaluation['diagnosis_accuracy']:.3f}\n"
                      f"localisation_auc: {evaluation['localisation_auc']:.3f}", highlight=False)
    console.print(f"Chat with the trained model:  chatexaonepath app --model {out / 'model'}\n"
                  f"  or in the terminal:         chatexaonepath chat {out / 'cohort' / 'slides'}/<slide>.tiff "
                  f"--model {out / 'model'}")


def main() -> None:
    """Entry point: run the app, turning user errors into one sentence and exit code 2."""
    started = time.perf_counter()
    try:
        app()
    except ChatEXAONEPathError as e:
        console.print(f"[bold red]Error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print(f"Interrupted after {time.perf_counter() - started:.0f} s; rerun the same command to resume.")
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
