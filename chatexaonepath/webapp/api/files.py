"""The API's files: each uploaded slide is a session of the engine, owned by one key, read in the background.

A file is made the way the page makes a session (`AppEngine.start_session`, owned by the key, so
`--max-sessions` counts API files and browser tabs together) and loaded by the page's own code
(`WebSession.load_upload`: the upload's format, size and zip checks, the session's disk, the slide's
budgets, the model slot as a load that makes way for questions). Its status follows OpenAI's file
object — `uploaded` while it is read, `processed` once it can be asked about, `error` with the one
sentence — and the page's finer loading stage goes in an extra field. A key sees its own files only:
any other id, another key's included, is "no such file". An idle file ends with its session
(`--session-idle-minutes`) and then says so. A conversation about several files (a case) checks each
as one file is checked, then the case's budget; no per-case state is kept beyond the request.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ChatEXAONEPathError, MissingMppError
from ...vision_tower.slide import MPP_RANGE
from ..engine import AppEngine
from ..messages import user_message
from ..session import LoadProgress, WebSession
from .errors import ApiError, from_exception, not_found, too_many
from .keys import ApiOwner
from .upload import ReceivedUpload

logger = logging.getLogger(__name__)

# The page's loading stages, in the words of the API's `stage` field.
STAGES = {"waiting": "waiting", "reading": "reading", "tissue": "segmenting", "features": "encoding",
          "aggregating": "aggregating", "drawing": "drawing"}
MAX_FAILED_PER_OWNER = 32  # failed files kept to say why; older ones are forgotten


@dataclass
class ApiFile:
    """One uploaded slide of one key: what OpenAI's file object says, plus the loading stage."""

    id: str
    owner: ApiOwner
    filename: str = ""
    purpose: str = ""
    size: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "uploaded"  # uploaded | processed | error (OpenAI's)
    details: str | None = None  # the one sentence when status is error
    stage: str = "receiving"  # receiving, queued, waiting, reading, segmenting, encoding, …, ready, failed
    message: str = "Receiving the upload."
    progress: tuple[int, int] | None = None  # patches encoded / in all
    slide: dict | None = None  # once processed: its size, resolution and patches
    failed_at: float | None = None
    answering: threading.Lock = field(default_factory=threading.Lock)  # one answer at a time: a session is one chat

    def fail(self, sentence: str) -> None:
        self.status, self.details, self.stage, self.message = "error", sentence, "failed", sentence
        self.progress, self.failed_at = None, time.monotonic()

    def as_openai(self) -> dict:
        """OpenAI's file object, with `stage`, `stage_message`, `progress` and `slide` added."""
        progress = {"done": self.progress[0], "total": self.progress[1]} if self.progress else None
        return {"id": self.id, "object": "file", "bytes": self.size, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": self.status,
                "status_details": self.details, "expires_at": None, "stage": self.stage,
                "stage_message": self.message, "progress": progress, "slide": self.slide}


