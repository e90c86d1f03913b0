"""Opening whole-slide images: every format OpenSlide reads, plus plain PNG/JPEG and flat TIFFs, with a known µm/px.

`open_slide` is the only entry point; it turns every way a file can be wrong into a `SlideError`
with one sentence, so no raw OpenSlide traceback ever reaches a user. Before anything is decoded it
checks the slide against its `SlideLimits` (pixels decoded at once, the area of the smallest level,
which the tissue map and thumbnails read whole; the patch budget is checked by `patch_grid`) and
that every file the format names lies inside the slide's own folder. Long reads call the slide's
`checkpoint` between strips, so whoever reads can stop them (or let more urgent work go first).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BudgetExceededError, MissingMppError, SlideError
from ..fileio import file_sha256
from .images import PlainImage, TiffSegments, megapixels, sniff
from .mpp import MPP_RANGE, floats, metadata_mpp
from .references import check_references

logger = logging.getLogger(__name__)

# File suffixes treated as slides when a directory is given. DICOM slides are folders of .dcm files.
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".dcm", ".png", ".jpg", ".jpeg",
)
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Largest level read in one piece for thumbnails and segmentation (~64 MB as RGBA).
STRIP_PIXELS = 16 * 1024 * 1024
# Below Pillow's own decompression-bomb error (2 × Image.MAX_IMAGE_PIXELS = 179 M): a 10,000² export.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_PATCHES = 200_000
# The tissue map and thumbnails read one level whole, in strips: its area is what such a read costs in
# time (~1–2 × 10^8 px/s), whatever the file's size (a 10 kB TIFF of empty strips can declare 10^10 px).
DEFAULT_MAX_LEVEL_PIXELS = 2_000_000_000
# A whole-slide read this small (a thumbnail) is kept: the heatmap, outline and view of a load read it again.
KEPT_READ_PIXELS = 4 * 1024 * 1024


@dataclass(frozen=True)
class SlideLimits:
    """Budgets checked before the work starts, so memory and time depend on them, not on the file.

    `max_pixels`: the most pixels decoded in one piece — a whole PNG/JPEG, one strip or tile of a
    TIFF or of any OpenSlide format. `max_level_pixels`: the area of the smallest level, which the
    tissue map and thumbnails read whole (in strips, so it bounds time, not memory). `max_patches`:
    the most tissue patches one slide may have (checked by `patch_grid` from the grid, before any
    patch is read).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_patches: int = DEFAULT_MAX_PATCHES
    max_level_pixels: int = DEFAULT_MAX_LEVEL_PIXELS

    def __post_init__(self) -> None:
        if self.max_pixels < 1_000_000:
            raise SlideError(f"--max-pixels must be at least 1,000,000, got {self.max_pixels:,}.")
        if self.max_patches < 1:
            raise SlideError(f"--max-patches-per-slide must be at least 1, got {self.max_patches:,}.")
        if self.max_level_pixels < 1_000_000:
            raise SlideError(f"--max-level-pixels must be at least 1,000,000, got {self.max_level_pixels:,}.")


