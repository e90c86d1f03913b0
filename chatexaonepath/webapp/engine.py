"""What every browser session of the app shares: the model, the patch encoder, the feature cache.

The model is loaded once per process; each browser session gets its own `WebSession` (its slide,
its conversation, its private upload folder). A semaphore sized like the Gradio queue's
concurrency limit guards the model, so work started outside Gradio (the example warm-up, a
benchmark) queues the same way; a per-slide lock keeps two sessions from extracting one slide at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..assets import user_cache_dir
from ..errors import ChatEXAONEPathError
from ..vision_tower.extraction import ExtractConfig, FeatureExtractor
from .session import GenerationSettings, WebSession
from .uploads import GB

logger = logging.getLogger(__name__)

EXAMPLE_NAME = "synthetic_tumor"
WORK_DIR_PREFIX = "chatexaonepath-app-"


@dataclass
class AppConfig:
    """Settings of the chat app (the `chatexaonepath app` options map onto these)."""

    model: str | None = None  # a trained checkpoint folder; None: an untrained tower around `llm`
    llm: str = "embedded"  # LLM when no checkpoint is given: HF id, path or "embedded"
    encoder: str | None = None  # None: exaonepath when its weights are found, else random-vit-b16
    encoder_weights: str | None = None
    device: str = "auto"
    max_upload_gb: float = 4.0
    concurrency: int = 1  # model calls at once (Gradio queue limit and engine semaphore)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_patches: int = 8
    example: bool = True  # offer the bundled synthetic slide, its features prepared in the background
    example_size: int = 6144  # level-0 side of the example at 0.25 µm/px: ~80 patches
    features_dir: str | None = None  # feature cache; None: the user cache (shared with `chatexaonepath chat`)

    def __post_init__(self) -> None:
        if not self.max_upload_gb > 0:
            raise ChatEXAONEPathError(f"--max-upload-gb must be more than 0, got {self.max_upload_gb}.")
        if self.concurrency < 1:
            raise ChatEXAONEPathError(f"--concurrency must be at least 1, got {self.concurrency}.")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ChatEXAONEPathError(f"--max-new-tokens must be between 1 and 4096, got {self.max_new_tokens}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise ChatEXAONEPathError(f"--temperature must be between 0 and 2, got {self.temperature}.")
        if not 1 <= self.top_patches <= 32:
            raise ChatEXAONEPathError(f"--top-patches must be between 1 and 32, got {self.top_patches}.")
        if self.example_size < 2048:  # smaller synthetic slides hold less tissue than segmentation keeps
            raise ChatEXAONEPathError(f"The example slide must be at least 2048 px wide, got {self.example_size}.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_gb * GB)


@dataclass
class ModelCard:
    """What the app runs on, named plainly; `warnings` is non-empty when any part is untrained or random."""

    llm: str
    encoder: str
    tower: str
    lora: str
    warnings: list[str]

    @property
    def is_demo(self) -> bool:
        return bool(self.warnings)

    def banner(self) -> str | None:
        """The honest banner shown above everything else, or None for a fully trained model."""
        if not self.warnings:
            return None
        return "Demo weights — answers are not diagnostic: " + "; ".join(self.warnings) + "."

    def rows(self) -> list[tuple[str, str]]:
        return [("LLM", self.llm), ("patch encoder", self.encoder), ("vision tower", self.tower), ("LoRA", self.lora)]


def describe_model(model, extractor: FeatureExtractor, checkpoint: str | None) -> ModelCard:
    """The model card of a loaded model and patch encoder."""
    config = model.config
    llm = config.llm_name_or_path
    if llm == "embedded":
        llm = "embedded SmolLM2-135M-Instruct (a small demo LLM, not the paper's LLaMA-2-7B-chat)"
    encoder = extractor.encoder
    encoder_text = f"{encoder.name} — weights {encoder.weights_source} (sha256 {encoder.weights_sha256[:12]}…)"
    warnings = []
    if encoder.is_random:
        encoder_text = f"{encoder.name} — RANDOM weights ({encoder.weights_source})"
        warnings.append("the patch encoder has random weights")
    if checkpoint is None:
        tower = "untrained (randomly initialised; no checkpoint given with --model)"
    else:
        tower = f"{checkpoint} ({'trained' if config.tower_trained else 'UNTRAINED'})"
    if not config.tower_trained:
        warnings.append("the vision tower is untrained, so answers do not depend on the slide")
    lora = "none" if not config.lora else f"r={config.lora['r']}, alpha={config.lora['alpha']} (from {checkpoint})"
    return ModelCard(llm, encoder_text, tower, lora, warnings)


class AppEngine:
    """The shared model, patch encoder and feature cache, and the live browser sessions."""

    def __init__(self, model, extractor: FeatureExtractor, config: AppConfig | None = None, *,
                 example_path: str | Path | None = None, work_dir: str | Path | None = None) -> None:
        self.model, self.extractor = model.eval(), extractor
        self.config = config or AppConfig()
        self.card = describe_model(model, extractor, self.config.model)
        features_dir = self.config.features_dir
        self.features_dir = Path(features_dir) if features_dir else user_cache_dir() / "features"
        self.example_path = Path(example_path) if example_path else \
            user_cache_dir() / "examples" / f"{EXAMPLE_NAME}-{self.config.example_size}.tiff"
        if work_dir is None:
            _sweep_stale_work_dirs()
            work_dir = tempfile.mkdtemp(prefix=WORK_DIR_PREFIX)  # mode 0700: uploads stay private
            (Path(work_dir) / "pid").write_text(str(os.getpid()))
        self.work_dir = Path(work_dir)
        self.default_settings = GenerationSettings(self.config.temperature, self.config.max_new_tokens,
                                                   model.config.system_prompt)
        self._model_slot = threading.Semaphore(self.config.concurrency)
        self._sessions: dict[str, WebSession] = {}
        self._lock = threading.Lock()
        self._slide_locks: dict[str, threading.Lock] = {}
        self._example_lock = threading.Lock()
        self.example_ready = threading.Event()

    @classmethod
    def load(cls, config: AppConfig) -> "AppEngine":
        """Load the model and patch encoder named in `config` (the slow part of starting the app)."""
        from ..chat.session import load_chat_model
        from ..vision_tower.encoder import build_encoder_or_random

        started = time.perf_counter()
        model = load_chat_model(config.model, config.llm)
        encoder = build_encoder_or_random(config.encoder, config.encoder_weights)
        extract = ExtractConfig(encoder=encoder.name, device=config.device)
        engine = cls(model, FeatureExtractor(extract, encoder), config)
        logger.info("Model and encoder loaded in %.1f s", time.perf_counter() - started)
        return engine

    # -- sessions ----------------------------------------------------------------------------------------
    def session(self, session_id: str) -> WebSession:
        """The session of one browser tab, created on first use."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = WebSession(self, self.work_dir / "sessions" / f"{len(self._sessions)}-{os.urandom(6).hex()}")
                self._sessions[session_id] = session
            return session

    def end_session(self, session_id: str) -> None:
        """Forget a browser session and delete its uploads (called when the tab closes)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def close(self) -> None:
        """End every session and delete the private work folder."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- guarding the model ------------------------------------------------------------------------------
    @contextmanager
    def model_slot(self, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold one of the model's `concurrency` slots; `on_wait` is called first if none is free."""
        if not self._model_slot.acquire(blocking=False):
            if on_wait is not None:
                on_wait()
            self._model_slot.acquire()
        try:
            yield
        finally:
            self._model_slot.release()

    @contextmanager
    def slide_lock(self, fingerprint: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Only one session extracts a given slide; the next one then finds its features cached."""
        with self._lock:
            lock = self._slide_locks.setdefault(fingerprint, threading.Lock())
        if not lock.acquire(blocking=False):
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # -- the bundled example -----------------------------------------------------------------------------
    def example_slide(self) -> Path:
        """The synthetic example slide, generated into the cache on first use (a few seconds)."""
        from ..vision_tower.synthetic import make_synthetic_slide

        with self._example_lock:
            if not self.example_path.exists():
                started = time.perf_counter()
                size = self.config.example_size
                make_synthetic_slide(self.example_path, "tumor", (size, size), mpp=0.25, seed=7)
                logger.info("Made the example slide %s in %.1f s", self.example_path, time.perf_counter() - started)
        return self.example_path

    def warm_up_example(self) -> None:
        """Extract the example's features into the cache, so picking it later is instant; never raises."""
        session = WebSession(self, self.work_dir / "warm-up")
        try:
            started = time.perf_counter()
            session.load(self.example_slide())
            logger.info("Example slide ready in %.1f s", time.perf_counter() - started)
        except Exception:  # the app serves without the example's features; a user's load will retry
            logger.exception("Preparing the example slide failed")
        finally:
            session.close()
            self.example_ready.set()

    def start_warm_up(self) -> threading.Thread:
        """Run `warm_up_example` in a background thread."""
        thread = threading.Thread(target=self.warm_up_example, name="example-warm-up", daemon=True)
        thread.start()
        return thread


def _sweep_stale_work_dirs() -> None:
    """Delete work folders left by app processes that were killed (no cleanup ran)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORK_DIR_PREFIX}*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            pid = int((folder / "pid").read_text())
            os.kill(pid, 0)  # raises if that process is gone
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("Removed the stale app folder %s", folder)
        except (OSError, ValueError):  # no pid file yet, or another user's process: leave it alone
            continue
