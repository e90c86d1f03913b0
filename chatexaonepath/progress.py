"""Rich progress bars with counts and rates, shared by every long-running command."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, with the unit the task was created with (`unit=` field)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if task.speed is None:
            return Text(f"– {unit}/s", style="progress.data.speed")
        return Text(f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress]:
    """A Progress showing description, bar, done/total, rate, elapsed and remaining time."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=quiet, transient=False,
    )
    with progress:
        yield progress


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Route library logs through rich: warnings by default, info with --verbose, errors with --quiet."""
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", force=True,
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)])
    for noisy in ("urllib3", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:  # transformers' own tqdm bars ("Loading weights") would interleave with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
