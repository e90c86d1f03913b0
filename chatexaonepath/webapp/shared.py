"""What every browser session uses and none owns: the model, the patch encoder, the feature cache, and their locks.

`SharedModel` is all a `WebSession` needs from the app; `AppEngine` (engine.py) extends it with the
registry of live sessions. Sessions depend on this module, the engine on both, so neither imports
the other.

A gate of as many slots as the Gradio queue's concurrency limit guards the model (gate.py), so work
started outside Gradio (the example warm-up, a benchmark, the viewer's tiles) queues the same way,
and questions go before loads; a per-slide lock keeps two sessions from extracting one slide at once.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..assets import private_dir, user_cache_dir
from ..vision_tower.extraction import FeatureExtractor
from .config import AppConfig, GenerationSettings
from .gate import POLL_SECONDS, ModelGate, Slot
from .tiles import TileRegistry

logger = logging.getLogger(__name__)


class SharedModel:
    """The model and patch encoder every session uses, the feature cache, and the locks that share them."""

    def __init__(self, model, extractor: FeatureExtractor, config: AppConfig | None = None) -> None:
        self.model, self.extractor = model.eval(), extractor
        self.config = config or AppConfig()
        features_dir = self.config.features_dir
        # Thumbnails of uploaded slides live here: private to this user, like the uploads.
        self.features_dir = private_dir(Path(features_dir) if features_dir else user_cache_dir() / "features")
        self.default_settings = GenerationSettings(self.config.temperature, self.config.max_new_tokens,
                                                   model.config.system_prompt)
        self.gate = ModelGate(self.config.concurrency)
        self._lock = threading.Lock()
        self._slide_locks: dict[str, list] = {}  # fingerprint → [lock, users]
        # the deep-zoom tiles of each session's slide (viewer.py serves them); a whole-level read for them
        # (a flat slide's overview) takes a slot like a load
        self.tiles = TileRegistry(reading=lambda cancelled: self.model_slot(kind="load", cancelled=cancelled))

    def model_slot(self, on_wait: Callable[[], None] | None = None, *, kind: str = "answer",
                   cancelled: Callable[[], None] | None = None) -> AbstractContextManager[Slot]:
        """Hold one of the model's `concurrency` slots for an `answer` or a `load` (gate.py); `on_wait` is called
        first if none is free, `cancelled()` (which may raise) while waiting."""
        return self.gate.hold(kind, on_wait, cancelled)

    @contextmanager
    def slide_lock(self, fingerprint: str, on_wait: Callable[[], None] | None = None,
                   cancelled: Callable[[], None] | None = None) -> Iterator[None]:
        """Only one session extracts a given slide; the next one then finds its features cached.

        While waiting, `cancelled()` is called every few tenths of a second and may raise (Cancel).
        """
        with self._lock:
            entry = self._slide_locks.setdefault(fingerprint, [threading.Lock(), 0])
            entry[1] += 1  # users holding or waiting; the entry goes when the last one leaves
        lock = entry[0]
        try:
            if not lock.acquire(blocking=False):
                if on_wait is not None:
                    on_wait()
                while not lock.acquire(timeout=POLL_SECONDS):
                    if cancelled is not None:
                        cancelled()
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._slide_locks[fingerprint]
