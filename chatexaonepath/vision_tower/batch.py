"""The resumable batch job behind `slide extract`: many slides → one features folder.

A rerun skips slides already done with the same settings; per-slide lock files let several
processes (or GPUs) share one output folder; a killed run's leftovers are cleaned up when its
slide is retried; bad slides are recorded in `errors.jsonl` and the batch goes on.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ChatEXAONEPathError, SlideError
from ..fileio import atomic_write_json, atomic_write_text
from .extraction import ExtractConfig, FeatureExtractor, ProgressFn, SlideResult
from .features import settings_match
from .slide import Slide, find_slides, open_slide, slide_id_of

logger = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """Counts and per-slide results of one `extract_slides` run."""

    results: list[SlideResult] = field(default_factory=list)
    errors_file: Path | None = None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]


class SlideLock:
    """An exclusive lock per slide, so several processes can share one output folder.

    It is an advisory `flock` on `<slide_id>.lock`: the kernel releases it when its holder exits
    or is killed, so there are no stale locks to detect. (On network filesystems flock may be
    local to each node; give each node its own list of slides there.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another live process holds it."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the holder we waited on may have unlinked the file: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Remove the lock file and release the lock (unlink first, so no one locks a dead file)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def extract_slides(
    inputs: list[str | os.PathLike], out_dir: str | os.PathLike, config: ExtractConfig, *,
    skip_errors: bool = True, on_slide_start: Callable[[Slide, int], ProgressFn | None] | None = None,
    extractor: FeatureExtractor | None = None,
) -> ExtractSummary:
    """Extract features for every slide in `inputs` into `out_dir`, resuming where a run stopped.

    Bad slides are recorded in `out_dir/errors.jsonl` and the batch goes on (`skip_errors=False`
    re-raises the first one instead). `on_slide_start(slide, n_patches)` may return a progress callback.
    """
    out_dir = Path(out_dir)
    slides = find_slides(inputs)
    _check_unique_ids(slides)
    if out_dir.exists() and not out_dir.is_dir():
        raise ChatEXAONEPathError(f"--out {out_dir} is a file; give a folder for the features.")
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = extractor or FeatureExtractor(config)
    _save_config(out_dir, config, extractor)
    summary = ExtractSummary(errors_file=out_dir / "errors.jsonl")
    _forget_errors(summary.errors_file, slides)  # a retried slide's old error no longer applies
    for path in slides:
        result = _extract_one(path, out_dir, config, extractor, on_slide_start)
        summary.results.append(result)
        if result.status == "failed":
            with open(summary.errors_file, "a") as f:
                f.write(json.dumps({"slide": str(path), "error": result.error, "time": time.time()}) + "\n")
            if not skip_errors:
                raise SlideError(result.error)
    return summary


def _extract_one(path: Path, out_dir: Path, config: ExtractConfig, extractor: FeatureExtractor,
                 on_slide_start: Callable | None) -> SlideResult:
    slide_id = slide_id_of(path)
    lock = SlideLock(out_dir / f"{slide_id}.lock")
    started = time.perf_counter()
    try:
        with open_slide(path, config.mpp) as slide:
            target = out_dir / f"{slide_id}.h5"
            if settings_match(target, extractor.settings(slide)):
                logger.info("%s: already extracted with these settings, skipped", slide_id)
                return SlideResult(slide_id, path, -1, 0.0, "skipped")
            if not lock.acquire():
                logger.info("%s: being extracted by another process, skipped", slide_id)
                return SlideResult(slide_id, path, -1, 0.0, "locked")
            if settings_match(target, extractor.settings(slide)):  # finished while we waited
                return SlideResult(slide_id, path, -1, 0.0, "skipped")
            _remove_partial_outputs(out_dir, slide_id)
            prepared = extractor.prepare(slide)
            progress = on_slide_start(slide, len(prepared[1])) if on_slide_start else None
            return extractor.extract(slide, out_dir, progress, prepared)
    except ChatEXAONEPathError as e:
        message = _one_sentence(e)
        logger.error("%s: %s", slide_id, message)
    except Exception as e:  # noqa: BLE001 - a decoder crash on one slide must not end a batch of thousands
        message = f"{type(e).__name__}: {_one_sentence(e)}"
        logger.exception("%s failed unexpectedly", slide_id)
    finally:
        lock.release()
    return SlideResult(slide_id, path, 0, time.perf_counter() - started, "failed", message)


def _remove_partial_outputs(out_dir: Path, slide_id: str) -> None:
    """Delete temp files a killed run left for this slide (safe: we hold its lock)."""
    name = glob.escape(slide_id)
    leftovers = [*out_dir.glob(f".{name}.h5.[0-9]*.tmp"), *(out_dir / "thumbnails").glob(f".{name}.[0-9]*.tmp.png")]
    for leftover in leftovers:
        logger.info("removing %s, left by an interrupted run", leftover)
        leftover.unlink(missing_ok=True)


def _one_sentence(error: Exception) -> str:
    """The error's own message, also when a DataLoader worker wrapped it in a traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text



def _forget_errors(errors_file: Path, slides: list[Path]) -> None:
    """Drop the records of slides this run retries; keep those of other runs sharing the folder."""
    if not errors_file.exists():
        return
    retried = {str(p) for p in slides}
    kept = []
    for line in errors_file.read_text().splitlines():
        try:
            if json.loads(line).get("slide") not in retried:
                kept.append(line)
        except ValueError:
            continue  # a half-written line from a killed run
    atomic_write_text(errors_file, "".join(line + "\n" for line in kept))


def _check_unique_ids(slides: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in slides:
        slide_id = slide_id_of(path)
        if slide_id in seen:
            raise ChatEXAONEPathError(f"Two slides share the id {slide_id!r} ({seen[slide_id]} and {path}); "
                                      "features are named by id, so rename one or extract them separately.")
        seen[slide_id] = path


def _save_config(out_dir: Path, config: ExtractConfig, extractor: FeatureExtractor) -> None:
    record = asdict(config) | {
        "resolved": {"device": str(extractor.device), "precision": extractor.precision,
                     "num_workers": extractor.num_workers, "encoder_weights_sha256": extractor.encoder.weights_sha256,
                     "encoder_weights": extractor.encoder.weights_source},
    }
    atomic_write_json(out_dir / "extract_config.json", record)
