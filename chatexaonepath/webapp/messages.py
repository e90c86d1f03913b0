"""What the page says when something goes wrong: one sentence, with no server path in it.

The library's messages name files by their full path (right for a command line on your own
machine); in a shared app that would show the server's folders, so an upload is named by its own
file name and every other path by its last part. Command-line advice ("pass --mpp") is replaced
by what a web user can do.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import ChatEXAONEPathError, MissingMppError
from ..vision_tower.slide import MPP_RANGE

logger = logging.getLogger(__name__)

# An absolute path's folders: "/" not preceded by a word character, a dot or another path character.
_FOLDERS = re.compile(r"(?<![\w.:/-])/(?:[^/\s'\"()<>,;]+/)+")


def redact_paths(text: str, uploads: list[Path] = ()) -> str:
    """`text` without server folders: paths under an upload folder become relative to it, others their name."""
    for folder in sorted({str(Path(u)) for u in uploads}, key=len, reverse=True):
        text = text.replace(folder.rstrip("/") + "/", "")
    return _FOLDERS.sub("", text)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/CPU allocation failures (torch raises them as several types)."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def missing_mpp_message(name: str) -> str:
    """A slide without µm/px, told to a web user (the field under the message takes it)."""
    return (f"{name} does not record its resolution (µm per pixel). Enter it below ({MPP_RANGE[0]}–"
            f"{MPP_RANGE[1]:g}; 0.25 for a 40× scan, 0.5 for 20×) and press “Load with this µm/px”.")


def user_message(error: BaseException, doing: str, uploads: list[Path] = ()) -> str:
    """One sentence for the page: the error's own for user mistakes, a plain note for the rest.

    Unexpected errors are logged with their traceback; the page never shows one, nor a server path.
    """
    if isinstance(error, MissingMppError):
        name = re.match(r"^(.*?) does not record", str(error))
        return missing_mpp_message(redact_paths(name.group(1), uploads) if name else "The slide")
    if isinstance(error, ChatEXAONEPathError):
        return redact_paths(str(error), uploads)
    if is_out_of_memory(error):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed step took, for the next request
        logger.warning("Out of memory while %s: %s", doing, error)
        return (f"Out of memory while {doing}; try a smaller slide, fewer users at once (--concurrency 1), "
                "fewer new tokens, or a machine with more memory. The app is still running.")
    logger.error("Unexpected error while %s", doing, exc_info=error)
    return (f"Unexpected error while {doing} ({type(error).__name__}); the app is still running and the "
            "server log has the details.")
