"""The gate in front of Gradio's upload route: nothing is stored for a client without a page session, past its
budget, or of a type the app does not read; what is stored is hashed on the way in and removed if unclaimed.

Gradio writes every upload to its cache before any handler of the page sees it, so the page's own
checks (uploads.py) come too late to keep a script from filling the disk. `UploadGate` is ASGI
middleware on `POST /gradio_api/upload` that, before Gradio reads the body:
- refuses a client (address, or login with --auth) that has no live page session (403);
- refuses a body without a length, or longer than one upload may be (411, 413);
- refuses a client whose stored, not yet claimed uploads would pass `--max-session-gb` (429);
and while the body streams through it parses the multipart parts itself (python-multipart, the parser
Gradio uses): a part whose file name is not a slide format ends the body there (415; what Gradio had
stored is deleted), and each file's sha256 is computed from the bytes as they pass, then handed to
`fileio.remember_sha256` for the stored file, so the feature cache's key costs no second read.

`UploadLedger` remembers each stored upload, its client and its size; the engine's timer deletes
those not claimed by a session (moved into its folder) within `UNCLAIMED_SECONDS`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..fileio import remember_sha256
from .uploads import ACCEPTED_SUFFIXES, format_gb

logger = logging.getLogger(__name__)

UPLOAD_PATH = "/gradio_api/upload"
UNCLAIMED_SECONDS = 180.0  # the page claims its uploads at once; a scripted client's wait at most this long
MULTIPART_SLACK = 1 << 20  # boundaries and part headers around the file bytes
START_GRACE_SECONDS = 3.0  # how long an upload waits for its page's session to start


@dataclass
class StoredUpload:
    """One file Gradio stored, as the gate saw it go by."""

    path: Path
    client: str | None
    size: int
    stored: float = field(default_factory=time.monotonic)


class UploadLedger:
    """The uploads stored and not yet claimed (moved into a session's folder), per client; thread-safe."""

    def __init__(self) -> None:
        self._items: dict[Path, StoredUpload] = {}
        self._reserved: dict[str | None, int] = {}  # bytes of uploads under way, per client
        self._lock = threading.Lock()

    def unclaimed_bytes(self, client: str | None) -> int:
        """Bytes a client has stored and not claimed, plus what it is uploading now."""
        with self._lock:
            items = [item for item in self._items.values() if item.client == client]
            reserved = self._reserved.get(client, 0)
        return reserved + sum(item.size for item in items if item.path.exists())

    def reserve(self, client: str | None, size: int) -> None:
        with self._lock:
            self._reserved[client] = self._reserved.get(client, 0) + size

    def unreserve(self, client: str | None, size: int) -> None:
        with self._lock:
            self._reserved[client] = self._reserved.get(client, 0) - size
            if self._reserved[client] <= 0:
                del self._reserved[client]

    def add(self, item: StoredUpload) -> None:
        with self._lock:
            self._items[item.path] = item

    def sweep(self, now: float | None = None, max_age: float = UNCLAIMED_SECONDS, upload_dir: Path | None = None) -> int:
        """Delete uploads unclaimed for `max_age` seconds (claimed ones were moved away: just forgotten), and in
        `upload_dir` the temp files of uploads abandoned mid-way (untouched for as long)."""
        if upload_dir is not None:
            _remove_abandoned(upload_dir, max_age)
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [item for item in self._items.values() if now - item.stored > max_age or not item.path.exists()]
            for item in old:
                del self._items[item.path]
        removed = 0
        for item in old:
            if item.path.exists():
                item.path.unlink(missing_ok=True)
                _remove_if_empty(item.path.parent)
                removed += 1
        if removed:
            logger.info("Removed %d upload(s) no session claimed within %.0f s", removed, max_age)
        return removed


def _remove_abandoned(upload_dir: Path, max_age: float) -> None:
    """Gradio writes an upload to a temp file at the top of its folder, and leaves it there when the client
    hangs up mid-way; one not written to for `max_age` seconds is abandoned (stored uploads are in subfolders)."""
    if not upload_dir.is_dir():
        return
    now = time.time()
    for entry in upload_dir.iterdir():
        try:
            if entry.is_file() and not entry.is_symlink() and now - entry.stat().st_mtime > max_age:
                entry.unlink()
                logger.info("Removed %s, an upload abandoned mid-way", entry.name)
        except OSError:  # gone meanwhile
            continue


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # Gradio's per-upload folder (named by its content hash)
    except OSError:
        pass


class _Parts:
    """The multipart body as it streams by: each file part's name, size and sha256, and the first bad name."""

    def __init__(self, boundary: bytes) -> None:
        from python_multipart.multipart import MultipartParser

        self.files: list[dict] = []
        self.refused: str | None = None
        self._header_field, self._header_value = b"", b""
        self._current: dict | None = None
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
            "on_part_data": self._data, "on_part_end": self._end})

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def _begin(self) -> None:
        self._current = {"name": None, "field": None, "sha": hashlib.sha256(), "size": 0}

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        from python_multipart.multipart import parse_options_header

        if self._header_field.lower() == b"content-disposition" and self._current is not None:
            _, options = parse_options_header(self._header_value)
            self._current["field"] = options.get(b"name", b"").decode("latin-1")
            if b"filename" in options:
                self._current["name"] = options[b"filename"].decode("utf-8", "replace")
        self._header_field, self._header_value = b"", b""

    def _headers_done(self) -> None:
        name = (self._current or {}).get("name")
        if name is not None and Path(name).suffix.lower() not in ACCEPTED_SUFFIXES and self.refused is None:
            self.refused = Path(name).name

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current["sha"].update(data[start:end])
            self._current["size"] += end - start

    def _end(self) -> None:
        if self._current is not None and self._current["field"] == "files" and self._current["name"] is not None:
            self.files.append(self._current)
        self._current = None


