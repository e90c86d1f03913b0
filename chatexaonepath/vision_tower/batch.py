"""The resumable batch job behind `slide extract`: many slides → one features folder.

A rerun skips slides already done with the same settings; per-slide lock files let several
processes on one host share an output folder; under torchrun or accelerate launch each rank takes
its own share of the slides instead (sharding.py); a killed run's leftovers are cleaned up when its
slide is retried; bad slides are recorded in `errors.jsonl` and the batch goes on.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import ChatEXAONEPathError, SlideError
from ..fileio import atomic_write_json, atomic_write_jsonl
from .extraction import ExtractConfig, FeatureExtractor, ProgressFn, SlideResult
from .features import settings_match
from .sharding import Shard
from .slide import Slide, find_slides, open_slide, slide_id_of

logger = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """Counts and per-slide results of one `extract_slides` run."""

    results: list[SlideResult] = field(default_factory=list)
    errors_file: Path | None = None
    world_size: int = 1  # processes whose slides `results` counts (all of a job's ranks on rank 0)

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


class ErrorsLog:
    """`errors.jsonl`, safe for several writers: appended records, the latest per slide counts.

    A line is `{"slide", "error", "time"}` for a failure or `{"slide", "cleared": true, "time"}` when
    a slide that had failed was done since. Each record is one O_APPEND write taken under a shared
    flock; `compact` (one writer, exclusive flock) rewrites the file to the current failures only,
    so no appender's record is lost to the rewrite. `locked=False` is for a file with one writer
    (a rank's own log, which may live on a filesystem where flock does not reach other hosts).
    """

    def __init__(self, path: Path, locked: bool = True) -> None:
        self.path = Path(path)
        self.locked = locked

    @contextmanager
    def _lock(self, mode: int) -> Iterator[None]:
        import fcntl

        fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _guard(self, exclusive: bool):
        import fcntl

        return self._lock(fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) if self.locked else nullcontext()

    def append(self, slide: Path, error: str | None) -> None:
        """Record that `slide` failed with `error`, or (error None) that an earlier failure is cleared."""
        record = {"slide": str(slide), "error": error} if error is not None else {"slide": str(slide), "cleared": True}
        line = (json.dumps(record | {"time": time.time()}, ensure_ascii=False) + "\n").encode()
        with self._guard(exclusive=False):
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def failures(self, merge: Sequence[Path] = ()) -> dict[str, dict]:
        """The current failure record of each slide whose latest record is a failure."""
        records = [r for path in (self.path, *merge) for r in _read_records(path)]
        latest: dict[str, dict] = {}
        for record in sorted(records, key=lambda r: r.get("time", 0.0)):  # stable: file order breaks ties
            latest[record["slide"]] = record
        return {slide: r for slide, r in latest.items() if r.get("error") is not None}

    def compact(self, merge: Sequence[Path] = ()) -> None:
        """Rewrite the file as the current failures (folding in, then removing, the `merge` logs)."""
        if not merge and not self.path.exists():
            return  # nothing recorded: no file, and no lock file either
        with self._guard(exclusive=True):
            current = self.failures(merge)
            if current or self.path.exists():
                atomic_write_jsonl(self.path, current.values())
            for path in merge:
                path.unlink(missing_ok=True)


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a half-written line from a killed run
        if isinstance(record, dict) and "slide" in record:
            records.append(record)
    return records


def extract_slides(
    inputs: list[str | os.PathLike], out_dir: str | os.PathLike, config: ExtractConfig, *,
    skip_errors: bool = True, on_slide_start: Callable[[Slide, int], ProgressFn | None] | None = None,
    extractor: FeatureExtractor | None = None, shard: Shard | None = None,
) -> ExtractSummary:
    """Extract features for every slide in `inputs` into `out_dir`, resuming where a run stopped.

    Bad slides are recorded in `out_dir/errors.jsonl` and the batch goes on (`skip_errors=False`
    re-raises the first one instead). `on_slide_start(slide, n_patches)` may return a progress callback.
    Under torchrun / accelerate launch (`shard`, default from the environment) this rank extracts
    its share on its own GPU, and rank 0 returns the summary of the whole job.
    """
    out_dir = Path(out_dir)
    shard = shard or Shard.from_env()
    slides = find_slides(inputs)
    _check_unique_ids(slides)
    if out_dir.exists() and not out_dir.is_dir():
        raise ChatEXAONEPathError(f"--out {out_dir} is a file; give a folder for the features.")
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = ErrorsLog(out_dir / "errors.jsonl")
    # Ranks may sit on different hosts: each writes its own log, merged by rank 0 at the end.
    own = ErrorsLog(out_dir / f"errors.rank{shard.rank}.jsonl", locked=False) if shard.distributed else errors
    with shard.process_group():
        config = shard.place(config)
        extractor = extractor or FeatureExtractor(config)
        if shard.is_main:
            _save_config(out_dir, config, extractor, shard)
        # Any rank's log may hold an old failure of a slide this rank now owns (another world size).
        failed_before = set(errors.failures(sorted(out_dir.glob("errors.rank*.jsonl")) if shard.distributed else []))
        results = []
        for path in shard.select(slides):
            result = _extract_one(path, out_dir, config, extractor, on_slide_start, use_lock=not shard.distributed)
            results.append(result)
            if result.status == "failed":
                own.append(path, result.error)
                if not skip_errors:
                    raise SlideError(result.error)
            elif result.status in ("extracted", "skipped") and str(path) in failed_before:
                own.append(path, None)  # a retried slide's old error no longer applies
        if not shard.distributed:
            errors.compact()
            return ExtractSummary(results, errors.path)
        gathered = shard.gather(results)
    if not shard.is_main:
        return ExtractSummary(results, errors.path, world_size=1)  # rank 0 reports the job
    errors.compact(sorted(out_dir.glob("errors.rank*.jsonl")))
    order = {str(p): i for i, p in enumerate(slides)}
    merged = sorted((r for part in gathered for r in part), key=lambda r: order[str(r.path)])
    return ExtractSummary(merged, errors.path, world_size=shard.world_size)


def _extract_one(path: Path, out_dir: Path, config: ExtractConfig, extractor: FeatureExtractor,
                 on_slide_start: Callable | None, use_lock: bool = True) -> SlideResult:
    slide_id = slide_id_of(path)
    lock = SlideLock(out_dir / f"{slide_id}.lock")
    started = time.perf_counter()
    try:
        with open_slide(path, config.mpp, limits=config.limits) as slide:
            target = out_dir / f"{slide_id}.h5"
            if settings_match(target, extractor.settings(slide)):
                logger.info("%s: already extracted with these settings, skipped", slide_id)
                return SlideResult(slide_id, path, -1, 0.0, "skipped")
            if use_lock and not lock.acquire():
                logger.info("%s: being extracted by another process, skipped", slide_id)
                return SlideResult(slide_id, path, -1, 0.0, "locked")
            if use_lock and settings_match(target, extractor.settings(slide)):  # finished while we waited
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
    name = re.escape(slide_id)
    # fileio.temp_beside's names, `.<file>.<pid>.<random>.tmp<suffix>`, and the older `.<file>.<pid>.tmp`
    # and `.<slide_id>.<pid>.tmp.png`; matched exactly, so another slide's ("<id>.v2") are left alone.
    patterns = [(out_dir, re.compile(rf"\.{name}\.h5\.\d+(\.[0-9a-f]+)?\.tmp(\.h5)?")),
                (out_dir / "thumbnails", re.compile(rf"\.{name}(\.png)?\.\d+(\.[0-9a-f]+)?\.tmp\.png"))]
    for folder, pattern in patterns:
        for leftover in folder.glob(f".{glob.escape(slide_id)}.*"):
            if pattern.fullmatch(leftover.name):
                logger.info("removing %s, left by an interrupted run", leftover)
                leftover.unlink(missing_ok=True)


def _one_sentence(error: Exception) -> str:
    """The error's own message, also when a DataLoader worker wrapped it in a traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _check_unique_ids(slides: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in slides:
        slide_id = slide_id_of(path)
        if slide_id in seen:
            raise ChatEXAONEPathError(f"Two slides share the id {slide_id!r} ({seen[slide_id]} and {path}); "
                                      "features are named by id, so rename one or extract them separately.")
        seen[slide_id] = path


def _save_config(out_dir: Path, config: ExtractConfig, extractor: FeatureExtractor, shard: Shard) -> None:
    record = asdict(config) | {
        "resolved": {"device": str(extractor.device), "precision": extractor.precision,
                     "num_workers": extractor.num_workers, "encoder_weights_sha256": extractor.encoder.weights_sha256,
                     "encoder_weights": extractor.encoder.weights_source, "world_size": shard.world_size},
    }
    atomic_write_json(out_dir / "extract_config.json", record)
