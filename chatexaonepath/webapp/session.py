"""One browser session of the app: its slide, its conversation, its private upload folder.

Loading reports progress by stage (reading, tissue, patches k/N with rate and estimate,
aggregation, drawing) and can be cancelled; answers stream piece by piece and can be stopped.
The chat itself is `chat.session.ChatSession`, so the app answers exactly as the CLI does.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ..chat.conversation import Turn
from ..chat.session import ChatSession
from ..errors import ChatEXAONEPathError, MissingMppError
from ..vision_tower.heatmap import AttendedPatch, render_heatmap, top_attended_patches
from ..vision_tower.slide import Slide, open_slide
from .uploads import take_upload

if TYPE_CHECKING:
    from .engine import AppEngine

logger = logging.getLogger(__name__)

VIEW_SIDE = 1024  # long side of the slide view in pixels


class LoadCancelled(ChatEXAONEPathError):
    """The user cancelled loading a slide."""


class _Stopped(Exception):
    """Raised from the streaming callback to end generation when the user presses Stop."""


@dataclass
class LoadProgress:
    """Where loading a slide stands: a stage, a sentence, and for patches the counts, rate and estimate."""

    stage: str  # waiting | reading | tissue | features | aggregating | drawing
    message: str
    done: int = 0
    total: int = 0
    rate: float | None = None  # patches per second
    eta: float | None = None  # seconds left


@dataclass
class GenerationSettings:
    """Per-session generation settings (the app's advanced panel)."""

    temperature: float = 0.0
    max_new_tokens: int = 256
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ChatEXAONEPathError(f"Temperature must be between 0 and 2, got {self.temperature}.")
        if not 1 <= int(self.max_new_tokens) <= 4096:
            raise ChatEXAONEPathError(f"Max new tokens must be between 1 and 4096, got {self.max_new_tokens}.")
        self.max_new_tokens = int(self.max_new_tokens)


@dataclass
class SlideView:
    """What the page shows of a loaded slide: thumbnail with tissue outline, heatmap, top patches."""

    name: str
    summary: str
    outline: np.ndarray  # (H, W, 3) uint8 thumbnail with the tissue outline
    heat: np.ndarray  # (H, W, 3) uint8 thumbnail with every patch fully tinted by its attention
    covered: np.ndarray  # (H, W) bool, pixels inside a patch
    patches: list[AttendedPatch] = field(default_factory=list)

    def compose(self, show_heatmap: bool = True, opacity: float = 0.5) -> np.ndarray:
        """The thumbnail, with the attention heatmap blended over the patches when `show_heatmap`."""
        if not show_heatmap or opacity <= 0:
            return self.outline
        opacity = min(float(opacity), 1.0)
        blended = (self.outline * (1.0 - opacity) + self.heat * opacity).round().astype(np.uint8)
        return np.where(self.covered[..., None], blended, self.outline)


@dataclass
class Reply:
    """A finished (or stopped) answer."""

    text: str
    stopped: bool
    first_token_seconds: float | None
    seconds: float
    new_tokens: int = 0


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/CPU allocation failures (torch raises them as several types)."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def user_message(error: BaseException, doing: str) -> str:
    """One sentence for the page: the error's own for user mistakes, a plain note for the rest.

    Unexpected errors are logged with their traceback; the page never shows one.
    """
    if isinstance(error, ChatEXAONEPathError):
        return str(error)
    if is_out_of_memory(error):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed step took, for the next request
        logger.warning("Out of memory while %s: %s", doing, error)
        return (f"Out of memory while {doing}; try a smaller slide, fewer users at once (--concurrency 1), "
                "fewer new tokens, or a machine with more memory. The app is still running.")
    logger.error("Unexpected error while %s", doing, exc_info=error)
    return (f"Unexpected error while {doing} ({type(error).__name__}: {str(error)[:200]}); the app is still "
            "running and the server log has the details.")


class WebSession:
    """A browser session's slide and conversation; `close` deletes its uploads."""

    def __init__(self, engine: "AppEngine", folder: Path) -> None:
        self.engine = engine
        self.folder = folder
        self.chat = ChatSession(engine.model, engine.extractor.config, features_dir=engine.features_dir,
                                extractor=engine.extractor, max_new_tokens=engine.config.max_new_tokens,
                                temperature=engine.config.temperature)
        self.view: SlideView | None = None
        self.slide_path: Path | None = None
        self.pending_path: Path | None = None  # an upload waiting for its µm/px
        self.stopped_turns: set[int] = set()  # indices of assistant turns cut short by Stop
        self._busy = threading.RLock()  # one load or answer at a time within a session
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self.closed = False

    # -- slides --------------------------------------------------------------------------------------------
    def load_upload(self, upload: str | Path, mpp: float | None = None,
                    on_progress: Callable[[LoadProgress], None] | None = None) -> SlideView:
        """Take an uploaded file into the private folder and load it (see `load`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.pending_path is not None:  # a new upload replaces the one that waited for its µm/px
            self._discard_upload(self.pending_path)
            self.pending_path = None
        path = take_upload(upload, self.folder, self.engine.config.max_upload_bytes)
        try:
            return self.load(path, mpp, on_progress)
        except MissingMppError:
            raise  # kept as `pending_path`, to be loaded again with the µm/px the user enters
        except BaseException:
            self._discard_upload(path)
            raise

    def load_pending(self, mpp: float, on_progress: Callable[[LoadProgress], None] | None = None) -> SlideView:
        """Load again the slide that lacked µm/px, now with `mpp`."""
        if self.pending_path is None:
            raise ChatEXAONEPathError("There is no slide waiting for its µm/px; upload one first.")
        return self.load(self.pending_path, mpp, on_progress)

    def load(self, path: str | Path, mpp: float | None = None,
             on_progress: Callable[[LoadProgress], None] | None = None) -> SlideView:
        """Read a slide, extract (or reuse cached) features, start a new conversation, and draw the view.

        On failure the previous slide and conversation stay as they were; a slide lacking µm/px is
        remembered as `pending_path`, so it can be loaded again with `mpp`.
        """
        report = on_progress or (lambda progress: None)
        path = Path(path)
        self._cancel.clear()
        with self._busy:
            report(LoadProgress("reading", f"Reading {path.name} …"))
            try:
                with open_slide(path, mpp) as slide:  # a corrupt file or missing µm/px fails here, early
                    fingerprint = slide.fingerprint()
            except MissingMppError:
                self.pending_path = path
                raise
            if self.pending_path == path:
                self.pending_path = None
            self._check_cancel()
            same_slide = LoadProgress("waiting", "This slide is being prepared by another request; waiting for "
                                                 "its features …")
            busy_model = LoadProgress("waiting", "Waiting for the model (another request is running) …")
            with self.engine.slide_lock(fingerprint, lambda: report(same_slide)), \
                    self.engine.model_slot(lambda: report(busy_model)):
                self._check_cancel()
                report(LoadProgress("tissue", "Checking the feature cache, finding tissue, laying the patch grid …"))
                previous_slide = self.chat.slide
                loaded = self.chat.load_slide(path, mpp, self._patch_progress(report))
            report(LoadProgress("drawing", "Drawing the attention heatmap and the most-attended patches …"))
            try:
                with open_slide(path, mpp) as slide:
                    self.view = self._render(slide, loaded)
            except BaseException:
                self.chat.slide = previous_slide  # the slide and the conversation go back together
                raise
            previous, self.slide_path = self.slide_path, path
            if previous is not None and previous != path:
                self._discard_upload(previous)  # its features are cached; the file is not needed again
            self.stopped_turns.clear()
            return self.view

    def _discard_upload(self, path: Path) -> None:
        """Delete an uploaded slide (the folder `take_upload` made for it); other paths are left alone."""
        try:
            relative = Path(path).resolve().relative_to(self.folder.resolve())
        except ValueError:  # not an upload (the bundled example)
            return
        shutil.rmtree(self.folder / relative.parts[0], ignore_errors=True)

    def _patch_progress(self, report: Callable[[LoadProgress], None]) -> Callable[[int, int], None]:
        started = time.perf_counter()

        def on_patches(done: int, total: int) -> None:
            if self._cancel.is_set():
                raise LoadCancelled("Loading was cancelled; the previous slide (if any) is still loaded.")
            elapsed = time.perf_counter() - started
            rate = done / elapsed if elapsed > 0 else None
            eta = (total - done) / rate if rate else None
            if done >= total:
                report(LoadProgress("aggregating", f"Aggregating {total} patch features (gated attention) …",
                                    done, total, rate, 0.0))
            else:
                report(LoadProgress("features", f"Features: {done} / {total} patches", done, total, rate, eta))

        return on_patches

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise LoadCancelled("Loading was cancelled; the previous slide (if any) is still loaded.")

    def cancel(self) -> None:
        """Cancel a load in progress (takes effect at the next batch of patches)."""
        self._cancel.set()

    def _render(self, slide: Slide, loaded) -> SlideView:
        features = loaded.features
        side0 = int(features.attrs.get("patch_size_level0") or 0) or None
        coords, attention = features.coords, loaded.attention
        heat = np.asarray(render_heatmap(slide, coords, attention, patch_size_level0=side0, opacity=1.0,
                                         max_side=VIEW_SIDE))
        plain, downsample = slide.read_at_downsample(max(1.0, max(slide.dimensions) / VIEW_SIDE))
        outline = self._outlined(slide, features, plain, downsample)
        patches = top_attended_patches(slide, coords, attention, k=min(self.engine.config.top_patches, len(features)),
                                       patch_size_level0=side0, size=side0 or 256)
        width, height = slide.dimensions
        cache_note = "features from the cache" if not loaded.extracted else "features extracted"
        summary = (f"{slide.slide_id} — {width:,}×{height:,} px at {slide.mpp:.3g} µm/px "
                   f"({slide.vendor}); {len(features)} patches of {features.attrs.get('patch_size', '?')} px at "
                   f"{features.attrs.get('target_mpp', '?')} µm/px; {cache_note}.")
        return SlideView(slide.slide_id, summary, outline, heat, (heat != plain).any(axis=-1), patches)

    def _outlined(self, slide: Slide, features, plain: np.ndarray, downsample: float) -> np.ndarray:
        """The thumbnail with the tissue outline: the extractor's own, else segmented again."""
        import cv2

        thumbnail = features.path.parent / "thumbnails" / f"{slide.slide_id}.png" if features.path else None
        if thumbnail is not None and thumbnail.exists():
            image = cv2.imread(str(thumbnail), cv2.IMREAD_COLOR)
            if image is not None:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                if image.shape[:2] != plain.shape[:2]:
                    image = cv2.resize(image, (plain.shape[1], plain.shape[0]), interpolation=cv2.INTER_AREA)
                return image
        from ..vision_tower.tissue import draw_tissue_outline, segment_tissue

        return draw_tissue_outline(plain, segment_tissue(slide, self.engine.extractor.config.tissue), downsample)

    # -- chat ----------------------------------------------------------------------------------------------
    @property
    def turns(self) -> list[Turn]:
        return self.chat.slide.turns if self.chat.slide is not None else []

    def messages(self) -> list[dict]:
        """The conversation as chat messages ({"role", "content"}), stopped answers marked."""
        out = []
        for i, turn in enumerate(self.turns):
            content = turn.content + (" ⏹ *(stopped)*" if i in self.stopped_turns else "")
            out.append({"role": turn.role, "content": content})
        return out

    def ask(self, question: str, on_text: Callable[[str], None] | None = None,
            settings: GenerationSettings | None = None) -> Reply:
        """Answer `question` about the loaded slide, streaming pieces to `on_text`; `stop()` ends it early.

        A stopped answer stays in the conversation as far as it got (marked in `messages()`).
        """
        self._stop.clear()
        return self._ask(question, on_text, settings)

    def _ask(self, question: str, on_text: Callable[[str], None] | None,
             settings: GenerationSettings | None) -> Reply:
        settings = settings or self.engine.default_settings
        pieces: list[str] = []

        def relay(piece: str) -> None:
            if self._stop.is_set():
                raise _Stopped
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

        started = time.perf_counter()
        with self._busy, self.engine.model_slot():
            self.chat.temperature, self.chat.max_new_tokens = settings.temperature, settings.max_new_tokens
            self.chat.builder.system_prompt = settings.system_prompt or None
            try:
                answer = self.chat.ask(question, relay)
            except _Stopped:
                text = "".join(pieces).strip()
                safe_question = question.strip().replace(self.chat.builder.image_token, "[image]")
                self.chat.slide.turns += [Turn("user", safe_question), Turn("assistant", text)]
                self.stopped_turns.add(len(self.chat.slide.turns) - 1)
                return Reply(text, True, None, time.perf_counter() - started)
        return Reply(answer.text, False, answer.first_token_seconds, time.perf_counter() - started, answer.new_tokens)

    def ask_stream(self, question: str,
                   settings: GenerationSettings | None = None) -> Iterator[tuple[str, Reply | None]]:
        """`ask` as an iterator of (text so far, None) … ending with (final text, Reply).

        Generation starts at once, before the first item is asked for, so a page can redraw while
        the model reads the prompt. Closing the iterator early (the browser went away) stops it;
        one that is dropped without being read needs `stop()`.
        """
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["reply"] = self._ask(question, pieces.put, settings)
            except BaseException as e:  # re-raised in the consumer's thread below
                outcome["error"] = e
            finally:
                pieces.put(None)

        self._stop.clear()
        worker = threading.Thread(target=work, name="answer", daemon=True)
        worker.start()
        return self._relay(pieces, worker, outcome)

    def _relay(self, pieces: queue.SimpleQueue, worker: threading.Thread,
               outcome: dict) -> Iterator[tuple[str, Reply | None]]:
        text = ""
        try:
            while (piece := pieces.get()) is not None:
                text += piece
                yield text, None
        finally:
            if worker.is_alive():
                self._stop.set()
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["reply"].text, outcome["reply"]

    def stop(self) -> None:
        """Stop the answer being generated (at the next token)."""
        self._stop.set()

    def drop_last_exchange(self) -> str:
        """Remove the last question and its answer (for Retry); returns the question."""
        with self._busy:
            turns = self.turns
            if len(turns) < 2 or turns[-1].role != "assistant":
                raise ChatEXAONEPathError("There is no answer to retry yet; ask a question first.")
            self.stopped_turns.discard(len(turns) - 1)
            question = turns[-2].content
            del turns[-2:]
            return question

    def clear(self) -> None:
        """Forget the conversation, keep the slide."""
        with self._busy:
            self.chat.reset()
            self.stopped_turns.clear()

    # -- lifecycle -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what is running and delete this session's uploads."""
        self.closed = True
        self._cancel.set()
        self._stop.set()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.view = None
