"""Deep-zoom tiles of each session's slide: OpenSlide's `DeepZoomGenerator`, JPEG, an in-memory LRU, and tokens.

Every slide a session shows is published under two random secrets: a `token` in its URLs (a guessed
one finds nothing: 404) and a `key` the session's page keeps as a cookie scoped to those URLs (a
request without it, from another browser session, is refused: 403).

Tiles come from `openslide.deepzoom.DeepZoomGenerator` for every format the app opens. OpenSlide
handles with a dense pyramid go to it directly; everything else — PNG/JPEG, flat TIFFs, and slides
whose pyramid has big gaps or no small level — goes through `SlidePyramid` (pyramid.py), power-of-two
levels whose reads stay bounded whatever the file; its one whole-level read runs under a model slot
like a load and stops when the slide stops being shown.

At most `MAX_OPEN_SLIDES` slides are held open, counted where a slide is opened (publishing one opens
it to find its tissue outline and geometry): opening one more closes the least recently used.
"""

from __future__ import annotations

import collections
import hmac
import io
import logging
import math
import secrets
import threading
import weakref
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator

import numpy as np
import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from ..errors import ChatEXAONEPathError, SlideError
from ..vision_tower.slide import Slide
from . import pyramid
from .memory import release_memory
from .pyramid import TILE_SIZE, SlidePyramid

logger = logging.getLogger(__name__)

TILE_OVERLAP = 1
JPEG_QUALITY = 80
CACHE_BYTES = 128 * 1024 * 1024  # ~6,000 tiles of ~20 kB, shared by every session
MAX_OPEN_SLIDES = 4  # slides held open for tiles at once; the least recently viewed closes (reopened on demand)
MAX_LEVEL_STEP = 4.5  # OpenSlide pyramids with bigger steps between levels go through `SlidePyramid`


class TileNotFound(ChatEXAONEPathError):
    """No such slide or tile (an unknown token, a tile outside the pyramid, a slide whose session ended)."""


class TileForbidden(ChatEXAONEPathError):
    """The slide exists but belongs to another browser session."""


def _dense_pyramid(handle) -> bool:
    """True for an OpenSlide handle whose levels step by at most `MAX_LEVEL_STEP` down to a small one."""
    if not isinstance(handle, openslide.OpenSlide):
        return False
    downsamples = list(handle.level_downsamples)
    steps = [b / a for a, b in zip(downsamples, downsamples[1:])]
    coarsest = handle.level_dimensions[-1]
    return all(step <= MAX_LEVEL_STEP for step in steps) and coarsest[0] * coarsest[1] <= pyramid.READ_PIXELS


