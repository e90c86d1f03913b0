"""What every browser session of the app shares, and the registry of live sessions.

`AppEngine` is `SharedModel` (shared.py: the model, the patch encoder, the feature cache and their
locks) plus the sessions: each browser session gets its own `WebSession` (its slide, its
conversation, its private upload folder). The page makes a session when it loads (`start_session`),
nothing else does: a call naming no live session is refused, so scripted calls cannot fill the
server with sessions. A session belongs to the client address and the login that made it; at most
`max_sessions_per_client` per address and per login, `max_sessions` in all, and a visitor beyond
that is told the server is busy while every session already open keeps working. Sessions end when
their tab closes, or after `session_idle_minutes` without a request (a scripted client never
closes a tab).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..assets import user_cache_dir
from ..errors import ChatEXAONEPathError, ServerBusyError
from ..fileio import atomic_write_with
from ..vision_tower.extraction import FeatureExtractor
from .config import AppConfig, GenerationSettings
from .memory import release_memory
from .session import WebSession
from .shared import SharedModel
from .upload_gate import UploadLedger

__all__ = ["AppConfig", "AppEngine", "GenerationSettings", "ModelCard", "NoSessionError", "describe_model"]

logger = logging.getLogger(__name__)

EXAMPLE_NAME = "synthetic_tumor"
WORK_DIR_PREFIX = "chatexaonepath-app-"
EXPIRED_REMEMBERED = 4096  # ids of ended sessions remembered, to tell a returning tab why its slide is gone


class NoSessionError(ChatEXAONEPathError):
    """A request names no live session of its caller (never started by the page, ended, or another login's)."""


NO_SESSION = ("This page has no session on the server (it ended, or the request did not come from the page); "
              "reload the page to start one.")


@dataclass
class ModelCard:
    """What the app runs on, named plainly; `warnings` is non-empty when any part is untrained or random."""

    llm: str
    encoder: str
    tower: str
    lora: str
    warnings: list[str]
    failure: str | None = None  # a demo build that failed its own check: its answers do not reflect the slide

    @property
    def is_demo(self) -> bool:
        return bool(self.warnings)

    def banner(self) -> str | None:
        """The honest banner shown above everything else, or None for a fully trained model."""
        if self.failure:
            return f"{self.failure}: " + "; ".join(self.warnings) + "."
        if not self.warnings:
            return None
        return "Demo weights — answers are not diagnostic: " + "; ".join(self.warnings) + "."

    def rows(self) -> list[tuple[str, str]]:
        return [("LLM", self.llm), ("patch encoder", self.encoder), ("vision tower", self.tower), ("LoRA", self.lora)]


def describe_model(model, extractor: FeatureExtractor, checkpoint: str | None, demo=None) -> ModelCard:
    """The model card of a loaded model and patch encoder (`demo`: the `DemoModel` it is, if it is one)."""
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
    if demo is not None:
        tower = f"the demo model: {demo.describe()}"
        warnings.append(demo.warning())
    elif checkpoint is None:
        tower = "untrained (randomly initialised; --untrained)"
    else:
        tower = f"{checkpoint} ({'trained' if config.tower_trained else 'UNTRAINED'})"
    if not config.tower_trained:
        warnings.append("the vision tower is untrained, so answers do not depend on the slide")
    # The demo model is served without a --model, so `checkpoint` is None for it: name it, not "None".
    source = "the demo model's" if demo is not None else f"from {checkpoint}" if checkpoint else "untrained"
    lora = "none" if not config.lora else f"r={config.lora['r']}, alpha={config.lora['alpha']} ({source})"
    return ModelCard(llm, encoder_text, tower, lora, warnings, demo.failure() if demo is not None else None)


class AppEngine(SharedModel):
    """The shared model, patch encoder and feature cache, and the live browser sessions."""

    def __init__(self, model, extractor: FeatureExtractor, config: AppConfig | None = None, *,
                 example_path: str | Path | None = None, work_dir: str | Path | None = None, demo=None) -> None:
        super().__init__(model, extractor, config)
        self.demo = demo  # the `DemoModel` served (synthetic/demo_model.py), None for --model and --untrained
        self.card = describe_model(model, extractor, self.config.model, demo)
        if example_path is None and demo is not None:  # a held-out slide of the demo's cohort, with a lesion
            example_path = demo.example_slide
        self.example_path = Path(example_path) if example_path else \
            user_cache_dir() / "examples" / f"{EXAMPLE_NAME}-{self.config.example_size}.tiff"
        if work_dir is None:
            _sweep_stale_work_dirs()
            work_dir = tempfile.mkdtemp(prefix=WORK_DIR_PREFIX)  # mode 0700: uploads stay private
            (Path(work_dir) / "pid").write_text(str(os.getpid()))
        self.work_dir = Path(work_dir)
        self._sessions: dict[str, WebSession] = {}
        self._expired: collections.OrderedDict[str, str | None] = collections.OrderedDict()  # id → its login
        self.uploads = UploadLedger()  # what Gradio stored for the page, until a session claims it (upload_gate.py)
        self._example_lock = threading.Lock()
        self.example_ready = threading.Event()
        self._closing = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="session-expiry", daemon=True)
        self._reaper.start()

    @classmethod
    def load(cls, config: AppConfig, *, demo_build=None, on_demo_progress=None) -> "AppEngine":
        """Load the model and patch encoder named in `config` (the slow part of starting the app).

        Without `config.model` (and without `config.untrained`) that is the demo model, built first when the
        cache has none (`demo_build`: its `DemoBuildConfig`; `on_demo_progress(stage, done, total)`).
        """
        from ..chat.provenance import serving_extractor
        from ..chat.session import load_chat_model

        started = time.perf_counter()
        demo, checkpoint = None, config.model
        if checkpoint is None and not config.untrained:
            from ..synthetic.demo_model import DemoBuildConfig, ensure_demo_model

            demo = ensure_demo_model(demo_build or DemoBuildConfig(llm=config.llm, encoder=config.encoder,
                                                                   seed=config.demo_seed),
                                     progress=on_demo_progress)
            checkpoint = str(demo.model_dir)
        model = load_chat_model(checkpoint, config.llm)
        extractor, mismatch = serving_extractor(  # the checkpoint's training settings, unless overridden (refused)
            model.config, encoder=config.encoder, encoder_weights=config.encoder_weights, stain_norm=config.stain_norm,
            stain_target=config.stain_target, allow_feature_mismatch=config.allow_feature_mismatch,
            device=config.device)
        engine = cls(model, extractor, config, demo=demo)
        if mismatch:
            engine.card.warnings.append(mismatch)  # allowed with --allow-feature-mismatch: shown in the banner
        logger.info("Model and encoder loaded in %.1f s", time.perf_counter() - started)
        return engine

    # -- sessions ----------------------------------------------------------------------------------------
    def session(self, session_id: str) -> WebSession:
        """A session for Python callers (no browser, no login), created on first use; every call counts as activity.

        The page never uses this: it starts sessions with `start_session` and finds them with `resume_session`.
        Raises `ServerBusyError` when `max_sessions` are live and none has expired.
        """
        found = self.find_session(session_id)
        if found is not None:
            found.touch()
            return found
        return self.start_session(session_id)

    def start_session(self, session_id: str, *, client: str | None = None, user: object = None,
                      max_per_owner: int | None = None) -> WebSession:
        """The session of a page that just loaded, bound to its `client` address and `user` login.

        Raises `ServerBusyError` past `max_sessions`, or past `max_sessions_per_client` for that address or
        login (`max_per_owner` instead for the login: the API's files per key); `NoSessionError` when the id
        is live under another login.
        """
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            if session.owner != user:
                raise NoSessionError(NO_SESSION)
            session.touch()
            return session
        self.expire_idle()
        with self._lock:
            if session_id in self._sessions:  # the same page's two events raced: one session
                return self._sessions[session_id]
            self._check_room(client, user, max_per_owner)
            folder = self.work_dir / "sessions" / f"{len(self._sessions)}-{os.urandom(6).hex()}"
            session = WebSession(self, folder, uploads_root=self.work_dir, owner=user, client=client)
            if session_id in self._expired and self._expired[session_id] == user:
                del self._expired[session_id]
                session.notice = (f"This session was idle for more than {self.config.session_idle_minutes:g} "
                                  "minutes, so its slide and chat were cleared; load the slide again.")
            self._sessions[session_id] = session
        session.touch()
        return session

    def _check_room(self, client: str | None, user: object, max_per_owner: int | None = None) -> None:
        """Refuse a new session past the server's cap, or past the per-client cap of its address or login."""
        config = self.config
        if len(self._sessions) >= config.max_sessions:
            raise ServerBusyError(f"The server is busy: {len(self._sessions)} people are using it, its limit "
                                  "(--max-sessions); try again in a few minutes.")
        for what, key, value in (("this address", "client", client), ("this login", "owner", user)):
            if value is None:
                continue
            held = sum(1 for s in self._sessions.values() if getattr(s, key) == value)
            cap = max_per_owner if key == "owner" and max_per_owner is not None else config.max_sessions_per_client
            if held >= cap:
                raise ServerBusyError(
                    f"{what.capitalize()} already has {held} sessions open, the most this server allows "
                    "(--max-sessions-per-client); close another tab, or wait for an idle one to end.")

    def resume_session(self, session_id: str, *, client: str | None = None, user: str | None = None) -> WebSession:
        """The live session of a page for a request from it (counts as activity); a page whose session expired
        gets a new one (with a notice). `NoSessionError` for an id no page of this login started."""
        session = self.find_session(session_id, user)
        if session is not None:
            session.touch()
            return session
        with self._lock:
            expired = session_id in self._expired and self._expired[session_id] == user
        if not expired:
            raise NoSessionError(NO_SESSION)
        return self.start_session(session_id, client=client, user=user)

    def find_session(self, session_id: str, user: str | None = None) -> WebSession | None:
        """The live session of a page of login `user`, or None (never creates one: for Stop, Cancel, redraws)."""
        with self._lock:
            session = self._sessions.get(session_id)
        return session if session is not None and session.owner == user else None

    def has_session(self, client: str | None = None, user: str | None = None) -> bool:
        """True when `client` (an address) or `user` (a login) has a live session: uploads need one."""
        with self._lock:
            return any((client is not None and s.client == client) or (user is not None and s.owner == user)
                       for s in self._sessions.values())

    def end_session(self, session_id: str, user: str | None = None) -> None:
        """Forget a browser session of login `user` and delete its uploads (called when the tab closes)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != user:
                return
            del self._sessions[session_id]
        if session is not None:
            session.close()
            release_memory()

    def expire_idle(self, now: float | None = None) -> int:
        """End the sessions without a request for `session_idle_minutes` (not those mid-load or mid-answer)."""
        now = time.monotonic() if now is None else now
        limit = self.config.session_idle_minutes * 60
        with self._lock:
            idle = [(sid, s) for sid, s in self._sessions.items() if now - s.last_active > limit and not s.busy]
            for session_id, session in idle:
                del self._sessions[session_id]
                self._expired[session_id] = session.owner
            while len(self._expired) > EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)
        for _, session in idle:
            session.close()
        if idle:
            release_memory()
            logger.info("Ended %d idle session(s); %d live", len(idle), len(self._sessions))
        return len(idle)

    def _reap(self) -> None:
        # Without requests nothing calls `session()`: a timer ends idle sessions (and frees their memory)
        # and removes uploads no session claimed.
        interval = max(1.0, min(30.0, self.config.session_idle_minutes * 60 / 4))
        while not self._closing.wait(interval):
            try:
                self.expire_idle()
                self.uploads.sweep(upload_dir=self.work_dir / "gradio")
            except Exception:  # the app must keep serving; the next round tries again
                logger.exception("Ending idle sessions or removing unclaimed uploads failed")

    def cancel_loads(self) -> int:
        """Cancel every load in progress (each stops at its next strip or slice of patches); returns how many sessions."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.cancel()
        return len(sessions)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def close(self) -> None:
        """End every session and delete the private work folder."""
        self._closing.set()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()
        self.tiles.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- the bundled example -----------------------------------------------------------------------------
    def example_slide(self) -> Path:
        """The synthetic example slide, generated into the cache on first use (a few seconds)."""
        from ..synthetic.slides import make_synthetic_slide

        with self._example_lock:
            if not self.example_path.exists():
                started = time.perf_counter()
                size = self.config.example_size
                # A temp name of its own: another app starting on the same cache may be writing it too.
                atomic_write_with(self.example_path,
                                  lambda tmp: make_synthetic_slide(tmp, "tumor", (size, size), mpp=0.25, seed=7))
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
