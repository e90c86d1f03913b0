"""Who may use the /v1 API, and how much: keys from `--api-key-file`, the owner each stands for, per-key budgets.

The key file holds one key per line, optionally followed by a space and a name (`#` starts a comment).
A key is compared by its sha256, never kept or logged in clear: logs and errors name a key by its name
(or `key N`, its position in the file). Without a key file the API answers loopback clients only, all
as one owner, `local`. Each owner sees only its own files and conversations (files.py); `KeyBudgets`
bounds what one owner may have under way at once and the tokens it may spend per minute, plus the
requests of all owners together, each refused past its limit before any work starts.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import ChatEXAONEPathError
from ..config import AppConfig
from .errors import too_many

logger = logging.getLogger(__name__)

MIN_KEY_CHARS = 20  # a guessable key would make the whole API a guess away
MAX_KEY_FILE_BYTES = 1 << 20
MAX_NAME_CHARS = 64


@dataclass(frozen=True)
class ApiOwner:
    """The owner of API files and answers: one key, known by its name (the key itself is never kept)."""

    name: str

    def __str__(self) -> str:
        return f"API key {self.name!r}"


LOCAL = ApiOwner("local")  # every loopback client of a server without a key file


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class ApiKeys:
    """The keys a server accepts, by the sha256 of each; `owner` finds the owner of a presented key."""

    def __init__(self, owners: dict[str, ApiOwner]) -> None:
        self._owners = owners

    def __len__(self) -> int:
        return len(self._owners)

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        """Read a key file (see the module's docstring); every mistake is one sentence that never quotes a key."""
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_KEY_FILE_BYTES:
                raise ChatEXAONEPathError(f"The API key file {path} is {size:,} bytes; a key file is at most 1 MiB.")
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise ChatEXAONEPathError(f"Cannot read the API key file {path} ({type(e).__name__}); "
                                      "check --api-key-file.") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("The API key file %s can be read by other users of this machine; chmod 600 it.", path)
        return cls(_parse_keys(text, path))

    def owner(self, presented: str) -> ApiOwner | None:
        """The owner of a presented key, or None; looked up by digest, so timing says nothing about the keys."""
        return self._owners.get(_digest(presented))


def _parse_keys(text: str, path: Path) -> dict[str, ApiOwner]:
    owners: dict[str, ApiOwner] = {}
    names: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, name = line.partition(" ")
        name = name.strip() or f"key {len(owners) + 1}"
        where = f"{path.name}, line {number}"
        if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable():
            raise ChatEXAONEPathError(
                f"{where}: an API key must be at least {MIN_KEY_CHARS} printable ASCII characters without spaces "
                "(make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\").")
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise ChatEXAONEPathError(f"{where}: a key's name is at most {MAX_NAME_CHARS} printable characters.")
        digest = _digest(key)
        if digest in owners:
            raise ChatEXAONEPathError(f"{where} repeats the key of line {first_line[digest]}; give each user a key.")
        if name in names:
            raise ChatEXAONEPathError(f"{where} reuses the name {name!r} of line {names[name]}; names tell keys "
                                      "apart in the log.")
        owners[digest], names[name], first_line[digest] = ApiOwner(name), number, number
    if not owners:
        raise ChatEXAONEPathError(f"The API key file {path} holds no keys: one per line, optionally followed by a "
                                  "space and a name.")
    return owners


class KeyBudgets:
    """Requests under way per owner and in all, and tokens per owner per minute; thread-safe."""

    def __init__(self, config: AppConfig, clock=time.monotonic) -> None:
        self.config, self.clock = config, clock
        self._running: collections.Counter[ApiOwner] = collections.Counter()
        self._tokens: dict[ApiOwner, collections.deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def enter(self, owner: ApiOwner) -> None:
        """Count one request of `owner` as under way, or refuse it (429) past the per-key or server-wide limit."""
        config = self.config
        with self._lock:
            if self._running[owner] >= config.api_max_requests_per_key:
                raise too_many(f"This key has {self._running[owner]} requests under way, the most this server allows "
                               "(--api-max-requests-per-key); wait for one to finish.", retry_after=1)
            if sum(self._running.values()) >= config.api_max_requests_in_flight:
                raise too_many(f"The server has {config.api_max_requests_in_flight} API requests under way, its limit "
                               "(--api-max-requests-in-flight); try again in a moment.", "server_busy", retry_after=2)
            self._running[owner] += 1

    def leave(self, owner: ApiOwner) -> None:
        """A request of `owner` counted by `enter` is over."""
        with self._lock:
            self._running[owner] -= 1
            if self._running[owner] <= 0:
                del self._running[owner]

    def running(self, owner: ApiOwner) -> int:
        with self._lock:
            return self._running[owner]

    def _window(self, owner: ApiOwner, now: float) -> collections.deque[tuple[float, int]]:
        spent = self._tokens.setdefault(owner, collections.deque())
        while spent and now - spent[0][0] >= 60.0:
            spent.popleft()
        return spent

    def check_tokens(self, owner: ApiOwner, wanted: int) -> None:
        """Refuse (429) a request that could take `owner` past its tokens per minute (`wanted`: its max new tokens)."""
        limit = self.config.api_max_tokens_per_minute
        with self._lock:
            now = self.clock()
            spent = self._window(owner, now)
            used = sum(tokens for _, tokens in spent)
            if used + wanted > limit:
                wait = 60.0 - (now - spent[0][0]) if spent else 60.0
                raise too_many(f"This key used {used:,} tokens in the last minute; with up to {wanted:,} more it would "
                               f"pass its {limit:,} (--api-max-tokens-per-minute); try again in "
                               f"{max(1, round(wait))} s.", retry_after=wait)

    def spend(self, owner: ApiOwner, tokens: int) -> None:
        """Count tokens a finished (or stopped) request of `owner` used."""
        with self._lock:
            now = self.clock()
            self._window(owner, now).append((now, int(tokens)))


def check_loopback_only(host: str, keys: ApiKeys | None) -> None:
    """`serve` without a key file must bind this machine only: refuse a network address before anything loads."""
    from ..cli import is_loopback

    if keys is None and not is_loopback(host):
        raise ChatEXAONEPathError(f"Serving the API on {host} needs --api-key-file: without keys it answers this "
                                  "machine only (bind 127.0.0.1).")

