"""One chat completion: the page's `WebSession.ask` in a thread of its own, its pieces handed to the event loop.

The answer is the page's own code path (`WebSession.ask`: the question's limits, the per-session rate,
the model slot with questions first, the context trimmed as in the page); only the conversation comes
from the request (`history`). Pieces reach the event loop through `call_soon_threadsafe` as they are
generated, so streaming adds no polling to the time to first token. Stop sequences are matched on the
text as it streams: text that could be the start of one is held back until it is known not to be, and
a match ends generation there (`on_text` returns False). A client that goes away stops the generation
at its next piece. The key's token budget is charged when the answer ends (the most it asked for,
when it ended without a reply).

A case (several files in one conversation) is answered by its first file's session, with the other
files' slides joined for this answer only (`WebSession.ask(joined=…)`), so each is labelled and pooled
exactly as the page's case; its evidence says which file each patch is on.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from typing import AsyncIterator

from ..session import Reply, WebSession
from .errors import from_exception
from .files import ApiFile, bad_request_failed
from .keys import ApiOwner, KeyBudgets
from .requests import ChatRequest

POLL_SECONDS = 0.5  # how often a waiting request checks whether its client is still there


class _ClientGone(Exception):
    """Raised from the answer's callback to end generation: nobody is waiting for it."""


class StopMatcher:
    """The answer's text as it streams, cut at the first stop sequence; text that may start one is held back."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text, self.sent, self.hit = "", 0, False

    def feed(self, piece: str) -> str:
        """Add a piece; return the text that can be sent now (`hit` turns True at a stop sequence)."""
        if self.hit:
            return ""
        self.text += piece
        found = [i for i in (self.text.find(stop, self.sent) for stop in self.stops) if i >= 0]
        if found:
            self.hit = True
            self.text = self.text[:min(found)]
            return self._take(len(self.text))
        held = max((k for stop in self.stops for k in range(1, len(stop)) if self.text.endswith(stop[:k])), default=0)
        return self._take(len(self.text) - held)

    def flush(self) -> str:
        """The text still held back, at the end of the answer."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


