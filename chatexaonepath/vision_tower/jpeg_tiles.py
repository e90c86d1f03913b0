"""Decode less: patches of JPEG-tiled TIFF slides read from their raw tile bytes at a DCT scale.

A 0.5 µm/px patch of a 0.25 µm/px (40×) scan is four 256² JPEG tiles. OpenSlide decodes them at
full resolution and the loader then shrinks 512² to 256². libjpeg-turbo can instead run a reduced
inverse DCT that yields each tile directly at 1/2 (1/4, 1/8) size, and reading the tile bytes
ourselves (tifffile finds them, with the shared JPEGTables) also skips OpenSlide's RGBA canvas.
Pillow's `draft()` exposes that scaled decode; Pillow is already a dependency.

It applies to Aperio SVS and generic tiled TIFFs whose tiles are 8-bit RGB/YCbCr JPEG; NDPI
(restart-interval strips, not tiles), BIF (overlapping tiles), MIRAX, DICOM and the other formats
keep the OpenSlide path. `choose_decoder` picks per slide; its name is recorded in the features file.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import ChatEXAONEPathError, SlideError
from .patching import PatchGrid, read_geometry
from .slide import Slide

logger = logging.getLogger(__name__)

DECODERS = ("auto", "openslide", "dct")
# OpenSlide vendors whose levels are plain TIFF tile grids that line up with OpenSlide's levels.
DCT_VENDORS = ("aperio", "generic-tiff")
# A DCT scale k is used when the read is at least k × the patch, within this margin: a real 40×
# scan at 0.252 µm/px reads 508 px for a 256-px patch and should still decode at 1/2 (254 → 256).
SCALE_TOLERANCE = 0.95
MAX_TILE_SIDE = 4096  # larger "tiles" are strips in disguise, or a crafted file
MAX_TILE_BYTES = 32 << 20
# APP14 "Adobe" with transform 0: tells libjpeg the components are RGB, not YCbCr.
ADOBE_RGB_MARKER = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class TiledJpegLevel:
    """Where one pyramid level's JPEG tiles lie in the file, and how to turn them into RGB."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # (tiles,) int64 byte offsets, row-major
    bytecounts: np.ndarray  # (tiles,) int64; 0 for a missing (sparse) tile
    tables: bytes | None  # the JPEGTables tag: SOI DQT/DHT EOI shared by every tile
    rgb_components: bool  # Photometric RGB and no colour marker in the stream (Aperio)

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)

    def stream(self, tile: bytes) -> bytes:
        """A tile's bytes as one complete JPEG: tables spliced in, RGB marked where the tags say so."""
        head = b"\xff\xd8" + (ADOBE_RGB_MARKER if self.rgb_components else b"")
        if self.tables:
            return head + self.tables[2:-2] + tile[2:]
        return head + tile[2:]


def dct_scale(read_size: int, patch_size: int) -> int:
    """The DCT reduction (8, 4, 2 or 1) that shrinks a `read_size` read towards `patch_size` px."""
    for scale in (8, 4, 2):
        if read_size >= scale * patch_size * SCALE_TOLERANCE:
            return scale
    return 1


def choose_decoder(slide: Slide, patch_size: int, target_mpp: float, requested: str = "auto") -> str:
    """`openslide` or `dct` for this slide: `auto` takes `dct` where the layout allows and it shrinks ≥ 2×.

    `dct` forces the tile path (also without a reduction) and raises `SlideError` where the file is
    not a JPEG-tiled TIFF.
    """
    if requested not in DECODERS:
        raise ChatEXAONEPathError(f"--decoder must be one of {', '.join(DECODERS)}; got {requested!r}.")
    if requested == "openslide":
        return "openslide"
    _, level, read_size = read_geometry(slide, patch_size, target_mpp)
    layout = tiled_jpeg_level(slide, level)
    if requested == "dct":
        if layout is None:
            raise SlideError(f"{slide.path} is not a JPEG-tiled TIFF ({slide.vendor}) at level {level}, so "
                             "--decoder dct cannot read it; use --decoder auto or openslide.")
        return "dct"
    return "dct" if layout is not None and dct_scale(read_size, patch_size) >= 2 else "openslide"


