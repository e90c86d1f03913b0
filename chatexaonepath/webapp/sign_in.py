"""A brake on password guessing for `--auth`: sign-in attempts per client address and per login name are spaced.

Gradio checks a password as fast as it is sent (1,000 guesses took 1.3 s). `SignInThrottle` is ASGI
middleware on `POST /login`: each client address, and each login name, may try at most
`TRIES_PER_SECOND` times a second; after repeated failures the spacing grows (up to `MAX_SPACING`
seconds), so guessing is slowed for good but a user is never locked out: once the guessing stops,
the right password is accepted at the next allowed try. An attempt too early gets HTTP 429 with the
seconds to wait and is not checked at all. A success clears the failures of its address and login.
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time

TRIES_PER_SECOND = 5
FAILURE_WINDOW = 600.0  # failures counted over the last ten minutes
# (failures in the window, least seconds between two tries): the spacing grows with the failures
SPACING = ((20, 1.0), (100, 5.0))
MAX_SPACING = SPACING[-1][1]
MAX_KEYS = 10_000  # addresses and names remembered; the least recently seen are forgotten first
MAX_BODY = 16 * 1024  # a sign-in form is a name and a password


class _Record:
    def __init__(self) -> None:
        self.tries: collections.deque[float] = collections.deque()
        self.failures: collections.deque[float] = collections.deque()


class Throttle:
    """Sliding-window counts of tries and failures per key; thread-safe."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._records: collections.OrderedDict[tuple, _Record] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _record(self, key: tuple, now: float) -> _Record:
        record = self._records.pop(key, None) or _Record()
        self._records[key] = record  # most recently seen last
        while len(self._records) > MAX_KEYS:
            self._records.popitem(last=False)
        while record.tries and now - record.tries[0] > 1.0:
            record.tries.popleft()
        while record.failures and now - record.failures[0] > FAILURE_WINDOW:
            record.failures.popleft()
        return record

    def admit(self, keys: list[tuple]) -> float:
        """0 and the try is counted, or the seconds to wait before any of `keys` may try again."""
        with self._lock:
            now = self.clock()
            records = [self._record(key, now) for key in keys]
            wait = max(_wait(record, now) for record in records)
            if wait <= 0:
                for record in records:
                    record.tries.append(now)
            return wait

    def outcome(self, keys: list[tuple], succeeded: bool) -> None:
        """Count a failure against every key, or forget their failures after a success."""
        with self._lock:
            now = self.clock()
            for key in keys:
                record = self._record(key, now)
                if succeeded:
                    record.failures.clear()
                else:
                    record.failures.append(now)


def _wait(record: _Record, now: float) -> float:
    wait = 0.0
    if len(record.tries) >= TRIES_PER_SECOND:
        wait = 1.0 - (now - record.tries[-TRIES_PER_SECOND])
    spacing = max((seconds for failures, seconds in SPACING if len(record.failures) >= failures), default=0.0)
    if spacing and record.tries:
        wait = max(wait, spacing - (now - record.tries[-1]))
    return wait


class SignInThrottle:
    """ASGI middleware spacing `POST /login` attempts (see the module's docstring)."""

    def __init__(self, app, throttle: Throttle | None = None) -> None:
        self.app, self.throttle = app, throttle or Throttle()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            return await self.app(scope, receive, send)
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                return await _json(send, 413, "The sign-in form is too large.")
            if not message.get("more_body"):
                break
        keys = [("address", (scope.get("client") or ("?",))[0]), ("login", await _username(scope, body))]
        wait = self.throttle.admit(keys)
        if wait > 0:
            return await _json(send, 429, f"Too many sign-in attempts; try again in {math.ceil(wait)} s.",
                               [(b"retry-after", str(math.ceil(wait)).encode())])
        status = {}

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, replay, watched_send)
        self.throttle.outcome(keys, status.get("code") == 200)


async def _username(scope, body: bytes) -> str:
    """The login name in a sign-in form (urlencoded or multipart, as Gradio's page sends it)."""
    from starlette.requests import Request

    async def once():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form(max_files=0, max_fields=16)
        return str(form.get("username", "")).strip()[:200]
    except Exception:  # noqa: BLE001 - a malformed form still counts against its address
        return ""


async def _json(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
