"""The page's event handlers: each finds its caller's session, bound to the caller's login, and answers in one sentence.

A session is made only by `start` (the page's load event); every other handler uses the session
the page started, so a call that names no live session of its login — a script calling
`/gradio_api/call/…`, a hidden event by `fn_index`, another login's session id — is refused in one
sentence and creates nothing. Every number a scripted client may send is checked before use.
"""

from __future__ import annotations

import html
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from ..chat.regions import Region
from ..errors import ChatEXAONEPathError, MissingMppError
from ..vision_tower.slide import MPP_RANGE
from .config import GenerationSettings
from .engine import AppEngine
from .messages import user_message
from .session import LoadProgress, SlideView, WebSession
from .case import example_case_slides, strip_html
from .viewer import chat_messages, page_case_region, region_header, session_mpp

logger = logging.getLogger(__name__)

LOAD_STAGES = ("reading", "tissue", "features", "aggregating", "drawing")


# -- HTML fragments (inline styles: build_demo stays self-contained, no launch-time CSS) -------------------
def box(body: str, colour: str, background: str) -> str:
    return (f'<div style="border-left:4px solid {colour};background:{background};padding:8px 12px;'
            f'border-radius:4px;color:#1f2937">{body}</div>')


def progress_html(progress: LoadProgress) -> str:
    """A loading step: the stages with the current one highlighted, counts, rate and estimate."""
    stage = "tissue" if progress.stage == "waiting" else progress.stage
    steps = " → ".join(f"<b>{s}</b>" if s == stage else f'<span style="color:#6b7280">{s}</span>'
                       for s in LOAD_STAGES)
    body = f'<div data-stage="{progress.stage}">{steps}<br>{html.escape(progress.message)}'
    if progress.total:
        rate = f" · {progress.rate:.1f} patches/s" if progress.rate else ""
        eta = f" · about {progress.eta:.0f} s left" if progress.eta else ""
        body += (f'<br><progress value="{progress.done}" max="{progress.total}" style="width:100%"></progress>'
                 f"<br>{progress.done} / {progress.total} patches{rate}{eta}")
    return box(body + "</div>", "#2563eb", "#eff6ff")


def error_html(message: str) -> str:
    return box(f'<span data-error="1">{html.escape(message)}</span>', "#b91c1c", "#fee2e2")


def done_html(view: SlideView, seconds: float, slides: int = 1) -> str:
    case = f" This case has {slides} slides: ask about them together." if slides > 1 else ""
    body = f"✓ {html.escape(view.summary)} Ready in {seconds:.1f} s — ask away.{case}"
    if view.unlike:  # over the chat, where the answers will appear
        return box(f'<span data-ready="{html.escape(view.name)}">{body}</span><br>'
                   f'<span class="cxp-untypical" data-untypical="1">⚠ {html.escape(view.unlike)}</span>',
                   "#b45309", "#fef3c7")
    return box(f'<span data-ready="{html.escape(view.name)}">{body}</span>', "#15803d", "#dcfce7")


def upload_label(config, adding: bool = False) -> str:
    """The upload box's label: what it takes, and whether the next slide replaces the case or joins it."""
    what = ("svs, ndpi, tif, scn, bif, png, jpg; DICOM or mrxs as .zip; "
            f"≤ {config.max_upload_gb:g} GB")
    return f"Add a slide to this case ({what})" if adding else f"Slide file ({what})"


def adding_controls(session: WebSession | None, engine: AppEngine) -> tuple:
    """(add-slide button, upload box, example button) updates for whether the next load adds to the case."""
    ready = session is not None and bool(session.case)
    adding = ready and session.adding
    button = gr.update(visible=ready, variant="primary" if adding else "secondary",
                       value="Adding: the next slide joins this case (click to replace instead)" if adding
                       else "Add a slide to this case")
    example = gr.update(value="Add the synthetic example slide to this case" if adding
                        else "Load the synthetic example slide")
    return button, gr.update(label=upload_label(engine.config, adding)), example


def gallery_items(view: SlideView) -> list[tuple]:
    return view.gallery()  # captions in µm and shares of the attention (slide_view.py)