def tiled_jpeg_level(slide: Slide, level: int) -> TiledJpegLevel | None:
    """The tile layout of `slide`'s pyramid `level`, or None when it is not plain JPEG tiles."""
    if slide.vendor not in DCT_VENDORS or not slide.path.is_file():
        return None
    stat = slide.path.stat()
    return _find_level(str(slide.path), stat.st_size, stat.st_mtime_ns, slide.level_dimensions[level])


@functools.lru_cache(maxsize=64)
def _find_level(path: str, size: int, mtime_ns: int, dimensions: tuple[int, int]) -> TiledJpegLevel | None:
    # size and mtime are part of the key so that a rewritten file is looked at again.
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                if (page.imagewidth, page.imagelength) == tuple(dimensions) and _plain_jpeg_tiles(page):
                    return _level_of(page, tif.filehandle)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError) as e:
        logger.info("%s: no tile layout for the DCT decoder (%s); using OpenSlide", path, e)
    return None


def _plain_jpeg_tiles(page) -> bool:
    return bool(
        page.is_tiled and page.compression == 7 and page.photometric in (2, 6) and page.planarconfig == 1
        and page.samplesperpixel == 3 and page.bitspersample == 8 and not page.extrasamples
        and page.tiledepth == 1 and page.fillorder == 1
        and 16 <= page.tilewidth <= MAX_TILE_SIDE and 16 <= page.tilelength <= MAX_TILE_SIDE
    )