class Slide:
    """An open whole-slide image with its level-0 µm/px; use it as a context manager.

    Reads return RGB uint8 arrays with transparent (unscanned) areas composited on white.
    The object pickles by path, so DataLoader workers reopen the file in their own process.
    """

    def __init__(self, path: Path, mpp: float, mpp_source: str, handle: object,
                 limits: SlideLimits | None = None) -> None:
        self.path = path
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.limits = limits or SlideLimits()
        self._handle = handle
        self._pid = os.getpid()
        # Called between the pieces of a long read; it may raise to stop the read (a cancelled load).
        self.checkpoint: Callable[[], None] | None = None
        self._fingerprint: str | None = None
        self._kept_read: tuple[tuple, np.ndarray] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the underlying file handle."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "mpp": self.mpp, "mpp_source": self.mpp_source, "limits": self.limits}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._handle = None
        self._pid = -1
        self.checkpoint, self._fingerprint, self._kept_read = None, None, None

    @property
    def handle(self):  # openslide.AbstractSlide
        """The OpenSlide handle, reopened lazily after a fork or unpickling."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = _open_handle(self.path, self.limits)
            self._pid = os.getpid()
        return self._handle

    # -- geometry ----------------------------------------------------------------------------
    @property
    def slide_id(self) -> str:
        """The slide's id: the file stem, or the folder name for DICOM folders."""
        return slide_id_of(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return tuple(self.handle.dimensions)

    @property
    def level_count(self) -> int:
        return self.handle.level_count

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self.handle.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self.handle.level_downsamples]

    @property
    def vendor(self) -> str:
        import openslide

        return self.handle.properties.get(openslide.PROPERTY_NAME_VENDOR, "image")

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is at least as fine as `downsample` (so reads only shrink)."""
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * (1 + 1e-3):
                best = level
        return best

    # -- reading -----------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read `size` (w, h) pixels of `level` at level-0 `location`; returns RGB uint8 H×W×3."""
        import openslide

        try:
            pixels = np.asarray(self.handle.read_region(location, level, size))
        except (openslide.OpenSlideError, OSError, ValueError, RuntimeError) as e:  # RuntimeError: TIFF codecs
            raise SlideError(f"Could not read {self.path} at {location}, level {level}: {e} "
                             "(the file is probably corrupt or truncated).") from e
        return pixels if pixels.shape[-1] == 3 else rgba_to_rgb(pixels)

    def read_level(self, level: int) -> np.ndarray:
        """Read a whole pyramid level as RGB uint8."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def read_at_downsample(self, downsample: float) -> tuple[np.ndarray, float]:
        """The whole slide at about `downsample`× below level 0; returns (RGB image, exact downsample).

        Read from the nearest finer level whose area fits `limits.max_level_pixels` (a coarser one,
        enlarged, when the finer ones do not), in strips, calling `checkpoint` before each strip.
        """
        import cv2

        level = self.best_level_for_downsample(downsample)
        while level < self.level_count - 1 and _area(self.level_dimensions[level]) > self.limits.max_level_pixels:
            level += 1
        width0, height0 = self.dimensions
        target_w, target_h = max(1, round(width0 / downsample)), max(1, round(height0 / downsample))
        key = (level, target_w, target_h)
        if self._kept_read is not None and self._kept_read[0] == key:
            return self._kept_read[1].copy(), width0 / target_w
        level_w, level_h = self.level_dimensions[level]
        _check_level_area(self.path, (level_w, level_h), self.limits)
        if level_w * level_h <= STRIP_PIXELS:
            image = self.read_level(level)
            if (image.shape[1], image.shape[0]) != (target_w, target_h):
                image = cv2.resize(image, (target_w, target_h), interpolation=_interpolation(image, target_w))
        else:
            # A slide without a coarse pyramid level (single-level TIFF, big PNG) would need tens of GB
            # at once: read it in horizontal strips and shrink each one into place.
            image = np.empty((target_h, target_w, 3), np.uint8)
            rows = max(1, STRIP_PIXELS // level_w)
            level_ds = self.level_downsamples[level]
            done = 0
            for top in range(0, level_h, rows):
                bottom = min(level_h, top + rows)
                end = target_h if bottom == level_h else round(bottom * target_h / level_h)
                if end <= done:
                    continue
                if self.checkpoint is not None:
                    self.checkpoint()
                strip = self.read_region((0, round(top * level_ds)), level, (level_w, bottom - top))
                image[done:end] = cv2.resize(strip, (target_w, end - done), interpolation=_interpolation(strip, target_w))
                done = end
        if target_w * target_h <= KEPT_READ_PIXELS:
            self._kept_read = (key, image.copy())
        return image, width0 / target_w

    def fingerprint(self) -> str:
        """The slide's content hash, computed once (`slide_fingerprint`), or the one given with `open_slide`."""
        if self._fingerprint is None:
            self._fingerprint = slide_fingerprint(self.path)
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, mpp={self.mpp:.4g}, dimensions={self.dimensions})"