class FileRegistry:
    """The API's files of every key; thread-safe. Loading runs in a thread per file."""

    def __init__(self, engine: AppEngine) -> None:
        self.engine = engine
        self._files: dict[str, ApiFile] = {}
        self._lock = threading.Lock()

    @property
    def staging(self) -> Path:
        return self.engine.work_dir / "api-uploads"  # inside the private work folder: a refused upload is deleted

    # -- making files ------------------------------------------------------------------------------------
    def open(self, owner: ApiOwner) -> tuple[ApiFile, WebSession]:
        """A new file of `owner` and its session, before a byte of the upload is read (per-key and server limits)."""
        cap = self.engine.config.api_max_files_per_key
        with self._lock:
            self._prune()
            held = [f for f in self._files.values() if f.owner == owner and f.status != "error"]
            if len(held) >= cap:
                raise too_many(f"This key holds {len(held)} files, the most this server allows "
                               "(--api-max-files-per-key); delete one first.", "file_limit")
            record = ApiFile(f"file-{secrets.token_hex(12)}", owner)
            self._files[record.id] = record
        try:
            session = self.engine.start_session(record.id, user=owner, max_per_owner=cap)
        except ChatEXAONEPathError as e:
            self._forget(record)
            raise from_exception(e, "starting an upload") from e
        return record, session

    def received(self, record: ApiFile, upload: ReceivedUpload, session: WebSession) -> None:
        """The upload is stored: read the slide in the background, as the page does."""
        record.filename, record.size, record.purpose = upload.filename, upload.size, upload.purpose
        record.stage, record.message = "queued", "Waiting to be read."
        logger.info("API: %s uploaded %s (%d bytes) as %s", record.owner, upload.filename, upload.size, record.id)
        threading.Thread(target=self._load, args=(record, session, upload), name=f"api-load-{record.id}",
                         daemon=True).start()

    def abandon(self, record: ApiFile) -> None:
        """An upload that failed before it was stored: nothing of it is kept."""
        self._forget(record)
        self.engine.end_session(record.id, record.owner)
        shutil.rmtree(self.staging / record.id, ignore_errors=True)

    def _load(self, record: ApiFile, session: WebSession, upload: ReceivedUpload) -> None:
        def on_progress(progress: LoadProgress) -> None:
            record.stage, record.message = STAGES.get(progress.stage, progress.stage), progress.message
            record.progress = (progress.done, progress.total) if progress.total else None

        started = time.perf_counter()
        error: BaseException | None = None
        try:
            session.load_upload(upload.path, upload.mpp, on_progress)
        except BaseException as e:  # told in the file's status; the server goes on
            error = e
        finally:  # the staged copy goes before the status changes: a file that says it is done left nothing behind
            shutil.rmtree(self.staging / record.id, ignore_errors=True)
        if error is None:
            attrs = session.chat.slide.features.attrs
            record.slide = {"name": record.filename, "patches": len(session.chat.slide.features),
                            "width": int(attrs.get("level0_width") or 0),
                            "height": int(attrs.get("level0_height") or 0),
                            "mpp": float(attrs.get("level0_mpp") or 0),
                            "patch_size": int(attrs.get("patch_size_level0") or 0)}
            record.message = f"Ready to be asked about ({record.slide['patches']} patches)."
            record.status, record.stage, record.progress = "processed", "ready", None
            logger.info("API: %s ready in %.1f s", record.id, time.perf_counter() - started)
            return
        if isinstance(error, MissingMppError):
            low, high = MPP_RANGE
            sentence = (f"{record.filename} does not record its resolution (µm per pixel); upload it again with "
                        f"the form field mpp ({low}–{high:g}; 0.25 for a 40× scan, 0.5 for 20×).")
        else:
            sentence = user_message(error, "reading the slide", session.upload_folders())
        self.engine.end_session(record.id, record.owner)  # its memory and disk go now; the record says why
        record.fail(sentence)
        logger.info("API: %s of %s failed: %s", record.id, record.owner, sentence)

    # -- finding files -----------------------------------------------------------------------------------
    def get(self, owner: ApiOwner, file_id: str) -> ApiFile:
        """`owner`'s file `file_id`; anything else — unknown, deleted, another key's — is the same 404."""
        with self._lock:
            record = self._files.get(file_id)
        if record is None or record.owner != owner:
            raise not_found(f"There is no file {file_id[:64]!r} for this key; upload the slide with POST /v1/files.",
                            "file_not_found")
        self._check_live(record)
        return record

    def list(self, owner: ApiOwner) -> list[ApiFile]:
        """`owner`'s files, newest first."""
        with self._lock:
            self._prune()
            records = [f for f in self._files.values() if f.owner == owner]
        for record in records:
            self._check_live(record)
        return sorted(records, key=lambda f: f.created_at, reverse=True)

    def ready(self, owner: ApiOwner, file_id: str) -> tuple[ApiFile, WebSession]:
        """`owner`'s processed file and its live session, for a question; else why not, in one sentence."""
        record = self.get(owner, file_id)
        if record.status == "uploaded":
            raise ApiError(409, f"{record.id} is still being processed ({record.stage}); ask once its status is "
                                "'processed'.", "file_not_ready", param="messages")
        session = self.engine.find_session(record.id, owner)
        if record.status == "error" or session is None:
            raise bad_request_failed(record)
        session.touch()
        return record, session

    def ready_case(self, owner: ApiOwner, file_ids: list[str]) -> list[tuple[ApiFile, WebSession]]:
        """`owner`'s processed files of one conversation (one slide, or a case) and their sessions, in order; the
        first refusal of `ready`, else a case past the server's `max_case_patches` (400), before any work starts."""
        members = [self.ready(owner, file_id) for file_id in file_ids]
        limit = self.engine.config.max_case_patches
        patches = sum((record.slide or {}).get("patches", 0) for record, _ in members)
        if len(members) > 1 and patches > limit:
            raise ApiError(400, f"The case's {len(members)} slides have {patches:,} tissue patches together, past the "
                                f"{limit:,} this server takes in one conversation (--max-case-patches).",
                           "too_many_patches", param="messages")
        return members

    def delete(self, owner: ApiOwner, file_id: str) -> ApiFile:
        """Forget `owner`'s file, stop its load if one runs, delete its upload and free its memory."""
        record = self.get(owner, file_id)
        self._forget(record)
        self.engine.end_session(record.id, owner)
        logger.info("API: %s deleted %s", owner, record.id)
        return record

    def _check_live(self, record: ApiFile) -> None:
        """A processed file whose session ended (idle too long, or the server cancelled it) now says so."""
        if record.status == "processed" and self.engine.find_session(record.id, record.owner) is None:
            minutes = self.engine.config.session_idle_minutes
            record.fail(f"{record.filename} was idle for more than {minutes:g} minutes, so the server deleted it "
                        "(--session-idle-minutes); upload it again.")

    def _forget(self, record: ApiFile) -> None:
        with self._lock:
            self._files.pop(record.id, None)

    def _prune(self) -> None:
        """Forget failed files after the idle time, and all but the newest few of a key (under the lock)."""
        limit = self.engine.config.session_idle_minutes * 60
        now = time.monotonic()
        failed: dict[ApiOwner, list[ApiFile]] = {}
        for record in list(self._files.values()):
            if record.failed_at is None:
                continue
            if now - record.failed_at > limit:
                del self._files[record.id]
            else:
                failed.setdefault(record.owner, []).append(record)
        for records in failed.values():
            for record in sorted(records, key=lambda f: f.failed_at)[:-MAX_FAILED_PER_OWNER]:
                del self._files[record.id]


def bad_request_failed(record: ApiFile) -> ApiError:
    """A question about a file that failed (or expired): its own sentence."""
    return ApiError(400, f"{record.id} cannot be asked about: {record.details or 'its slide is gone'}",
                    "file_failed", param="messages")