def caller(request: gr.Request) -> tuple[str, str | None, str | None]:
    """(session id, client address, login) of a request; the address and login are None when unknown."""
    client = getattr(request, "client", None)
    return request.session_hash, getattr(client, "host", None), getattr(request, "username", None)


def finite(value: object, what: str, low: float, high: float) -> float:
    """A number a scripted client sent, within [low, high]; anything else (text, NaN, 1e309, huge) one sentence."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ChatEXAONEPathError(f"{what} must be a number between {low:g} and {high:g}, got {str(value)[:40]!r}.") \
            from e
    if not (math.isfinite(number) and low <= number <= high):
        raise ChatEXAONEPathError(f"{what} must be between {low:g} and {high:g}, got {str(value)[:40]}.")
    return number


class PageHandlers:
    """The page's event handlers, bound to one engine; each looks up the caller's session."""

    SKIP_LOAD = (gr.skip(),) * 8  # the outputs of a load event, all left as they are

    def __init__(self, engine: AppEngine) -> None:
        self.engine = engine

    # -- sessions --------------------------------------------------------------------------------------
    def start(self, request: gr.Request) -> str:
        """The page loaded: start its session (the only way one starts); a refusal is shown in the status."""
        session_id, client, user = caller(request)
        try:
            session = self.engine.start_session(session_id, client=client, user=user)
        except ChatEXAONEPathError as e:
            return error_html(str(e))
        return error_html(session.notice) if session.notice else ""

    def _session(self, request: gr.Request) -> WebSession:
        """The caller's live session; `NoSessionError` (or `ServerBusyError` when re-made after expiry) otherwise."""
        session_id, client, user = caller(request)
        return self.engine.resume_session(session_id, client=client, user=user)

    def _find(self, request: gr.Request) -> WebSession | None:
        session_id, _, user = caller(request)
        return self.engine.find_session(session_id, user)

    def end(self, request: gr.Request) -> None:
        session_id, _, user = caller(request)
        self.engine.end_session(session_id, user)

    # -- slides ----------------------------------------------------------------------------------------
    def claim(self, upload: str | None, request: gr.Request) -> str:
        """An upload just arrived: take it into the session's folder at once (the load that follows waits its turn)."""
        if not upload:
            return gr.skip()
        try:
            session = self._session(request)
            session.claim_upload(upload)
        except ChatEXAONEPathError as e:
            self._discard_gradio_copy(upload)  # a refused upload leaves nothing on disk
            return error_html(user_message(e, "receiving the upload"))
        return progress_html(LoadProgress("waiting", f"Received {Path(upload).name}; waiting for the model …"))

    def load_claimed(self, show: bool, opacity: float, request: gr.Request) -> Iterator[tuple]:
        """Load what `claim` took; nothing (the claim's message stays) when it took nothing."""
        session = self._find(request)
        if session is None or session.claimed is None:
            yield self.SKIP_LOAD
            return
        yield from self._loading(session, session.load_claimed, show, opacity)

    def load_upload(self, upload: str | None, show: bool, opacity: float, request: gr.Request) -> Iterator[tuple]:
        """`/load_upload` for API clients: an uploaded file, taken and loaded in one call."""
        if not upload:
            yield self.SKIP_LOAD
            return
        try:
            session = self._session(request)
        except ChatEXAONEPathError as e:
            self._discard_gradio_copy(upload)  # a refused upload leaves nothing on disk
            yield error_html(str(e)), *(gr.skip(),) * 5, None, gr.skip()
            return
        yield from self._loading(session, lambda report: session.load_upload(upload, None, report), show, opacity)

    def load_example(self, show: bool, opacity: float, request: gr.Request) -> Iterator[tuple]:
        try:
            session = self._session(request)
        except ChatEXAONEPathError as e:
            yield error_html(str(e)), *(gr.skip(),) * 7
            return
        yield from self._loading(session, lambda report: session.load(self.engine.example_slide(), None, report),
                                 show, opacity)

    def load_example_case(self, show: bool, opacity: float, request: gr.Request) -> Iterator[tuple]:
        """The demo's example case: a few held-out slides of one organ, loaded as a new case one after another."""
        try:
            session = self._session(request)
            if self.engine.demo is None:
                raise ChatEXAONEPathError("This server offers no example case (it serves no demo model).")
            paths = example_case_slides(self.engine.demo)[:self.engine.config.max_case_slides]
        except ChatEXAONEPathError as e:
            yield error_html(str(e)), *(gr.skip(),) * 7
            return

        def load_all(report: Callable[[LoadProgress], None]) -> SlideView:
            session.set_adding(False)
            view = None
            for i, path in enumerate(paths):
                if i:
                    session.set_adding(True)
                view = session.load(path, None, report)
            return view

        yield from self._loading(session, load_all, show, opacity)

    def toggle_adding(self, request: gr.Request) -> tuple:
        """"Add a slide to this case": the upload box and the example button add to the case, or (clicked again)
        replace it as before; a full case says so."""
        try:
            session = self._session(request)
            session.set_adding(not session.adding)
        except ChatEXAONEPathError as e:
            return error_html(str(e)), *adding_controls(self._find(request), self.engine)
        return gr.skip(), *adding_controls(session, self.engine)

    def load_with_mpp(self, mpp: float | None, show: bool, opacity: float, request: gr.Request) -> Iterator[tuple]:
        low, high = MPP_RANGE
        try:  # the field's range, checked again on the server
            value = finite(mpp, "The µm per pixel", low, high)
            session = self._session(request)
        except ChatEXAONEPathError as e:
            message = str(e) if mpp not in (None, "", 0) else (
                f"Enter the slide's µm per pixel first, between {low} and {high:g} (e.g. 0.25 for a 40× scan, "
                "0.5 for 20×).")
            yield error_html(message), *(gr.skip(),) * 7
            return
        yield from self._loading(session, lambda report: session.load_pending(value, report), show, opacity)

    def _discard_gradio_copy(self, upload: str) -> None:
        path = Path(upload)
        if path.resolve().is_relative_to(self.engine.work_dir.resolve()):
            path.unlink(missing_ok=True)

    def _loading(self, session: WebSession, work: Callable[[Callable[[LoadProgress], None]], SlideView],
                 show: bool, opacity: float) -> Iterator[tuple]:
        """Run a load in a thread and stream its progress; the last update shows the slide or the error."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        outcome: dict = {}
        started = time.perf_counter()

        def run() -> None:
            try:
                outcome["view"] = work(events.put)
            except BaseException as e:  # shown below; the app keeps serving
                outcome["error"] = e
            finally:
                events.put(None)

        worker = threading.Thread(target=run, name="load-slide", daemon=True)
        worker.start()
        skip = gr.skip()
        try:
            listed = None  # the strip is redrawn when a slide starts loading, not at every patch
            while (progress := events.get()) is not None:
                strip = skip
                if session.pending_slide is not listed:
                    listed = session.pending_slide
                    strip = strip_html(session.strip(), session.shown, session.adding)
                yield progress_html(progress), skip, skip, skip, skip, skip, skip, strip
        finally:
            if worker.is_alive():  # the browser went away mid-load
                session.cancel()
        error = outcome.get("error")
        if error is not None:
            missing_mpp = isinstance(error, MissingMppError)  # its message says to enter the value below
            message = user_message(error, "loading the slide", session.upload_folders())
            yield (error_html(message), skip, skip, gr.update(visible=missing_mpp), skip, skip, None,
                   strip_html(session.strip(), session.shown, session.adding))
            return
        view = outcome["view"]
        slides = len(session.case)
        yield (done_html(view, time.perf_counter() - started, slides), view.compose(show, _opacity(opacity)),
               gallery_items(view), gr.update(visible=False),
               chat_messages(session, self.engine.tiles) if slides > 1 else [], "", None,
               strip_html(session.strip(), session.shown, session.adding))

    def cancel(self, request: gr.Request) -> None:
        session = self._find(request)
        if session is not None:
            session.cancel()

    def set_repetition_guards(self, penalty: float, ngram: float, request: gr.Request) -> None:
        """This tab's anti-loop settings (advanced panel); values outside the sliders' ranges are ignored."""
        session = self._find(request)
        try:
            penalty, ngram = finite(penalty, "The repetition penalty", 1.0, 2.0), finite(ngram, "The n-gram", 0, 16)
        except ChatEXAONEPathError:
            return
        if session is not None:
            session.chat.repetition_penalty, session.chat.no_repeat_ngram_size = penalty, int(ngram)

    def recompose(self, show: bool, opacity: float, request: gr.Request):
        session = self._find(request)
        view = session.view if session is not None else None
        return gr.skip() if view is None else view.compose(bool(show), _opacity(opacity))

    # -- chat ------------------------------------------------------------------------------------------
    def ask(self, question: str, temperature: float, max_tokens: float, system_prompt: str,
            request: gr.Request, region: str = "") -> Iterator[tuple]:
        if not isinstance(question, str) or not question.strip():
            yield gr.skip(), gr.skip(), "Type a question first."
            return
        try:
            session = self._session(request)
            slide, scope = 0, None  # "": the whole case
            if region not in (None, "") and str(region).strip():  # "x,y,w,h", or "N:x,y,w,h" on slide N of a case
                slide, scope = page_case_region(region, max(len(session.chat.slides), 1))
        except ChatEXAONEPathError as e:  # an unreadable region, or no session
            yield gr.skip(), question, f"**Error:** {e}"
            return
        yield from self._answer(session, question, temperature, max_tokens, system_prompt, region=scope, slide=slide)

    def retry(self, question: str, temperature: float, max_tokens: float, system_prompt: str,
              request: gr.Request, region: str = "") -> Iterator[tuple]:
        try:
            session = self._session(request)
            turns = session.turns
            scope = getattr(turns[-2], "region", None) if len(turns) >= 2 else None  # asked again as it was asked
            slide = getattr(turns[-2], "slide", 0) if len(turns) >= 2 else 0
            last = session.drop_last_exchange()
        except ChatEXAONEPathError as e:
            yield gr.skip(), gr.skip(), str(e)
            return
        yield from self._answer(session, last, temperature, max_tokens, system_prompt, keep_question=question,
                                region=scope, slide=slide)

    def _answer(self, session: WebSession, question: str, temperature: float, max_tokens: float,
                system_prompt: str, keep_question: str = "", region: Region | None = None,
                slide: int = 0) -> Iterator[tuple]:
        tiles = self.engine.tiles
        header = ""
        if region is not None:  # its thumbnail only when its slide is on show (the one the viewer publishes)
            header = region_header(region, tiles.published(session) if slide == session.shown else None,
                                   session_mpp(session, slide), slide if len(session.chat.slides) > 1 else None)
        history = chat_messages(session, tiles) + [{"role": "user", "content": header + question}]
        try:
            settings = GenerationSettings(finite(temperature, "Temperature", 0.0, 2.0),
                                          int(finite(max_tokens, "Max new tokens", 1, 1e6)),
                                          system_prompt if isinstance(system_prompt, str) else None)
            stream = session.ask_stream(question, settings, region, slide)  # starts now: the model reads meanwhile
        except Exception as e:
            yield gr.skip(), question, f"**Error:** {user_message(e, 'answering', session.upload_folders())}"
            return
        finished = False
        try:
            yield history + [{"role": "assistant", "content": "…"}], keep_question, ""
            for text, reply in stream:
                if reply is None:
                    yield history + [{"role": "assistant", "content": text}], gr.skip(), gr.skip()
            finished = True
        except Exception as e:  # shown under the chat; the question goes back into the box
            finished = True
            yield (chat_messages(session, tiles), question,
                   f"**Error:** {user_message(e, 'answering', session.upload_folders())}")
            return
        finally:
            if not finished:  # the browser went away: end the generation too
                session.stop()
                stream.close()
        note = "Stopped." if reply.stopped else (f"First words after {reply.first_token_seconds or 0:.2f} s; "
                                                 f"{reply.new_tokens} tokens in {reply.seconds:.1f} s.")
        yield chat_messages(session, tiles), gr.skip(), note

    def stop(self, request: gr.Request) -> None:
        session = self._find(request)
        if session is not None:
            session.stop()

    def clear(self, request: gr.Request) -> tuple:
        session = self._find(request)
        if session is not None:
            session.stop()  # an answer being written ends first, then the conversation is forgotten
            session.clear()
        return [], ""


def _opacity(value: object) -> float:
    """The heatmap slider's value; anything unreadable (a scripted client) draws at the default."""
    try:
        return finite(value, "Opacity", 0.0, 1.0)
    except ChatEXAONEPathError:
        return 0.5