def _area(dimensions: tuple[int, int]) -> int:
    return int(dimensions[0]) * int(dimensions[1])


def _interpolation(image: np.ndarray, target_width: int) -> int:
    import cv2

    return cv2.INTER_AREA if image.shape[1] >= target_width else cv2.INTER_LINEAR


def _check_level_area(path: Path, dimensions: tuple[int, int], limits: SlideLimits) -> None:
    """A level read whole (in strips) costs time by its area: refuse one past the budget before reading it."""
    width, height = dimensions
    if _area(dimensions) > limits.max_level_pixels:
        raise BudgetExceededError(
            f"{path} is {int(width):,}×{int(height):,} = {megapixels(_area(dimensions))} megapixels at its smallest "
            f"level, which the tissue map reads whole: more than the {megapixels(limits.max_level_pixels)} allowed "
            "(--max-level-pixels); save it as a pyramidal TIFF.")


def slide_id_of(path: Path) -> str:
    """A slide's id: the file stem, or the folder name for DICOM folders (names its features file)."""
    return path.name if path.is_dir() else path.stem


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Drop alpha, painting fully transparent pixels (outside the scanned area) white."""
    import cv2

    # OpenCV's SIMD conversions are ~20× faster than numpy slicing here, and this runs per patch.
    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    alpha = cv2.extractChannel(rgba, 3)
    if cv2.minMaxLoc(alpha)[0] < 255:
        rgb[alpha == 0] = 255
    return rgb


def _open_handle(path: Path, limits: SlideLimits):
    """Open `path` with OpenSlide, or as a flat TIFF or plain image; every failure becomes SlideError."""
    import openslide

    target = _dicom_file(path) if path.is_dir() else path
    try:
        fmt = openslide.OpenSlide.detect_format(str(target))
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(f"Could not read {path}: {e}.") from e
    try:
        if fmt is not None:
            handle = openslide.OpenSlide(str(target))
            try:
                _check_tile_pixels(handle, path, limits)
            except BaseException:
                handle.close()
                raise
            return handle
        # Whole-slide formats are all detected above; anything else must be a flat TIFF or a plain
        # image. Only PNG and JPEG: Pillow's other decoders (EPS runs Ghostscript) are not for uploads.
        kind = sniff(target)
        if kind == "tiff":
            return TiffSegments(target, limits.max_pixels)
        if kind in ("png", "jpeg"):
            return PlainImage(target, kind, limits.max_pixels)
    except (openslide.OpenSlideError, OSError, SyntaxError, ValueError) as e:
        raise SlideError(f"Could not open {path}: {e} (the file is probably corrupt or truncated).") from e
    raise SlideError(f"{path} is not a slide or image that OpenSlide or Pillow can read "
                     f"(unsupported format, or not an image at all).")


def _check_tile_pixels(handle, path: Path, limits: SlideLimits) -> None:
    """OpenSlide decodes a whole tile to read any part of it: a crafted giant tile is a bomb too."""
    props = handle.properties
    for level in range(handle.level_count):
        width, height = floats([props.get(f"openslide.level[{level}].tile-width"),
                                 props.get(f"openslide.level[{level}].tile-height")]) or (0, 0)
        if width * height > limits.max_pixels:
            raise BudgetExceededError(
                f"{path} has {int(width):,}×{int(height):,}-pixel tiles at level {level}, more than the "
                f"{megapixels(limits.max_pixels)} megapixels allowed in one piece (--max-pixels).")


def _dicom_file(folder: Path) -> Path:
    dcm = sorted(folder.glob("*.dcm"))
    if not dcm:
        raise SlideError(f"{folder} is a folder without .dcm files; pass a slide file or a DICOM slide folder.")
    return dcm[0]


def open_slide(path: str | os.PathLike, mpp: float | None = None, *, limits: SlideLimits | None = None,
               root: str | os.PathLike | None = None) -> Slide:
    """Open a whole-slide image (any OpenSlide format, a DICOM folder, a flat TIFF, or PNG/JPEG).

    `mpp` overrides the level-0 µm/px in the slide's metadata; it is required when the metadata
    has none. `limits` bounds what is decoded at once (and carries the patch budget to
    `patch_grid`); every file the slide names must resolve inside `root` (default: the slide's own
    folder). Every failure raises `SlideError` (`MissingMppError` for a missing µm/px,
    `BudgetExceededError` past a limit, `OutsideReferenceError` for a file outside `root`).
    """
    path = Path(path).expanduser()
    limits = limits or SlideLimits()
    if not path.exists():
        raise SlideError(f"Slide file not found: {path}.")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path} is an empty file.")
    if mpp is not None and not (math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise SlideError(f"--mpp {mpp} is not a plausible µm/px (expected {MPP_RANGE[0]}–{MPP_RANGE[1]:g}, "
                         "e.g. 0.25 for a 40× scan, 0.5 for 20×).")
    check_references(path, Path(root) if root is not None else None)  # before OpenSlide reads anything
    handle = _open_handle(path, limits)
    try:
        _check_level_area(path, tuple(handle.level_dimensions[-1]), limits)  # before any pixel is read
        found = metadata_mpp(handle, path)
        _check_readable(handle, path)
    except BaseException:
        handle.close()
        raise
    if mpp is not None:
        if found is not None and abs(found - mpp) > 0.05 * found:
            logger.warning("%s: --mpp %.4g overrides %.4g µm/px from the metadata.", path, mpp, found)
        return Slide(path, float(mpp), "override", handle, limits)
    if found is None:
        handle.close()
        raise MissingMppError(
            f"{path} does not record its resolution (µm per pixel); pass it with --mpp "
            "(e.g. --mpp 0.25 for a 40× scan, --mpp 0.5 for 20×)."
        )
    return Slide(path, found, "metadata", handle, limits)


def _check_readable(handle, path: Path) -> None:
    """Decode a small corner of the coarsest level, so corrupt files fail at open, not mid-batch.

    A plain PNG/JPEG is decoded whole by any read, so it is left for the first real read (inside
    the work that is budgeted and queued), not done here.
    """
    import openslide

    if isinstance(handle, PlainImage):
        return
    level = handle.level_count - 1
    w, h = handle.level_dimensions[level]
    try:
        handle.read_region((0, 0), level, (min(w, 64), min(h, 64)))
    except (openslide.OpenSlideError, OSError, ValueError, RuntimeError) as e:
        raise SlideError(f"Could not decode {path}: {e} (the file is probably corrupt or truncated).") from e


def slide_fingerprint(path: str | os.PathLike) -> str:
    """The slide's content hash: `sha256:` of its file, or of its files' names and hashes for a multi-file slide.

    Whole files, so two slides share cached features only when their bytes are identical (a copy with
    the first, middle and last MiB kept and the rest rewritten is another slide). Each file is read
    once per process (fileio.file_sha256); an upload's hash is taken while it is written.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.suffix.lower() == ".mrxs":  # MIRAX keeps its data in a sibling folder
        data_dir = path.with_suffix("")
        files += sorted(p for p in data_dir.rglob("*") if p.is_file()) if data_dir.is_dir() else []
    if files == [path]:
        return "sha256:" + file_sha256(path)
    digest = hashlib.sha256()
    for file in files:
        # Member names matter for multi-file slides; the slide's own name does not (content only).
        member = "" if file == path else str(file.relative_to(file.parent if path.is_file() else path))
        digest.update(f"{member}\0{file_sha256(file)}\n".encode())
    return "sha256-files:" + digest.hexdigest()


def find_slides(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into slide paths (a folder of .dcm files is one DICOM slide)."""
    slides: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise SlideError(f"Slide file or folder not found: {item}.")
        if item.is_file() or any(item.glob("*.dcm")):
            slides.append(item)
            continue
        found = sorted(p for p in item.iterdir()
                       if (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith("."))
                       or (p.is_dir() and any(p.glob("*.dcm"))))
        if not found:
            raise SlideError(f"No slides found in {item} (looked for {', '.join(SLIDE_SUFFIXES)}).")
        slides.extend(found)
    return slides
