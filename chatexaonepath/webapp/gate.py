"""Who may use the model now: `concurrency` slots, answers first, loads making way at their checkpoints.

A load can hold the model for minutes (a large slide's patches) while a question needs a second. So
a question never queues behind a load: a load checks at every checkpoint (each strip of a whole-level
read, each slice of patches) whether a question is waiting and, if so, gives its slot up until the
question has one. A load that made way resumes before any new load starts, so at most `slots` loads
are ever under way (each holds a decoded slide in memory). Waiting checks the caller's cancellation
every `POLL_SECONDS`, so Cancel ends a load that has not even started.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

POLL_SECONDS = 0.2
ANSWER, RESUME, LOAD = 0, 1, 2  # priorities: lower goes first


class Slot:
    """One held model slot; a load calls `make_way` at its checkpoints."""

    def __init__(self, gate: "ModelGate", cancelled: Callable[[], None] | None) -> None:
        self._gate, self._cancelled = gate, cancelled
        self.held = False
        self.made_way = 0  # times this slot was given up for an answer

    def make_way(self) -> None:
        """If a question waits, give the slot up until it has one, then take it back (before any new load)."""
        if self._cancelled is not None:
            self._cancelled()
        if self._gate.answers_waiting and self.held:
            self._gate.release()
            self.held = False
            self.made_way += 1
            self._gate.acquire(RESUME, self._cancelled)
            self.held = True


class ModelGate:
    """`slots` model slots shared by answers (first), loads resuming after making way, and new loads (last)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._active = 0
        self._waiting = [0, 0, 0]
        self._cond = threading.Condition()

    @property
    def answers_waiting(self) -> int:
        return self._waiting[ANSWER]

    @property
    def active(self) -> int:
        return self._active

    def acquire(self, priority: int, cancelled: Callable[[], None] | None = None,
                on_wait: Callable[[], None] | None = None) -> None:
        """Take a slot once one is free and nobody of a higher priority waits; `cancelled()` may raise meanwhile."""
        with self._cond:
            self._waiting[priority] += 1
            try:
                while self._active >= self.slots or any(self._waiting[:priority]):
                    if on_wait is not None:
                        on_wait()
                        on_wait = None
                    self._cond.wait(POLL_SECONDS)
                    if cancelled is not None:
                        cancelled()
            except BaseException:
                self._cond.notify_all()  # a higher-priority waiter left: others may go now
                raise
            finally:
                self._waiting[priority] -= 1
            self._active += 1

    def release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    @contextmanager
    def hold(self, kind: str = "answer", on_wait: Callable[[], None] | None = None,
             cancelled: Callable[[], None] | None = None) -> Iterator[Slot]:
        """Hold a slot for an `answer` or a `load` (which makes way for answers at its checkpoints)."""
        slot = Slot(self, cancelled)
        self.acquire(ANSWER if kind == "answer" else LOAD, cancelled, on_wait)
        slot.held = True
        try:
            yield slot
        finally:
            if slot.held:
                self.release()