def _level_of(page, filehandle) -> TiledJpegLevel | None:
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    across, down = -(-page.imagewidth // page.tilewidth), -(-page.imagelength // page.tilelength)
    if len(offsets) != across * down or len(counts) != len(offsets) or not counts.any():
        return None
    tables = page.jpegtables or None
    rgb_components = False
    if page.photometric == 2:  # RGB: the stream decides unless it carries no marker (as tifffile does)
        first = int(np.flatnonzero(counts)[0])
        filehandle.seek(int(offsets[first]))
        head = (tables[:-2] if tables else b"\xff\xd8") + filehandle.read(min(int(counts[first]), 4096))[2:]
        rgb_components = not _has_colour_marker(head)
    return TiledJpegLevel(page.imagewidth, page.imagelength, page.tilewidth, page.tilelength, offsets, counts,
                          tables, rgb_components)


def _has_colour_marker(stream: bytes) -> bool:
    """True when a JFIF (APP0) or Adobe (APP14) segment precedes the scan."""
    position = 2
    while position + 4 <= len(stream) and stream[position] == 0xFF:
        marker = stream[position + 1]
        if marker == 0xDA:
            break
        length = int.from_bytes(stream[position + 2 : position + 4], "big")
        body = stream[position + 4 : position + 9]
        if (marker == 0xE0 and body.startswith(b"JFIF")) or (marker == 0xEE and body.startswith(b"Adobe")):
            return True
        position += 2 + length
    return False


def _resample(canvas: np.ndarray, left: float, top: float, side: float, out: int) -> np.ndarray:
    """The `side`² square at (left, top) of `canvas` (sub-pixel values allowed) as an `out`² image."""
    if side == out and left.is_integer() and top.is_integer():  # the usual 40× → 0.5 µm/px case
        return np.ascontiguousarray(canvas[int(top) : int(top) + out, int(left) : int(left) + out])
    step = side / out
    if step > 1.05:  # still shrinking: average first, as the OpenSlide path's INTER_AREA does
        x0, y0 = int(left), int(top)
        whole = min(int(np.ceil(side + max(left - x0, top - y0))), canvas.shape[0] - y0, canvas.shape[1] - x0)
        shrunk = max(out, int(round(whole / step)))
        canvas = cv2.resize(canvas[y0 : y0 + whole, x0 : x0 + whole], (shrunk, shrunk), interpolation=cv2.INTER_AREA)
        ratio = whole / shrunk
        left, top, step = (left - x0) / ratio, (top - y0) / ratio, side / ratio / out
    # What is left is at most a slight enlargement (a 0.252 µm/px scan) and a sub-pixel offset:
    # map pixel centres exactly, bilinearly.
    matrix = np.array([[step, 0, left + 0.5 * step - 0.5], [0, step, top + 0.5 * step - 0.5]], np.float64)
    return cv2.warpAffine(canvas, matrix, (out, out), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


class JpegTilePatchReader:
    """Reads a grid's patches from raw JPEG tiles, each decoded at the grid's DCT scale.

    It pickles without its file descriptor, so DataLoader workers open the file themselves.
    """

    name = "dct"

    def __init__(self, slide: Slide, grid: PatchGrid) -> None:
        layout = tiled_jpeg_level(slide, grid.read_level)
        if layout is None:
            raise SlideError(f"{slide.path} has no JPEG tiles at level {grid.read_level} for the DCT decoder.")
        self.path, self.layout, self.grid = Path(slide.path), layout, grid
        self.downsample = slide.level_downsamples[grid.read_level]
        self.scale = dct_scale(grid.read_size, grid.patch_size)
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fd=None, _pid=-1)

    def close(self) -> None:
        """Close this process's file descriptor (reopened on the next read)."""
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.close()

    def read_patch(self, x: int, y: int) -> np.ndarray:
        """The patch at level-0 (x, y) as RGB uint8 (patch_size, patch_size, 3)."""
        layout, scale, size = self.layout, self.scale, self.grid.read_size
        left, top = int(round(x / self.downsample)), int(round(y / self.downsample))
        col0, row0 = left // layout.tile_width, top // layout.tile_height
        col1, row1 = (left + size - 1) // layout.tile_width, (top + size - 1) // layout.tile_height
        tile_w, tile_h = layout.tile_width // scale, layout.tile_height // scale
        canvas = np.full(((row1 - row0 + 1) * tile_h, (col1 - col0 + 1) * tile_w, 3), 255, np.uint8)
        for row in range(row0, min(row1, layout.tiles_down - 1) + 1):
            for col in range(col0, min(col1, layout.tiles_across - 1) + 1):
                tile = self._decode(row * layout.tiles_across + col, tile_w, tile_h)
                if tile is not None:
                    canvas[(row - row0) * tile_h : (row - row0 + 1) * tile_h,
                           (col - col0) * tile_w : (col - col0 + 1) * tile_w] = tile
        # Edge tiles are padded past the level's border; OpenSlide shows nothing (white) there.
        canvas[-(-(layout.height - row0 * layout.tile_height) // scale) :] = 255
        canvas[:, -(-(layout.width - col0 * layout.tile_width) // scale) :] = 255
        return _resample(canvas, (left - col0 * layout.tile_width) / scale,
                         (top - row0 * layout.tile_height) / scale, size / scale, self.grid.patch_size)

    def _decode(self, index: int, width: int, height: int) -> np.ndarray | None:
        """One tile decoded at (width, height) by libjpeg's scaled IDCT; None for a missing tile."""
        from PIL import Image

        count = int(self.layout.bytecounts[index])
        if count == 0:
            return None
        if count > MAX_TILE_BYTES:
            raise SlideError(f"{self.path}: tile {index} claims {count} bytes; the file is corrupt or crafted.")
        data = os.pread(self._descriptor(), count, int(self.layout.offsets[index]))
        try:
            with Image.open(io.BytesIO(self.layout.stream(data)), formats=["JPEG"]) as image:
                if image.size != (self.layout.tile_width, self.layout.tile_height):  # checked before decoding
                    raise SlideError(f"{self.path}: JPEG tile {index} is {image.size[0]}×{image.size[1]} px, not the "
                                     f"{self.layout.tile_width}×{self.layout.tile_height} its tags say; the file is "
                                     "corrupt or crafted.")
                image.draft("RGB", (width, height))
                tile = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise SlideError(f"Could not decode JPEG tile {index} of {self.path}: {e} "
                             "(the file is probably corrupt or truncated).") from e
        if tile.shape != (height, width, 3):
            raise SlideError(f"{self.path}: JPEG tile {index} decodes to {tile.shape[1]}×{tile.shape[0]} px, "
                             f"not the {width}×{height} its tags imply; the file is inconsistent.")
        return tile

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd
