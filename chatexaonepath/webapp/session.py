"""One browser session of the app: its case (one slide or several), its conversation, its private upload folder.

Loading reports progress by stage (reading, tissue, patches k/N with rate and estimate,
aggregation, drawing) and can be cancelled; answers stream piece by piece and can be stopped.
The chat itself is `chat.session.ChatSession`, so the app answers exactly as the CLI does.
A session needs only `SharedModel` (shared.py), never the engine that keeps the sessions.

Every request is checked here against the app's limits, whatever the page allowed: question and
system-prompt length, answer tokens, and a per-session rate of model work. A slide is opened once
per load and read only under the model slot, so at most `concurrency` slides are decoded at a time.

A case is built by loading slides in adding mode (`set_adding`): each joins the conversation instead of
replacing it, within the case budgets (`max_case_slides`, `max_case_patches`, and `max_session_gb` for
every slide's upload together), checked before the work starts; a refused or failed add leaves the case
as it was. Loading without adding mode replaces the whole case. The page shows one slide of the case at
a time (`shown`); a region belongs to one slide (`ask(..., slide=i)`). The API's case, several uploaded
files each loaded in a session of its own, is the first file's session answering with the others' slides
joined for that answer only (`ask(..., joined=...)`), within the same case budgets.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..chat.conversation import Turn
from ..chat.regions import Region, SlideTurn, question_scope
from ..chat.session import ChatSession, LoadedSlide
from ..errors import BudgetExceededError, ChatEXAONEPathError, MissingMppError, ServerBusyError
from ..vision_tower.slide import Slide, open_slide
from .case import CaseSlide, thumbnail_url
from .config import GenerationSettings
from .memory import release_memory
from .messages import is_out_of_memory, missing_mpp_message, user_message
from .shared import SharedModel
from .slide_view import SlideView, render_view
from .uploads import take_upload

__all__ = ["GenerationSettings", "LoadCancelled", "LoadProgress", "Reply", "SlideView", "WebSession",
           "is_out_of_memory", "user_message"]

logger = logging.getLogger(__name__)


def _slide_index(value: object, count: int) -> bool:
    """True for a whole number (not a bool) naming one of `count` slides, from 0."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count


