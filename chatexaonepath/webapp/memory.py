"""Giving memory back to the operating system once a slide is let go.

glibc keeps freed memory in its per-thread arenas (the app's handlers run on many threads), so
without a trim the app's footprint would stay at its highest point long after the slides that
needed it are gone.
"""

from __future__ import annotations

import ctypes
import gc


def release_memory() -> None:
    """Collect what a finished load, a closed slide or an ended session left, and give the freed heap back."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