class UploadGate:
    """ASGI middleware guarding Gradio's upload route (see the module's docstring)."""

    def __init__(self, app, engine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith(UPLOAD_PATH):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or (None,))[0]
        user = _login(scope)
        await self._page_started(client, user)
        refusal = self._refusal(scope, client, user)
        if refusal is not None:
            return await _respond(send, *refusal)
        length = int(dict(scope["headers"]).get(b"content-length", b"0"))
        ledger = self.engine.uploads
        ledger.reserve(client, length)
        try:
            await self._pass(scope, receive, send, client, _boundary(scope))
        finally:
            ledger.unreserve(client, length)

    async def _page_started(self, client: str | None, user: str | None) -> None:
        """Give a page that has just opened a moment to start its session: a file dropped at once can win the race."""
        deadline = time.monotonic() + START_GRACE_SECONDS
        while not self.engine.has_session(client=client, user=user) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def _refusal(self, scope, client: str | None, user: str | None) -> tuple[int, str] | None:
        """(status, one sentence) when this upload is refused before a byte of it is read."""
        if not self.engine.has_session(client=client, user=user):
            return 403, "Open the app's page first: uploads are accepted only from a page that is open."
        headers = dict(scope["headers"])
        limits = self.engine.config
        if b"content-length" not in headers or not headers[b"content-length"].isdigit():
            return 411, "An upload must say its length (Content-Length)."
        length = int(headers[b"content-length"])
        if length > limits.max_upload_bytes + MULTIPART_SLACK:
            return 413, (f"The upload is {format_gb(length)}; this app accepts slides up to "
                         f"{format_gb(limits.max_upload_bytes)} (--max-upload-gb).")
        held = self.engine.uploads.unclaimed_bytes(client)
        if held + length > limits.max_session_bytes:
            return 429, (f"This address has {format_gb(held)} of uploads not loaded yet; with this one it would pass "
                         f"{format_gb(limits.max_session_bytes)} (--max-session-gb). Load or wait a few minutes.")
        if _boundary(scope) is None:
            return 400, "An upload must be multipart/form-data."
        return None

    async def _pass(self, scope, receive, send, client: str | None, boundary: bytes) -> None:
        """Stream the body to Gradio through our own parser, then check and record what Gradio stored."""
        parts = _Parts(boundary)
        ended = False

        async def watched_receive():
            nonlocal ended
            if ended:  # the body was cut short for a refused part: nothing more comes
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                parts.write(message.get("body", b""))
                if parts.refused is not None:
                    ended = True  # close the multipart body here: Gradio stores at most this chunk
                    closing = b"\r\n--" + boundary + b"--\r\n"
                    return {"type": "http.request", "body": message.get("body", b"") + closing, "more_body": False}
            return message

        response = _Buffered()
        await self.app(scope, watched_receive, response.send)
        stored = response.paths() if response.status == 200 else []
        if parts.refused is not None:
            for path in stored:
                Path(path).unlink(missing_ok=True)
                _remove_if_empty(Path(path).parent)
            return await _respond(send, 415, f"{parts.refused} is not a slide format the app reads "
                                             f"({', '.join(ACCEPTED_SUFFIXES)}).")
        self._record(stored, parts.files, client)
        await response.replay(send)

    def _record(self, stored: list[str], files: list[dict], client: str | None) -> None:
        if len(stored) != len(files):  # Gradio named files we did not see: hash them later, by reading
            logger.warning("Upload: %d file(s) stored, %d seen; their hashes will be read again", len(stored),
                           len(files))
            files = [None] * len(stored)
        for path, seen in zip(stored, files):
            path = Path(path)
            size = path.stat().st_size if path.exists() else 0
            if seen is not None and seen["size"] == size:
                remember_sha256(path, seen["sha"].hexdigest(), size)
            self.engine.uploads.add(StoredUpload(path, client, size))


class _Buffered:
    """The inner app's response, held back until we know whether to send it."""

    def __init__(self) -> None:
        self.status, self.start, self.bodies = 0, None, []

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.start, self.status = message, message["status"]
        elif message["type"] == "http.response.body":
            self.bodies.append(message.get("body", b""))

    def paths(self) -> list[str]:
        try:
            paths = json.loads(b"".join(self.bodies))
        except ValueError:
            return []
        return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []

    async def replay(self, send: Callable) -> None:
        if self.start is not None:
            await send(self.start)
        await send({"type": "http.response.body", "body": b"".join(self.bodies), "more_body": False})


def _boundary(scope) -> bytes | None:
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(dict(scope["headers"]).get(b"content-type", b""))
    return options.get(b"boundary") if kind == b"multipart/form-data" else None


def _login(scope) -> str | None:
    """The --auth login of a request, from Gradio's access-token cookie; None without one."""
    app = scope.get("app")
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if not tokens or cookie_id is None:
        return None
    cookies = {}
    for header, value in scope["headers"]:
        if header == b"cookie":
            for pair in value.decode("latin-1").split(";"):
                name, _, content = pair.strip().partition("=")
                cookies[name] = content
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        if cookies.get(name) in tokens:
            return tokens[cookies[name]]
    return None


async def _respond(send, status: int, message: str) -> None:
    body = message.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
