"""Slides without a pyramid that OpenSlide does not read: PNG/JPEG and strip- or tile-organised TIFFs.

Both give the reading interface `Slide` uses from an OpenSlide handle (dimensions, one level,
properties, `read_region`), with a budget on the pixels decoded at once, checked from the header
before anything is decoded:
- a PNG or JPEG is decoded whole, so its width × height must fit the budget;
- a TIFF is decoded one strip or tile at a time (a few kept in a small cache), so only the largest
  strip or tile must fit and memory stays bounded however large the image is.
Pillow's process-wide decompression-bomb limit is left as it is: the budget here is per call.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import BudgetExceededError, SlideError

logger = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Decoded TIFF segments kept for the next read (patches of one grid row share their strips).
SEGMENT_CACHE_PIXELS = 32 * 1024 * 1024
VENDOR_KEY = "openslide.vendor"  # openslide.PROPERTY_NAME_VENDOR, without importing openslide here


def sniff(path: Path) -> str | None:
    """"png", "jpeg" or "tiff" from a file's first bytes; None for anything else."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    return None


def megapixels(pixels: float) -> str:
    """Pixels as megapixels for messages: "3,600", "150", "1.2"."""
    value = pixels / 1e6
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _too_many_pixels(path: Path, what: str, width: int, height: int, max_pixels: int, advice: str) -> BudgetExceededError:
    return BudgetExceededError(
        f"{path} needs {width:,}×{height:,} = {megapixels(width * height)} megapixels decoded at once ({what}), "
        f"more than the {megapixels(max_pixels)} allowed (--max-pixels); {advice}.")


def _checked_mode(path: Path, mode: str) -> None:
    if mode in ("L", "LA", "1"):  # tissue is found by colour saturation: grey has none
        raise SlideError(f"{path} is a greyscale image; a colour (RGB) H&E image is needed.")
    if mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
        # 16-bit and float images would be clipped to white by the 8-bit RGB conversion.
        raise SlideError(f"{path} is a {mode} image; convert it to 8-bit RGB (e.g. PNG or JPEG) first.")


def _pad_region(location: tuple[int, int], size: tuple[int, int], dims: tuple[int, int]):
    """The part of a requested region inside the image: (x0, y0, x1, y1) in image pixels, or None."""
    (x, y), (w, h) = location, size
    if w < 0 or h < 0:
        raise ValueError(f"region size {size} must be non-negative")
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, dims[0]), min(y + h, dims[1])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