class AnswerRun:
    """One answer being generated for a request (see the module's docstring)."""

    def __init__(self, members: list[tuple[ApiFile, WebSession]], request: ChatRequest, owner: ApiOwner,
                 budgets: KeyBudgets) -> None:
        self.members, self.request, self.owner, self.budgets = members, request, owner, budgets
        self.record, self.session = members[0]  # the first file's session holds the conversation
        self.joined = []  # the other files' slides, taken now: a file deleted from here on still answers this once
        for record, session in members[1:]:
            loaded = session.chat.slide
            if loaded is None:  # its session ended since it was found ready
                raise bad_request_failed(record)
            self.joined.append(loaded)
        self.matcher = StopMatcher(request.stop)
        self.cancelled = threading.Event()
        self.reply: Reply | None = None
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        """Start generating (the caller has counted this request with `budgets.enter`; the thread ends it)."""
        threading.Thread(target=self._work, name="api-answer", daemon=True).start()

    def cancel(self) -> None:
        """The client is gone: stop at the next piece (or before starting, if still waiting its turn)."""
        self.cancelled.set()

    def _emit(self, kind: str, value: object = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server stopped (its loop is closed): nobody is waiting for this
            self.cancel()

    def _on_text(self, piece: str) -> bool | None:
        if self.cancelled.is_set():
            raise _ClientGone
        text = self.matcher.feed(piece)
        if text:
            self._emit("text", text)
        return False if self.matcher.hit else None

    def _work(self) -> None:
        request, spent = self.request, self.request.settings.max_new_tokens
        try:
            while not self.record.answering.acquire(timeout=POLL_SECONDS):  # a session is one conversation at a time
                if self.cancelled.is_set():
                    raise _ClientGone
            try:
                if self.cancelled.is_set():
                    raise _ClientGone
                self.reply = self.session.ask(request.question, self._on_text, request.settings, request.region,
                                              history=request.history, slide=request.slide, joined=self.joined)
            finally:
                self.record.answering.release()
            spent = self.reply.prompt_tokens + self.reply.new_tokens
            self._emit("done", self.reply)
        except _ClientGone:
            self._emit("gone")
        except BaseException as e:  # told to the client in the API's words
            self._emit("error", from_exception(e, "answering", self.session.upload_folders()))
        finally:
            self.budgets.spend(self.owner, spent)
            self.budgets.leave(self.owner)

    async def next_event(self, client_gone=None) -> tuple[str, object]:
        """The next (kind, value): text, done (a Reply), error (an ApiError) or gone; `client_gone()` is polled."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), POLL_SECONDS if client_gone else None)
            except asyncio.TimeoutError:
                if await client_gone():
                    self.cancel()

    # -- what the client receives ------------------------------------------------------------------------
    @property
    def finish_reason(self) -> str:
        if self.matcher.hit:
            return "stop"
        reply = self.reply
        return "length" if reply is not None and reply.new_tokens >= self.request.settings.max_new_tokens else "stop"

    def usage(self) -> dict:
        reply = self.reply
        prompt, completion = (reply.prompt_tokens, reply.new_tokens) if reply is not None else (0, 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def evidence(self) -> dict | None:
        """What the answer rests on: the slide, the region asked about, and its most-weighted patches; for a case,
        also each slide's file and scope, and the slide each patch is on (`case_evidence`)."""
        reply = self.reply
        if reply is None:
            return None
        if len(self.members) > 1:
            return case_evidence(reply, [record for record, _ in self.members])
        region = list(reply.region.as_tuple()) if reply.region is not None else None
        return {"file_id": self.record.id, "slide": self.record.filename, "region": region,
                "patches_in_scope": reply.patches,
                "patches": [{"rank": e.rank, "index": e.index, "x": e.x, "y": e.y, "size": e.size,
                             "weight": round(float(e.weight), 6)} for e in reply.evidence]}


def case_evidence(reply: Reply, records: list[ApiFile]) -> dict:
    """A case's evidence: the single-slide fields (`file_id`, `slide`: the region's slide, null for a question about
    the whole case), `slides` (each file in the case's order, numbered as its label names it to the model, with
    its region and patches in scope) and, on each patch, the slide it is on."""
    region = list(reply.region.as_tuple()) if reply.region is not None else None
    slides = []
    for index, record in enumerate(records):
        own = region if index == reply.slide else None  # a region is on one slide; the others are seen whole
        patches = reply.patches if own is not None else int((record.slide or {}).get("patches", 0))
        slides.append({"number": index + 1, "file_id": record.id, "slide": record.filename, "region": own,
                       "patches_in_scope": patches})
    asked = records[reply.slide] if region is not None else None
    return {"file_id": asked.id if asked else None, "slide": asked.filename if asked else None, "region": region,
            "patches_in_scope": sum(s["patches_in_scope"] for s in slides), "slides": slides,
            "patches": [{"rank": e.rank, "slide_number": e.slide + 1, "file_id": records[e.slide].id,
                         "slide": records[e.slide].filename, "index": e.index, "x": e.x, "y": e.y, "size": e.size,
                         "weight": round(float(e.weight), 6)} for e in reply.evidence]}


def completion_body(run: AnswerRun, completion_id: str, model: str) -> dict:
    """The whole answer as OpenAI's `chat.completion` object, with `evidence` added."""
    text = run.matcher.text.strip()  # cut at the stop sequence, if one came
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": run.finish_reason, "logprobs": None}],
            "usage": run.usage(), "system_fingerprint": None, "evidence": run.evidence()}


def _chunk(completion_id: str, model: str, created: int, delta: dict, finish: str | None = None, **extra) -> bytes:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


async def stream_events(run: AnswerRun, first: tuple[str, object], completion_id: str,
                        model: str) -> AsyncIterator[bytes]:
    """Server-sent events, chunk by chunk as OpenAI sends them, from the first event on; ends with [DONE]."""
    created = int(time.time())
    role_sent = False
    event = first
    try:
        while True:
            kind, value = event
            if kind == "text":
                delta = {"content": value} if role_sent else {"role": "assistant", "content": value}
                role_sent = True
                yield _chunk(completion_id, model, created, delta)
            elif kind == "done":
                rest = run.matcher.flush()
                delta = {"content": rest} if role_sent else {"role": "assistant", "content": rest}
                yield _chunk(completion_id, model, created, delta, run.finish_reason, evidence=run.evidence())
                if run.request.include_usage:
                    yield b"data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                                  "created": created, "model": model, "choices": [],
                                                  "usage": run.usage()}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            elif kind == "error":
                yield b"data: " + json.dumps(value.body()).encode() + b"\n\n"  # OpenAI's SDK raises it
                return
            else:  # gone: nobody is listening any more
                return
            event = await run.next_event()
    finally:
        run.cancel()  # a client that went away mid-answer ends the generation


def new_completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"

