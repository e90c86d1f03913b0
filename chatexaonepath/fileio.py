"""Atomic file writes: a file that exists under its final name is complete.

Every stage writes its outputs this way, so a kill never leaves a half-written JSON that a rerun
or the next stage would trust.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

from .errors import ChatEXAONEPathError


def temp_beside(path: str | Path, suffix: str = ".tmp") -> Path:
    """A hidden temp name beside `path`, unique to this writer: `.<name>.<pid>.<random><suffix>`.

    The pid alone is not enough: the app's sessions are threads of one process, and two of them
    writing the same cache file at once (the same slide uploaded twice) would share a temp file.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temp file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """`data` as JSON (UTF-8, non-ASCII kept), written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """One JSON object per line, written atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


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