class TileCache:
    """JPEG bytes of recent tiles, least recently used dropped first, within `max_bytes`; thread-safe."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(data) - (len(old) if old is not None else 0)
            self._items[key] = data
            while self.bytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)

    def drop(self, token: str) -> None:
        """Forget every tile of one published slide."""
        with self._lock:
            for key in [k for k in self._items if k[0] == token]:
                self.bytes -= len(self._items.pop(key))

    def __len__(self) -> int:
        return len(self._items)


class SlideTiles:
    """One published slide: its secrets, its deep-zoom geometry, and its tiles (opened lazily, closable at any time)."""

    def __init__(self, opener: Callable[[], Slide], cache: TileCache, alive: Callable[[], bool] = lambda: True,
                 on_open: Callable[["SlideTiles"], None] = lambda tiles: None,
                 reading: Callable[[Callable[[], None]], AbstractContextManager] | None = None) -> None:
        self.token = secrets.token_urlsafe(24)
        self.key = secrets.token_urlsafe(24)
        self.alive = alive
        self._opener, self._cache, self._on_open, self._reading_slot = opener, cache, on_open, reading
        self._slide: Slide | None = None
        self._generator: DeepZoomGenerator | None = None
        self._source: openslide.AbstractSlide | None = None
        self._background = (255, 255, 255)
        self._readers = 0
        self._release_wanted = False
        self.revoked = False
        self._state = threading.Condition()
        # Set by whoever publishes the slide (viewer.py): what its page draws over it, and its patches.
        self.config: dict = {}
        self.overlay: dict = {}
        self.patch_coords = np.zeros((0, 2), np.int64)
        self.patch_side = 0

    # -- opening and closing, safe while other threads read --------------------------------------------
    @contextmanager
    def _reading(self) -> Iterator[DeepZoomGenerator]:
        with self._state:
            if self.revoked:
                raise TileNotFound("This slide is no longer shown.")
            opened = self._generator is None
            if opened:
                self._open()
            self._readers += 1
            generator = self._generator
        if opened:  # outside this slide's lock: it may close other slides, whose readers may be opening theirs
            self._on_open(self)
        try:
            yield generator
        finally:
            with self._state:
                self._readers -= 1
                if self._readers == 0 and (self._release_wanted or self.revoked):
                    self._close()

    def _open(self) -> None:
        slide = self._opener()
        try:
            handle = slide.handle
            source = handle if _dense_pyramid(handle) else SlidePyramid(slide, self._whole_level_slot)
            self._generator = DeepZoomGenerator(source, TILE_SIZE, TILE_OVERLAP, limit_bounds=False)
            colour = source.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
            self._background = tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4)) if len(colour) == 6 else (255,) * 3
        except BaseException:
            slide.close()
            raise
        self._slide, self._source = slide, source
        logger.debug("Opened %s for tiles (%s)", slide.slide_id, type(source).__name__)

    def _whole_level_slot(self) -> AbstractContextManager:
        """What a whole-level read of this slide holds: a model slot, given up when the slide stops being shown."""
        if self._reading_slot is None:
            return nullcontext()
        return self._reading_slot(self._check_shown)

    def _check_shown(self) -> None:
        if self.revoked:
            raise TileNotFound("This slide is no longer shown.")

    def _close(self) -> None:
        if self._slide is not None:
            self._slide.close()
        self._slide = self._generator = self._source = None
        self._release_wanted = False

    def release(self) -> None:
        """Close the slide (now, or when the last tile being read is done); the next request reopens it."""
        with self._state:
            if self._readers:
                self._release_wanted = True
                return
            self._close()
        release_memory()  # a PNG/JPEG held decoded for its tiles: give its memory back

    def revoke(self) -> None:
        """Stop serving this slide for good and forget its tiles."""
        with self._state:
            self.revoked = True
            closed = not self._readers
            if closed:
                self._close()
        self._cache.drop(self.token)
        if closed:
            release_memory()

    @property
    def is_open(self) -> bool:
        return self._generator is not None

    def with_slide(self, work: Callable[[Slide], object]) -> object:
        """Run `work` on the open slide (kept open meanwhile) and return what it returns."""
        with self._reading():
            return work(self._slide)

    # -- what the viewer asks for ----------------------------------------------------------------------
    def geometry(self) -> dict:
        """Level-0 size, tile size, overlap and deep-zoom level count (what the viewer's tile source needs)."""
        with self._reading() as generator:
            width, height = generator.level_dimensions[-1]
            return {"width": width, "height": height, "tile_size": TILE_SIZE, "overlap": TILE_OVERLAP,
                    "levels": generator.level_count}

    def tile(self, level: int, col: int, row: int) -> bytes:
        """The JPEG of one deep-zoom tile, from the cache when it was served lately."""
        key = (self.token, level, col, row)
        data = self._cache.get(key)
        if data is not None:
            return data
        with self._reading() as generator:
            if not 0 <= level < generator.level_count:
                raise TileNotFound(f"There is no deep-zoom level {level}.")
            cols, rows = generator.level_tiles[level]
            if not (0 <= col < cols and 0 <= row < rows):
                raise TileNotFound(f"There is no tile {col}_{row} at level {level}.")
            data = self._read(lambda: self._render(generator, level, col, row))
        self._cache.put(key, data)
        return data

    def _render(self, generator: DeepZoomGenerator, level: int, col: int, row: int) -> bytes:
        # DeepZoomGenerator's own coordinates (which slide level, where, how much), shrunk with OpenCV's
        # area average: `get_tile`'s Pillow Lanczos costs ~11 ms of a 2× tile's ~40, this ~1 ms.
        import cv2

        location, slide_level, size = generator.get_tile_coordinates(level, (col, row))
        rgb = _on_background(np.asarray(self._source.read_region(location, slide_level, size)), self._background)
        target = _tile_size(generator, level, col, row)
        if (rgb.shape[1], rgb.shape[0]) != target:
            rgb = cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise OSError("JPEG encoding failed")
        return encoded.tobytes()

    def region(self, x: int, y: int, width: int, height: int, max_side: int) -> bytes:
        """A level-0 rectangle as JPEG, shrunk to fit `max_side` (full resolution when it already fits)."""
        with self._reading() as generator:
            slide_w, slide_h = generator.level_dimensions[-1]
            x0, y0 = max(0, x), max(0, y)
            x1, y1 = min(slide_w, x + width), min(slide_h, y + height)
            if x1 <= x0 or y1 <= y0:
                raise TileNotFound("The region lies outside the slide.")
            image = self._read(lambda: self._region_image(generator, (x0, y0, x1, y1), max_side))
        return _jpeg(image)

    def _region_image(self, generator: DeepZoomGenerator, box: tuple[int, int, int, int], max_side: int) -> Image.Image:
        # The deep-zoom level at which the region fits `max_side`, built from its (cached) tiles: every
        # read is one tile's, so a region is as bounded as a tile, whatever the slide's format.
        x0, y0, x1, y1 = box
        shrink = max(1.0, max(x1 - x0, y1 - y0) / max_side)
        level = generator.level_count - 1 - min(generator.level_count - 1, int(math.floor(math.log2(shrink))))
        scale = 2 ** (generator.level_count - 1 - level)
        left, top, right, bottom = x0 // scale, y0 // scale, max(x0 // scale + 1, -(-x1 // scale)), \
            max(y0 // scale + 1, -(-y1 // scale))
        canvas = Image.new("RGB", (right - left, bottom - top), "white")
        cols, rows = generator.level_tiles[level]
        for row in range(top // TILE_SIZE, min(rows, (bottom - 1) // TILE_SIZE + 1)):
            for col in range(left // TILE_SIZE, min(cols, (right - 1) // TILE_SIZE + 1)):
                tile = Image.open(io.BytesIO(self.tile(level, col, row)))
                offset_x, offset_y = (TILE_OVERLAP if col else 0), (TILE_OVERLAP if row else 0)
                canvas.paste(tile, (col * TILE_SIZE - offset_x - left, row * TILE_SIZE - offset_y - top))
        fit = min(1.0, max_side / max(canvas.size))
        if fit < 1.0:
            canvas = canvas.resize((max(1, round(canvas.width * fit)), max(1, round(canvas.height * fit))),
                                   Image.Resampling.LANCZOS)
        return canvas

    def _read(self, read: Callable[[], Image.Image]) -> Image.Image:
        try:
            return read()
        except (openslide.OpenSlideError, SlideError, OSError) as e:
            logger.warning("Reading tiles of a slide failed: %s", e)
            raise SlideError("The slide could not be read here (the file is probably corrupt).") from e


def _tile_size(generator: DeepZoomGenerator, level: int, col: int, row: int) -> tuple[int, int]:
    """(width, height) of a deep-zoom tile: the tile side, cut at the level's edge, plus the overlap on inner edges."""
    cols, rows = generator.level_tiles[level]
    width, height = generator.level_dimensions[level]

    def side(index: int, count: int, total: int) -> int:
        inner_edges = (index > 0) + (index < count - 1)
        return min(TILE_SIZE, total - TILE_SIZE * index) + TILE_OVERLAP * inner_edges

    return side(col, cols, width), side(row, rows, height)


def _on_background(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGB from RGBA, transparent (unscanned) areas blended onto the slide's background colour as OpenSlide does."""
    import cv2

    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return rgb
    weight = alpha[..., None].astype(np.float32) / 255.0
    return (rgb * weight + np.asarray(background, np.float32) * (1.0 - weight)).round().astype(np.uint8)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class TileRegistry:
    """The published slides of all sessions: look-ups by token and key, at most `max_open` slides held open."""

    def __init__(self, cache_bytes: int = CACHE_BYTES, max_open: int = MAX_OPEN_SLIDES,
                 reading: Callable[[Callable[[], None]], AbstractContextManager] | None = None) -> None:
        self.cache = TileCache(cache_bytes)
        self.max_open = max_open
        self._reading = reading  # `reading(cancelled)`: what a whole-level read holds (SharedModel: a model slot)
        self._by_token: dict[str, SlideTiles] = {}
        self._by_owner: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()  # owner → token
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def publish(self, owner: object, opener: Callable[[], Slide],
                alive: Callable[[], bool] = lambda: True) -> SlideTiles:
        """Publish `owner`'s slide under new secrets; the slide it showed before stops being served."""
        tiles = SlideTiles(opener, self.cache, alive, on_open=self._note_use, reading=self._reading)
        with self._lock:
            previous = self._by_owner.get(owner)
            self._by_owner[owner] = tiles.token
            self._by_token[tiles.token] = tiles
        if previous is not None:
            self._revoke_token(previous)
        self._sweep()
        return tiles

    def find(self, token: str, key: str | None) -> SlideTiles:
        """The published slide for `token` if `key` is its key; `TileNotFound` or `TileForbidden` otherwise."""
        with self._lock:
            tiles = self._by_token.get(token)
        if tiles is None or tiles.revoked or not tiles.alive():
            if tiles is not None:
                self._revoke_token(token)
            raise TileNotFound("No such slide.")
        if not key or not hmac.compare_digest(key.encode(), tiles.key.encode()):
            raise TileForbidden("This slide belongs to another session.")
        self._note_use(tiles)
        return tiles

    def published(self, owner: object) -> SlideTiles | None:
        """The slide `owner` publishes now, or None."""
        with self._lock:
            tiles = self._by_token.get(self._by_owner.get(owner, ""))
        return tiles if tiles is not None and not tiles.revoked and tiles.alive() else None

    def revoke(self, owner: object) -> None:
        """Stop serving `owner`'s slide (its session ended or cleared it)."""
        with self._lock:
            token = self._by_owner.pop(owner, None)
        if token is not None:
            self._revoke_token(token)

    def _revoke_token(self, token: str) -> None:
        with self._lock:
            tiles = self._by_token.pop(token, None)
            self._recent.pop(token, None)
            for owner, owned in list(self._by_owner.items()):
                if owned == token:
                    del self._by_owner[owner]
        if tiles is not None:
            tiles.revoke()

    def _note_use(self, tiles: SlideTiles) -> None:
        with self._lock:
            self._recent[tiles.token] = None
            self._recent.move_to_end(tiles.token)
            surplus = []
            while len(self._recent) > self.max_open:
                token, _ = self._recent.popitem(last=False)
                if token in self._by_token:
                    surplus.append(self._by_token[token])
        for extra in surplus:
            extra.release()

    def _sweep(self) -> None:
        """Drop slides whose sessions ended without telling (the check is cheap; it runs on each publish)."""
        with self._lock:
            dead = [token for token, tiles in self._by_token.items() if not tiles.alive()]
        for token in dead:
            self._revoke_token(token)

    @property
    def open_count(self) -> int:
        with self._lock:
            return sum(tiles.is_open for tiles in self._by_token.values())

    def __len__(self) -> int:
        return len(self._by_token)

    def close(self) -> None:
        """Stop serving every slide."""
        with self._lock:
            tokens = list(self._by_token)
        for token in tokens:
            self._revoke_token(token)