def _numbered(value: object) -> str:
    """A slide index as the page numbers slides (from 1), for a message; a scripted client's oddity is not echoed
    (str() of a 5,000-digit int raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**6:
        return str(value + 1)
    return "of that number"


class LoadCancelled(ChatEXAONEPathError):
    """The user (or the server) cancelled loading a slide."""


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
class Reply:
    """A finished (or stopped) answer."""

    text: str
    stopped: bool
    first_token_seconds: float | None
    seconds: float
    new_tokens: int = 0
    prompt_tokens: int = 0  # the prompt's length in the LLM, the slide's visual tokens included
    evidence: tuple = ()  # the patches that weighed most in the answer (chat/regions.py `Evidence`), heaviest first
    region: Region | None = None  # what it was about, clipped to the slide; None: the whole slide
    patches: int = 0  # patches its visual tokens were made from
    slide: int = 0  # the slide of the case a region (and `patches`) belongs to, 0-based


class WebSession:
    """A browser session's slide and conversation; `close` deletes its uploads and frees its memory."""

    def __init__(self, shared: SharedModel, folder: Path, *, uploads_root: Path | None = None,
                 owner: str | None = None, client: str | None = None) -> None:
        self.shared = shared
        self.folder = folder
        self.owner, self.client = owner, client  # the login and the address that started it (engine.py)
        self.uploads_root = uploads_root  # where the app's own copies of uploads live (deleted when refused)
        config = shared.config
        self.chat = ChatSession(shared.model, shared.extractor.config, features_dir=shared.features_dir,
                                extractor=shared.extractor, max_new_tokens=config.max_new_tokens,
                                temperature=config.temperature, allow_feature_mismatch=config.allow_feature_mismatch)
        self.case: list[CaseSlide] = []  # the ready slides, in the conversation's order (chat.slides)
        self.shown = 0  # which slide of the case the page shows
        self.adding = False  # the next load joins the case instead of replacing it
        self.pending_slide: CaseSlide | None = None  # a slide loading, or the last that failed (the strip shows it)
        self.pending_path: Path | None = None  # an upload waiting for its µm/px
        self.stopped_turns: set[int] = set()  # indices of assistant turns cut short by Stop
        self.last_active = time.monotonic()  # the engine ends sessions idle for too long
        self.notice: str | None = None  # said once instead of "load a slide first" (e.g. after expiry)
        self.claimed: Path | None = None  # an upload taken into the folder, not loaded yet
        self._busy = threading.RLock()  # one load or answer at a time within a session
        self._files = threading.RLock()  # the folder's uploads: claims, discards, the disk budget
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._recent_work: collections.deque[float] = collections.deque()
        self.closed = False

    # -- the case -------------------------------------------------------------------------------------------
    @property
    def view(self) -> SlideView | None:
        """What the page shows of the slide on show (None: no slide)."""
        return self.case[self.shown].view if self.case else None

    @property
    def slide_path(self) -> Path | None:
        """The file of the slide on show (None: no slide)."""
        return self.case[self.shown].path if self.case else None

    @property
    def shown_slide(self):
        """The `LoadedSlide` on show (None: no slide)."""
        return self.chat.slides[self.shown] if self.case and self.shown < len(self.chat.slides) else None

    def strip(self) -> list[CaseSlide]:
        """The case as the strip lists it: the ready slides, then one being added (loading or failed); a slide
        loading to replace the case is listed alone (the case it replaces goes when it is ready)."""
        pending = self.pending_slide
        if pending is None:
            return list(self.case)
        if pending.joins:
            return [*self.case, pending]
        return [pending] if pending.status == "loading" else list(self.case)

    def show_slide(self, index: int) -> CaseSlide:
        """Put slide `index` (0-based) of the case on show."""
        if not _slide_index(index, len(self.case)):
            raise ChatEXAONEPathError(f"This case has {len(self.case)} slide(s); there is no slide {_numbered(index)}.")
        self.shown = index
        self.touch()
        return self.case[index]

    def set_adding(self, on: bool) -> None:
        """Make the next load add a slide to the case (`on`) or replace the case; refused when the case is full."""
        if on:
            if not self.case:
                raise ChatEXAONEPathError("Load a slide first; then slides can be added to its case.")
            self._check_case_room()
        self.adding = bool(on)

    def _check_case_room(self) -> None:
        """Refuse one more slide when the case has `max_case_slides` or its patches are all spent."""
        config = self.shared.config
        if len(self.case) >= config.max_case_slides:
            raise BudgetExceededError(f"This case already has {len(self.case)} slides, the most this server allows "
                                      f"in one conversation (--max-case-slides); load a slide without adding to "
                                      "start a new case.")
        if self.case_patches() >= config.max_case_patches:
            raise BudgetExceededError(f"This case already has {self.case_patches():,} tissue patches, the most this "
                                      "server allows in one conversation (--max-case-patches); load a slide "
                                      "without adding to start a new case.")

    def case_patches(self) -> int:
        """Tissue patches of every slide of the case together."""
        return sum(len(loaded.features) for loaded in self.chat.slides)

    # -- activity and limits -------------------------------------------------------------------------------
    def touch(self) -> None:
        """Note a request now (the idle clock restarts)."""
        self.last_active = time.monotonic()

    @property
    def busy(self) -> bool:
        """True while a load or an answer is running."""
        if self._busy.acquire(blocking=False):
            self._busy.release()
            return False
        return True

    def _admit(self) -> None:
        """Count one piece of model work against the per-session rate, or refuse it."""
        self._check_open()
        limit, now = self.shared.config.max_requests_per_minute, time.monotonic()
        while self._recent_work and now - self._recent_work[0] > 60.0:
            self._recent_work.popleft()
        if len(self._recent_work) >= limit:
            wait = 60.0 - (now - self._recent_work[0])
            raise ServerBusyError(f"This session sent more than {limit} requests in a minute, the most this server "
                                  f"allows (--max-requests-per-minute); try again in {max(1, round(wait))} s.")
        self._recent_work.append(now)

    def _check_open(self) -> None:
        if self.closed:  # a request that raced the session's expiry
            raise ChatEXAONEPathError("This session has ended; reload the page to start a new one.")

    def display_name(self, path: Path) -> str:
        """A slide's name for the page: its path inside its upload, never a server folder."""
        folder = self._upload_folder(path)
        return Path(path).name if folder is None else str(Path(path).resolve().relative_to(folder))

    def upload_folders(self) -> list[Path]:
        """This session's upload folders as messages may name them (user_message strips them)."""
        found = [p for p in self.folder.iterdir() if p.is_dir()] if self.folder.is_dir() else []
        return [*found, *(p.resolve() for p in found)]

    def _checked_question(self, question: str, settings: GenerationSettings | None,
                          region: Region | None = None, slide: int = 0,
                          joined: Sequence[LoadedSlide] = ()) -> GenerationSettings:
        """Refuse a question, settings, case or region past the app's limits, and count it against the rate."""
        config = self.shared.config
        settings = settings or self.shared.default_settings
        if len(question) > config.max_question_chars:
            raise ChatEXAONEPathError(f"The question has {len(question):,} characters; this server accepts up to "
                                      f"{config.max_question_chars:,} (--max-question-chars).")
        settings.check(config)
        if self.chat.slide is None:
            raise ChatEXAONEPathError(self.notice or "Load a slide before asking about it.")
        slides = [*self.chat.slides, *joined]
        if joined:  # the page checks its case as it grows; a case named per question is checked here
            self._check_joined_case(slides)
        if not _slide_index(slide, len(slides)):
            raise ChatEXAONEPathError(f"This case has {len(slides)} slide(s); there is no slide "
                                      f"{_numbered(slide)} to ask about.")
        if region is not None:  # a region outside its slide or without tissue: one sentence
            question_scope(slides[slide], region)
        self._admit()
        return settings

    def _check_joined_case(self, slides: list[LoadedSlide]) -> None:
        """Refuse a case past `max_case_slides` or `max_case_patches`, as the page refuses adding to one."""
        config = self.shared.config
        if len(slides) > config.max_case_slides:
            raise BudgetExceededError(f"The case has {len(slides)} slides; this server allows up to "
                                      f"{config.max_case_slides} in one conversation (--max-case-slides).")
        patches = sum(len(loaded.features) for loaded in slides)
        if patches > config.max_case_patches:
            raise BudgetExceededError(f"The case's slides have {patches:,} tissue patches together; this server "
                                      f"allows up to {config.max_case_patches:,} in one conversation "
                                      "(--max-case-patches).")

    # -- slides --------------------------------------------------------------------------------------------
    def claim_upload(self, upload: str | Path) -> Path:
        """Move an upload into this session's folder now (checked for format and size), for `load_claimed`.

        The page claims each upload as soon as it arrives, so only a scripted client's can sit unclaimed
        in the shared upload folder (the app removes those after a few minutes).
        """
        return self._take(upload, claim=True)

    def _take(self, upload: str | Path, claim: bool = False) -> Path:
        upload = Path(upload)
        with self._files:  # the disk budget is checked and the file moved as one step per session
            self._check_open()
            owned = self.uploads_root is not None and upload.resolve().is_relative_to(self.uploads_root.resolve())
            if self.adding and self.case:
                try:
                    self._check_case_room()  # before the upload is moved in: a refused add stores nothing
                except ChatEXAONEPathError:
                    if owned:
                        upload.unlink(missing_ok=True)
                    raise
            self.folder.mkdir(parents=True, exist_ok=True)
            for replaced in (self.pending_path, self.claimed):  # a new upload replaces one not loaded yet
                if replaced is not None:
                    self._discard_upload(replaced)
            self.pending_path = self.claimed = None
            path = take_upload(upload, self.folder, self.shared.config.upload_limits, owned=owned)
            if claim:
                self.claimed = path
            return path

    def load_claimed(self, on_progress: Callable[[LoadProgress], None] | None = None) -> SlideView:
        """Load the upload `claim_upload` took (see `load`)."""
        self._cancel.clear()
        with self._files:
            path, self.claimed = self.claimed, None
        if path is None:
            raise ChatEXAONEPathError("There is no uploaded slide to load; upload one first.")
        return self._load_upload(path, None, on_progress)

    def load_upload(self, upload: str | Path, mpp: float | None = None,
                    on_progress: Callable[[LoadProgress], None] | None = None) -> SlideView:
        """Take an uploaded file into the private folder and load it (see `load`)."""
        self._cancel.clear()
        return self._load_upload(self._take(upload), mpp, on_progress)

    def _load_upload(self, path: Path, mpp: float | None, on_progress) -> SlideView:
        try:
            return self._load(path, mpp, on_progress)
        except MissingMppError:
            raise  # kept as `pending_path`, to be loaded again with the µm/px the user enters
        except BaseException:
            self._discard_upload(path)
            raise

    def load_pending(self, mpp: float, on_progress: Callable[[LoadProgress], None] | None = None) -> SlideView:
        """Load again the slide that lacked µm/px, now with `mpp`."""
        self._cancel.clear()
        if self.pending_path is None:
            raise ChatEXAONEPathError("There is no slide waiting for its µm/px; upload one first.")
        return self._load(self.pending_path, mpp, on_progress)

    def load(self, path: str | Path, mpp: float | None = None,
             on_progress: Callable[[LoadProgress], None] | None = None) -> SlideView:
        """Read a slide, extract (or reuse cached) features, start a new conversation, and draw the view.

        On failure the previous slide and conversation stay as they were; a slide lacking µm/px is
        remembered as `pending_path`, so it can be loaded again with `mpp`. The load holds a model slot
        as a load (gate.py): it makes way for questions, and Cancel stops it, at each strip and slice.
        """
        self._cancel.clear()
        return self._load(Path(path), mpp, on_progress)

    def _load(self, path: Path, mpp: float | None, on_progress) -> SlideView:
        try:
            return self._load_locked(path, mpp, on_progress)
        finally:
            release_memory()  # the decoded slide and its strips are gone: give the memory back now

    def _load_locked(self, path: Path, mpp: float | None, on_progress) -> SlideView:
        report = on_progress or (lambda progress: None)
        with self._busy:
            self.touch()
            add = self.adding and bool(self.case)
            entry = CaseSlide(path, self.display_name(path), joins=add)
            self.pending_slide = entry
            try:
                view = self._load_entry(entry, mpp, report, add)
            except BaseException as e:
                entry.status, entry.message = "failed", user_message(e, "loading the slide", self.upload_folders())
                raise
            self.pending_slide = None
            return view

    def _load_entry(self, entry: CaseSlide, mpp: float | None, report: Callable[[LoadProgress], None],
                    add: bool) -> SlideView:
        """Load `entry`'s slide into the case (`add`) or as a new case; on any failure the case stays as it was."""
        if add:
            self._check_case_room()
        self._admit()
        path = entry.path
        report(LoadProgress("reading", f"Reading {entry.name} …"))
        slide = self._open(path, mpp, self._patch_room() if add else None)  # budgets fail here, early
        with slide:
            self._check_cancel()
            fingerprint = slide.fingerprint()
            # One message whatever is waited for: saying another request prepares this very slide
            # would tell a user that somebody else loaded it.
            waiting = LoadProgress("waiting", "Waiting for the model (another request is running) …")
            with self.shared.slide_lock(fingerprint, lambda: report(waiting), self._check_cancel), \
                    self.shared.model_slot(lambda: report(waiting), kind="load", cancelled=self._check_cancel) \
                    as slot:
                slide.checkpoint = slot.make_way  # at each strip and slice: Cancel, and questions first
                report(LoadProgress("tissue", "Finding tissue and laying the patch grid …"))
                previous = list(self.chat.slides)
                try:
                    loaded = self._extract(slide, mpp, report, add)
                    if add:
                        self._check_case_patches(entry.name)  # cached features skip the grid's budget
                    report(LoadProgress("drawing", "Drawing the attention heatmap and the most-attended patches …"))
                    # Still under the model slot: drawing reads the slide, so decoding stays one at a time.
                    entry.view = render_view(slide, loaded, self.shared.extractor.config.tissue,
                                             self.shared.config.top_patches)
                except BaseException:
                    self.chat.slides = previous  # the case and the conversation go back together
                    raise
        entry.status, entry.thumbnail = "ready", thumbnail_url(entry.view.outline)
        if add:
            self.case.append(entry)
        else:
            replaced, self.case = self.case, [entry]
            for old in replaced:
                if old.path != entry.path:
                    self._discard_upload(old.path)  # its features are cached; the file is not needed again
            self.stopped_turns.clear()
        self.shown, self.adding = len(self.case) - 1, False
        self.notice = None
        self.touch()
        return entry.view

    def _extract(self, slide: Slide, mpp: float | None, report: Callable[[LoadProgress], None], add: bool):
        """The chat's load of an open slide; an added slide past what the case has left is refused as the case's."""
        try:
            return self.chat.load_slide(slide, mpp, self._patch_progress(report), add=add)
        except BudgetExceededError as e:
            config = self.shared.config
            if not add or self._patch_room() >= config.max_patches_per_slide:
                raise  # the per-slide budget's own sentence
            raise BudgetExceededError(f"{self.display_name(slide.path)} has more tissue patches than this case has "
                                      f"left ({self._patch_room():,} of {config.max_case_patches:,}, "
                                      "--max-case-patches); load it without adding to start a new case.") from e

    def _patch_room(self) -> int:
        """The patches an added slide may have: the per-slide budget, or what the case has left if less."""
        config = self.shared.config
        return min(config.max_patches_per_slide, config.max_case_patches - self.case_patches())

    def _check_case_patches(self, name: str) -> None:
        config = self.shared.config
        total = self.case_patches()
        if total > config.max_case_patches:
            raise BudgetExceededError(f"{name} would take this case to {total:,} tissue patches, past the "
                                      f"{config.max_case_patches:,} this server allows in one conversation "
                                      "(--max-case-patches); load it without adding to start a new case.")

    def _open(self, path: Path, mpp: float | None, max_patches: int | None = None) -> Slide:
        """Open a slide with the app's budgets (`max_patches`: fewer patches, what an added slide's case has left),
        its files confined to its own upload folder."""
        limits = self.shared.config.slide_limits
        if max_patches is not None and max_patches < limits.max_patches:
            limits = dataclasses.replace(limits, max_patches=max(1, max_patches))
        try:
            slide = open_slide(path, mpp, limits=limits, root=self._upload_folder(path))
        except MissingMppError as e:
            self.pending_path = path
            raise MissingMppError(missing_mpp_message(self.display_name(path))) from e
        if self.pending_path == path:
            self.pending_path = None
        return slide

    def open_shown_slide(self) -> Slide:
        """Open the slide on show again for its viewer's tiles, with the load's µm/px, budgets and confinement."""
        loaded, path = self.shown_slide, self.slide_path
        return self.open_case_slide(loaded, path)

    def open_case_slide(self, loaded, path: Path | None) -> Slide:
        """Open one slide of the case again (its viewer's tiles), with its load's µm/px, budgets and confinement."""
        if loaded is None or path is None:
            raise ChatEXAONEPathError("No slide is loaded.")
        return open_slide(path, float(loaded.features.attrs["level0_mpp"]), limits=self.shared.config.slide_limits,
                          root=self._upload_folder(path))

    def _upload_folder(self, path: Path) -> Path | None:
        """The folder `take_upload` made for an uploaded slide; None for other slides (the example)."""
        try:
            relative = Path(path).resolve().relative_to(self.folder.resolve())
        except ValueError:
            return None
        return self.folder.resolve() / relative.parts[0]

    def _discard_upload(self, path: Path) -> None:
        """Delete an uploaded slide (the folder `take_upload` made for it); other paths are left alone."""
        folder = self._upload_folder(path)
        if folder is not None:
            with self._files:
                shutil.rmtree(folder, ignore_errors=True)

    def _patch_progress(self, report: Callable[[LoadProgress], None]) -> Callable[[int, int], None]:
        started = time.perf_counter()

        def on_patches(done: int, total: int) -> None:
            if self._cancel.is_set():
                raise self._cancelled()
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
            raise self._cancelled()

    def _cancelled(self) -> LoadCancelled:
        """Cancel's message names the slide still on show, so the page never leaves the user guessing."""
        shown = self.display_name(self.slide_path) if self.slide_path is not None and self.chat.slide else None
        return LoadCancelled(f"Loading was cancelled; {shown} is still loaded." if shown else
                             "Loading was cancelled; no slide is loaded.")

    def cancel(self) -> None:
        """Cancel a load in progress, waiting or running (it stops at its next strip or slice of patches)."""
        self._cancel.set()

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

    def ask(self, question: str, on_text: Callable[[str], bool | None] | None = None,
            settings: GenerationSettings | None = None, region: Region | None = None,
            history: list[Turn] | None = None, slide: int = 0, joined: Sequence[LoadedSlide] = ()) -> Reply:
        """Answer `question` about the loaded case (or only a `region` of its slide `slide`, 0-based), streaming
        pieces to `on_text`; `stop()` ends it early, and so does `on_text` returning False (the answer so far is
        the reply).

        A stopped answer stays in the conversation as far as it got (marked in `messages()`). `history`
        replaces the conversation before the question (a stateless client sends all of it each time).
        `joined`: slides loaded by other sessions that join this session's case, after its own slides, for this
        answer only (the API's case of several uploaded files), within the case budgets; the conversation stays
        this session's, and theirs are not touched.
        """
        self.touch()
        settings = self._checked_question(question, settings, region, slide, joined)
        self._stop.clear()
        return self._ask(question, on_text, settings, region, history, slide, joined)

    def _ask(self, question: str, on_text: Callable[[str], bool | None] | None,
             settings: GenerationSettings | None, region: Region | None = None,
             history: list[Turn] | None = None, slide: int = 0, joined: Sequence[LoadedSlide] = ()) -> Reply:
        pieces: list[str] = []

        def relay(piece: str) -> bool | None:
            if self._stop.is_set():
                raise _Stopped
            pieces.append(piece)
            return on_text(piece) if on_text is not None else None

        started = time.perf_counter()
        with self._busy, self.shared.model_slot(), self._joined(joined):
            if history is not None:  # set under the session's lock: another request's history cannot slip in
                image = self.chat.builder.image_token  # a literal placeholder in text would be read as a second image
                self.chat.slide.turns = [SlideTurn(t.role, t.content.replace(image, "[image]"), getattr(t, "region", None),
                                                   slide=getattr(t, "slide", 0)) for t in history]
            if settings.seed is not None:
                import torch

                torch.manual_seed(settings.seed)  # the model slot is held: with --concurrency 1 nothing else draws
            self.chat.temperature, self.chat.max_new_tokens = settings.temperature, settings.max_new_tokens
            self.chat.builder.system_prompt = settings.system_prompt or None
            try:
                answer = self.chat.ask(question, relay, region=region, slide=slide)
            except _Stopped:
                text = "".join(pieces).strip()
                safe_question = question.strip().replace(self.chat.builder.image_token, "[image]")
                scope = Region.of(region) if region is not None else None
                self.chat.slide.turns += [SlideTurn("user", safe_question, scope, slide=slide),
                                          SlideTurn("assistant", text, scope, slide=slide)]
                self.stopped_turns.add(len(self.chat.slide.turns) - 1)
                return Reply(text, True, None, time.perf_counter() - started)
        self.touch()
        return Reply(answer.text, False, answer.first_token_seconds, time.perf_counter() - started, answer.new_tokens,
                     answer.prompt_tokens, answer.evidence, answer.region, len(answer.coords), slide)

    @contextlib.contextmanager
    def _joined(self, joined: Sequence[LoadedSlide]) -> Iterator[None]:
        """The case with `joined` after this session's own slides while the answer runs (the session's lock is held).

        Each joins as a shallow copy with no conversation of its own: the chat keeps the conversation on the
        case's first slide, and the other session's slide (its tensors shared, read only) stays as it was.
        """
        if not joined:
            yield
            return
        own = self.chat.slides
        self.chat.slides = [*own, *(dataclasses.replace(loaded, turns=[]) for loaded in joined)]
        try:
            yield
        finally:  # the other sessions' slides are theirs: none stays in this one (nor keeps their memory)
            self.chat.slides = own

    def ask_stream(self, question: str, settings: GenerationSettings | None = None,
                   region: Region | None = None, slide: int = 0) -> Iterator[tuple[str, Reply | None]]:
        """`ask` as an iterator of (text so far, None) … ending with (final text, Reply).

        Generation starts at once, before the first item is asked for, so a page can redraw while
        the model reads the prompt. Closing the iterator early (the browser went away) stops it;
        one that is dropped without being read needs `stop()`.
        """
        self.touch()
        settings = self._checked_question(question, settings, region, slide)  # refused here, before a thread starts
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["reply"] = self._ask(question, pieces.put, settings, region, slide=slide)
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
        """Stop what is running, delete this session's uploads and drop its slide from memory."""
        self.closed = True
        self._cancel.set()
        self._stop.set()
        self.shared.tiles.revoke(self)  # its viewer's tiles stop being served at once
        shutil.rmtree(self.folder, ignore_errors=True)
        # A load or answer still running stops at its next strip, slice or token; wait briefly so its
        # tensors go now rather than when the last reference is collected.
        if self._busy.acquire(timeout=5):
            try:
                self.chat.slide, self.case, self.pending_path, self.pending_slide = None, [], None, None
            finally:
                self._busy.release()
