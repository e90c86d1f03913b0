"""`SlidePyramid`: OpenSlide's slide interface over any `Slide`, with power-of-two levels whose reads stay bounded.

PNG/JPEG, flat TIFFs and slides whose pyramid has big gaps or no small level have no level a deep-zoom
tile can be cut from cheaply; this gives them one. A tile never reads more than `READ_PIXELS` from the
file; the coarse levels come from one level kept decoded in memory (at most `HELD_LEVEL_PIXELS`), read
once in strips under whatever `reading` holds (the app: a model slot, like a load).
"""

from __future__ import annotations

import math
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import numpy as np
import openslide
from PIL import Image

from ..vision_tower.slide import Slide

TILE_SIZE = 254  # + 2 × overlap = 256, the size viewers fetch best
READ_PIXELS = 4 * 1024 * 1024  # the most one tile may decode from the file
HELD_LEVEL_PIXELS = 8 * 1024 * 1024  # a `SlidePyramid` keeps levels up to this size decoded in memory


class SlidePyramid(openslide.AbstractSlide):
    """OpenSlide's slide interface over any `Slide`, with power-of-two levels whose reads stay bounded.

    Level k is the slide at 2**k× below level 0. It is read from the slide's own nearest finer level
    when that costs at most `READ_PIXELS` per request; otherwise from a level kept decoded in memory
    (the largest at most `HELD_LEVEL_PIXELS`, built once by reading the slide in strips), enlarged
    when no finer held level exists (a huge flat TIFF far out of the zoom range it can serve quickly).
    """

    def __init__(self, slide: Slide, reading: Callable[[], AbstractContextManager] | None = None) -> None:
        super().__init__()
        self._slide = slide
        self._reading = reading or nullcontext  # what a whole-level read holds (a model slot) while it runs
        width, height = slide.dimensions
        dims = [(width, height)]
        while max(dims[-1]) > TILE_SIZE:
            scale = 2 ** len(dims)
            dims.append((math.ceil(width / scale), math.ceil(height / scale)))
        self._dims = tuple(dims)
        self._held_from = next((k for k, (w, h) in enumerate(dims) if k and w * h <= HELD_LEVEL_PIXELS), len(dims) - 1)
        self._held: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def detect_format(cls, filename) -> str | None:
        return None

    def close(self) -> None:
        self._held.clear()  # the slide itself belongs to the caller

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(2**k) for k in range(len(self._dims)))

    @property
    def properties(self) -> dict[str, str]:
        return {openslide.PROPERTY_NAME_VENDOR: self._slide.vendor}

    @property
    def associated_images(self) -> dict[str, Image.Image]:
        return {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return max(0, min(len(self._dims) - 1, int(math.floor(math.log2(max(downsample, 1.0)) + 1e-9))))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA pixels (opaque) of `size` at `level`, its top-left at level-0 `location`."""
        scale = 2**level
        source = self._slide.best_level_for_downsample(scale)
        ratio = scale / self._slide.level_downsamples[source]  # file pixels read per output pixel, per side
        cheap = size[0] * size[1] * ratio * ratio <= READ_PIXELS and (ratio <= 2 or level < self._held_from)
        if level == 0 or cheap:
            read = (max(1, math.ceil(size[0] * ratio)), max(1, math.ceil(size[1] * ratio)))
            pixels = _resized(self._slide.read_region(location, source, read), size)
        else:
            pixels = self._from_held(location, level, size)
        return Image.fromarray(pixels).convert("RGBA")

    def _from_held(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        held = max(level, self._held_from)
        image = self._held_level(held)
        factor = 2 ** (level - held)  # ≤ 1 when enlarging from a coarser held level
        x0, y0 = location[0] / 2**held, location[1] / 2**held
        w, h = size[0] * factor, size[1] * factor
        out = np.full((max(1, math.ceil(h)), max(1, math.ceil(w)), 3), 255, np.uint8)
        left, top = int(math.floor(x0)), int(math.floor(y0))
        piece = image[max(top, 0):max(top, 0) + out.shape[0], max(left, 0):max(left, 0) + out.shape[1]]
        out[:piece.shape[0], :piece.shape[1]] = piece
        return _resized(out, size)

    def _held_level(self, level: int) -> np.ndarray:
        with self._lock:
            if level in self._held:
                return self._held[level]
            with self._reading() as slot:  # a read of a whole level: in turn with loads, making way for answers
                self._slide.checkpoint = getattr(slot, "make_way", None)
                try:
                    return self._build_held(level)
                finally:
                    self._slide.checkpoint = None

    def _build_held(self, level: int) -> np.ndarray:
        if level not in self._held:
            if level == self._held_from:
                image, _ = self._slide.read_at_downsample(2**level)  # in strips: bounded memory
            else:
                image = self._build_held(level - 1)
            self._held[level] = _resized(image, self._dims[level])
        return self._held[level]


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`pixels` at exactly (width, height) = `size`: area-averaged when shrinking, bilinear when enlarging."""
    import cv2

    if (pixels.shape[1], pixels.shape[0]) == tuple(size):
        return pixels
    shrinking = pixels.shape[1] >= size[0] and pixels.shape[0] >= size[1]
    return cv2.resize(pixels, tuple(size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