class PlainImage:
    """A PNG or JPEG with OpenSlide's reading interface; decoded once, on the first read, within `max_pixels`."""

    def __init__(self, path: Path, kind: str, max_pixels: int) -> None:
        from PIL import JpegImagePlugin, PngImagePlugin

        # The plugin classes read only the header; `Image.open` would also apply Pillow's global
        # bomb limit, which is for unknown callers, while this budget is the caller's own.
        plugin = PngImagePlugin.PngImageFile if kind == "png" else JpegImagePlugin.JpegImageFile
        self.path = path
        try:
            self._image = plugin(str(path))
        except (OSError, SyntaxError, ValueError) as e:
            raise SlideError(f"Could not open {path}: {e} (the file is probably corrupt or truncated).") from e
        width, height = self._image.size
        if width * height > max_pixels:
            self._image.close()
            raise _too_many_pixels(path, f"a {kind.upper()} is decoded whole", width, height, max_pixels,
                                   "save it as a tiled, pyramidal TIFF, which is read piece by piece")
        try:
            _checked_mode(path, self._image.mode)
            if kind == "png":  # chunk checksums, read without decoding: a truncated file fails at open
                with plugin(str(path)) as probe:
                    probe.verify()
        except (OSError, SyntaxError, ValueError) as e:
            self._image.close()
            raise SlideError(f"Could not open {path}: {e} (the file is probably corrupt or truncated).") from e
        except SlideError:
            self._image.close()
            raise
        self.dimensions = (width, height)
        self.level_count = 1
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)
        self.properties = {VENDOR_KEY: "image"}
        self._lock = threading.Lock()
        self._decoded = None

    @property
    def info(self) -> dict:
        """The image's own metadata (DPI, ICC profile), from the header."""
        return self._image.info if self._image is not None else {}

    def _pixels(self):
        with self._lock:
            if self._decoded is None:
                if self._image is None:
                    raise ValueError("Cannot read from a closed slide")
                self._image.load()  # OSError for truncated data, surfaced as SlideError by the caller
                mode = self._image.mode
                target = "RGBA" if mode in ("RGBA", "PA") or "transparency" in self._image.info else "RGB"
                self._decoded = self._image if mode == target else self._image.convert(target)
            return self._decoded

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB(A) uint8 pixels of a level-0 region; outside the image is white."""
        if level != 0:
            raise ValueError(f"level {level} does not exist (a plain image has one level)")
        pixels = self._pixels()
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        inside = _pad_region(location, size, self.dimensions)
        if inside is None:
            return out
        x0, y0, x1, y1 = inside
        piece = np.asarray(pixels.crop(inside))
        if piece.shape[-1] == 4:
            piece = _composite_white(piece)
        out[y0 - location[1]:y1 - location[1], x0 - location[0]:x1 - location[0]] = piece
        return out

    def close(self) -> None:
        """Free the decoded pixels and the file."""
        if self._image is not None:
            self._image.close()
        self._image = self._decoded = None


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


class TiffSegments:
    """A TIFF OpenSlide does not read (no pyramid, stripped), decoded one strip or tile at a time."""

    def __init__(self, path: Path, max_pixels: int) -> None:
        import tifffile

        self.path = path
        try:
            self._tiff = tifffile.TiffFile(path)
            page = self._tiff.pages.first
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as e:
            raise SlideError(f"Could not open {path}: {e} (the file is probably corrupt or truncated).") from e
        try:
            self._setup(page, max_pixels)
        except BaseException:
            self._tiff.close()
            raise
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _setup(self, page, max_pixels: int) -> None:
        from tifffile import PHOTOMETRIC, PLANARCONFIG

        path = self.path
        if page.photometric in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE):
            raise SlideError(f"{path} is a greyscale image; a colour (RGB) H&E image is needed.")
        if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4) or len(page.shape) != 3:
            raise SlideError(f"{path} is a {page.dtype} TIFF with {page.samplesperpixel} samples per pixel; "
                             "convert it to 8-bit RGB first.")
        if page.planarconfig != PLANARCONFIG.CONTIG or page.photometric not in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR):
            raise SlideError(f"{path} stores its colours in a layout this reader does not support; "
                             "save it as an RGB tiled TIFF.")
        height, width = page.shape[:2]
        self._segment = (int(page.chunks[0]), int(page.chunks[1]))  # (rows, columns) per strip or tile
        self._grid = (int(page.chunked[0]), int(page.chunked[1]))  # segments down, across
        seg_h, seg_w = self._segment
        if seg_h * seg_w > max_pixels:
            what = f"one {'tile' if page.is_tiled else 'strip'} of the TIFF"
            raise _too_many_pixels(path, what, seg_w, seg_h, max_pixels,
                                   "save it as a tiled TIFF (e.g. 512×512 tiles), which is read piece by piece")
        self._page = page
        self.dimensions = (int(width), int(height))
        self.level_count = 1
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)
        self.properties = {VENDOR_KEY: "tiff", **_resolution_properties(page)}

    def _decode(self, index: int) -> np.ndarray:
        """One strip or tile as RGB uint8 (rows, columns, 3), from the cache when it was read lately."""
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
            page = self._page
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if count == 0:  # a segment never written: blank glass
                segment = np.full((*self._segment, 3), 255, np.uint8)
            else:
                handle = self._tiff.filehandle
                handle.seek(offset)
                data = handle.read(count)
                segment = np.asarray(page.decode(data, index, jpegtables=page.jpegtables)[0])[0]
                segment = _composite_white(segment) if segment.shape[-1] == 4 else segment
            self._cache[index] = segment
            cached = sum(s.shape[0] * s.shape[1] for s in self._cache.values())
            while len(self._cache) > 1 and cached > SEGMENT_CACHE_PIXELS:
                _, dropped = self._cache.popitem(last=False)
                cached -= dropped.shape[0] * dropped.shape[1]
            return segment

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 pixels of a level-0 region; outside the image is white."""
        if level != 0:
            raise ValueError(f"level {level} does not exist (this TIFF is read as one level)")
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        inside = _pad_region(location, size, self.dimensions)
        if inside is None:
            return out
        x0, y0, x1, y1 = inside
        seg_h, seg_w = self._segment
        for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
            for col in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
                segment = self._decode(row * self._grid[1] + col)
                top, left = row * seg_h, col * seg_w
                sy0, sy1 = max(y0, top), min(y1, top + seg_h, top + segment.shape[0])
                sx0, sx1 = max(x0, left), min(x1, left + seg_w, left + segment.shape[1])
                if sy1 > sy0 and sx1 > sx0:
                    out[sy0 - location[1]:sy1 - location[1], sx0 - location[0]:sx1 - location[0]] = \
                        segment[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
        return out

    def close(self) -> None:
        """Close the file and drop the cached segments."""
        self._cache.clear()
        self._tiff.close()


def _resolution_properties(page) -> dict[str, str]:
    """The TIFF resolution tags under OpenSlide's property names, so µm/px is found the same way."""
    tags = page.tags
    unit, x_res = tags.get("ResolutionUnit"), tags.get("XResolution")
    if unit is None or x_res is None:
        return {}
    value = x_res.value
    try:
        resolution = value[0] / value[1] if isinstance(value, tuple) else float(value)
    except (TypeError, ZeroDivisionError):
        return {}
    name = getattr(unit.value, "name", str(unit.value)).lower()
    return {"tiff.XResolution": repr(resolution), "tiff.ResolutionUnit": name}
