"""Atomic file writes, and whole-file content hashes.

Every file an output is written to goes through `atomic_write_with` (or its text/JSON forms): the
content is produced at a temp name unique to the writer, fsynced, then renamed into place. So a
kill never leaves a half-written file that a rerun or the next stage would trust, and two processes
(two app starts on one cache, the app beside a CLI job) writing the same file never share a temp
file: the last rename wins and both see a complete file.

`file_sha256` hashes a file's whole content; a hash computed while the file was being written (an
upload streamed to disk) is handed over with `remember_sha256`, so it costs no second read.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ChatEXAONEPathError

HASH_CHUNK = 1 << 20
_REMEMBERED_HASHES = 4096  # file identities whose sha256 is kept in memory


def temp_beside(path: str | Path, suffix: str = ".tmp") -> Path:
    """A hidden temp name beside `path`, unique to this writer: `.<name>.<pid>.<random><suffix>`.

    The pid alone is not enough: the app's sessions are threads of one process, and two of them
    writing the same cache file at once (the same slide uploaded twice) would share a temp file.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def atomic_write_with(path: str | Path, write: Callable[[Path], object], *, mode: int | None = None) -> Path:
    """Have `write(tmp)` produce the file at a temp path beside `path` unique to this call, then fsync and
    rename it into place; the temp file never outlives a failure. `mode`: chmod before the rename.

    The temp name keeps `path`'s suffix, for writers that choose a format by it (OpenCV, tifffile).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, ".tmp" + path.suffix)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename makes it "complete"
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) atomically (`atomic_write_with`)."""
    return atomic_write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """`data` as JSON (UTF-8, non-ASCII kept), written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """One JSON object per line, written atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


class _HashMemo:
    """sha256 of files by identity (device, inode, size, mtime): a file rewritten or replaced is hashed again."""

    def __init__(self) -> None:
        self._items: collections.OrderedDict[tuple, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def identity(path: Path) -> tuple:
        st = os.stat(path)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def get(self, key: tuple) -> str | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, hexdigest: str) -> None:
        with self._lock:
            self._items[key] = hexdigest
            while len(self._items) > _REMEMBERED_HASHES:
                self._items.popitem(last=False)


_HASHES = _HashMemo()


def remember_sha256(path: str | Path, hexdigest: str, size: int) -> bool:
    """Record `path`'s sha256, computed while it was written; ignored (False) unless the file has `size` bytes.

    A rename keeps the file's identity, so the hash follows an upload moved into a session's folder.
    """
    key = _HashMemo.identity(Path(path))
    if key[2] != size:
        return False
    _HASHES.put(key, hexdigest)
    return True


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's whole content: remembered for this file as it is now, else read once."""
    path = Path(path)
    key = _HashMemo.identity(path)
    known = _HASHES.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    _HASHES.put(key, digest.hexdigest())
    return digest.hexdigest()


def read_yaml(path: str | Path | None, package: str, default_name: str, what: str,
              error: type[Exception] = ChatEXAONEPathError) -> Any:
    """A user's YAML file, or the default shipped in `package`; a missing or malformed file raises `error`."""
    import yaml
    from importlib import resources

    where = str(path) if path is not None else default_name
    try:
        text = resources.files(package).joinpath(default_name).read_text() if path is None else Path(path).read_text()
        return yaml.safe_load(text)
    except FileNotFoundError as e:
        raise error(f"{what} not found: {path}.") from e
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {str(e).splitlines()[0]}.") from e
