"""The Gradio page: `build_demo(engine)` lays out the slide panel and the chat, and wires the events.

Every handler finds its browser session through `gr.Request.session_hash`, so nothing lives in
module globals and two tabs never share a slide or a conversation. Work that uses the model
(loading a slide, answering) runs under one Gradio concurrency group sized like the engine's
model slots; Cancel, Stop and the heatmap controls bypass the queue so they act at once.
"""

from __future__ import annotations

import html
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from ..chat.regions import Region
from ..chat.session import repetition_defaults
from ..errors import ChatEXAONEPathError, MissingMppError, ServerBusyError
from ..vision_tower.slide import MPP_RANGE
from .config import GenerationSettings
from .engine import AppEngine
from .messages import user_message
from .session import LoadProgress, SlideView, WebSession
from .uploads import ACCEPTED_SUFFIXES
from .viewer import ViewerHandlers, chat_messages, region_header, viewer_component

logger = logging.getLogger(__name__)

MODEL_GROUP = "model"
LOAD_STAGES = ("reading", "tissue", "features", "aggregating", "drawing")


def example_questions() -> list[str]:
    """One question per category of the RAIDER question bank (diagnosis, organ, type, grade, margins…)."""
    from ..raider.generate import load_questions

    first: dict[str, str] = {}
    for question in load_questions():
        first.setdefault(question.category, question.text)
    return list(first.values())


# -- HTML fragments (inline styles: build_demo stays self-contained, no launch-time CSS) -------------------
def _box(body: str, colour: str, background: str) -> str:
    return (f'<div style="border-left:4px solid {colour};background:{background};padding:8px 12px;'
            f'border-radius:4px;color:#1f2937">{body}</div>')


def banner_html(engine: AppEngine) -> str:
    """The honesty banner (empty for a fully trained model)."""
    text = engine.card.banner()
    if text is None:
        return ""
    tail = "" if "not a medical device" in text.lower() else " Not a medical device."  # said once, not twice
    return _box(f"<b>⚠ {html.escape(text)}</b>{tail}", "#b91c1c", "#fee2e2")


def model_card_markdown(engine: AppEngine) -> str:
    rows = "\n".join(f"| {name} | {value.replace('|', '/')} |" for name, value in engine.card.rows())
    return f"| part | in use |\n|---|---|\n{rows}"


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
    return _box(body + "</div>", "#2563eb", "#eff6ff")


def error_html(message: str) -> str:
    return _box(f'<span data-error="1">{html.escape(message)}</span>', "#b91c1c", "#fee2e2")


def done_html(view: SlideView, seconds: float) -> str:
    body = f"✓ {html.escape(view.summary)} Ready in {seconds:.1f} s — ask away."
    return _box(f'<span data-ready="{html.escape(view.name)}">{body}</span>', "#15803d", "#dcfce7")


def gallery_items(view: SlideView) -> list[tuple]:
    return [(p.image, f"#{p.rank} · attention {p.attention:.4f} · level-0 ({p.coord[0]}, {p.coord[1]})")
            for p in view.patches]


# -- the page -------------------------------------------------------------------------------------------
def build_demo(engine: AppEngine) -> gr.Blocks:
    """The app's page for `engine`; launch it with `.queue(...).launch(...)` (cli.launch_app does)."""
    with gr.Blocks(title="ChatEXAONEPath", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown("## ChatEXAONEPath — chat about a whole-slide image")
        gr.HTML(banner_html(engine), elem_id="banner")
        with gr.Accordion("Model in use", open=engine.card.is_demo, elem_id="model-card"):
            gr.Markdown(model_card_markdown(engine))
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                upload = gr.File(label="Whole-slide image (svs, ndpi, tif/tiff, scn, bif, DICOM or .mrxs as .zip, "
                                       f"png/jpg; up to {engine.config.max_upload_gb:g} GB)",
                                 file_types=list(ACCEPTED_SUFFIXES), elem_id="upload", height=120)
                with gr.Row():
                    example = gr.Button("Load the synthetic example slide", elem_id="example", size="md",
                                        visible=engine.config.example)
                    cancel = gr.Button("Cancel loading", variant="stop", elem_id="cancel", size="md")
                with gr.Row(visible=False, elem_id="mpp-row") as mpp_row:
                    mpp = gr.Number(label="µm per pixel at full resolution (0.25 for a 40× scan, 0.5 for 20×)",
                                    elem_id="mpp", minimum=MPP_RANGE[0], maximum=MPP_RANGE[1])
                    mpp_load = gr.Button("Load with this µm/px", elem_id="mpp-load", variant="primary")
                status = gr.HTML("", elem_id="status")
                viewer = viewer_component()  # pan and zoom to full resolution, with the overlays (viewer.py)
                slide_view = gr.Image(label="Thumbnail: tissue outline and attention heatmap (to download or print)",
                                      type="numpy",
                                      interactive=False, elem_id="slide-view", buttons=["download", "fullscreen"])
                with gr.Row():
                    show_heatmap = gr.Checkbox(True, label="Attention heatmap", elem_id="heatmap-toggle")
                    opacity = gr.Slider(0.0, 1.0, 0.5, step=0.05, label="Heatmap opacity", elem_id="opacity")
                gallery = gr.Gallery(label="Most-attended patches (full resolution, highest first)", columns=4,
                                     format="png", elem_id="patches", height=300)
            with gr.Column(scale=6):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=520, buttons=["copy"],
                                     placeholder="Load a slide, then ask about it.", feedback_options=None)
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the slide …", show_label=False, scale=6,
                                          elem_id="question", autofocus=True,
                                          max_length=engine.config.max_question_chars)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row(equal_height=True):
                    # value="": an API client that predates regions may leave it out (the whole slide)
                    region = gr.Textbox("", label="Region of the next question (level-0 x, y, w, h; empty: the whole "
                                              "slide)", placeholder="Draw a region on the slide, or type x,y,w,h",
                                        elem_id="region", scale=6, max_lines=1)
                    whole = gr.Button("Whole slide", size="sm", scale=1, elem_id="whole-slide")
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", size="sm", elem_id="stop")
                    retry = gr.Button("Retry", size="sm", elem_id="retry")
                    clear = gr.Button("Clear chat", size="sm", elem_id="clear")
                chat_status = gr.Markdown("", elem_id="chat-status")
                questions = engine.demo.questions() if engine.demo is not None else example_questions()
                gr.Examples([[q] for q in questions], inputs=[question], label="Example questions")
                with gr.Accordion("Advanced: generation and system prompt", open=False, elem_id="advanced"):
                    temperature = gr.Slider(0.0, 2.0, engine.default_settings.temperature, step=0.05,
                                            label="Temperature (0 = greedy, reproducible)", elem_id="temperature")
                    max_tokens = gr.Slider(1, engine.config.max_new_tokens_limit,
                                           engine.default_settings.max_new_tokens, step=1,
                                           label="Max new tokens", elem_id="max-tokens")
                    penalty, ngram = repetition_defaults(engine.model.llm)  # the LLM's own, else the anti-loop guards
                    repetition = gr.Slider(1.0, 2.0, penalty, step=0.05, elem_id="repetition-penalty",
                                           label="Repetition penalty (1 = off; stops a small LLM looping)")
                    no_repeat = gr.Slider(0, 16, ngram, step=1, elem_id="no-repeat-ngram",
                                          label="Never repeat a phrase of this many tokens (0 = off)")
                    system_prompt = gr.Textbox(engine.default_settings.system_prompt, lines=4,
                                               label="System prompt (empty: none)", elem_id="system-prompt",
                                               max_length=engine.config.max_system_prompt_chars)
        gr.Markdown("Research software, not a medical device: answers are never a diagnosis. "
                    "Uploads stay on this server in a private folder deleted when you close the tab "
                    f"(or after {engine.config.session_idle_minutes:g} minutes without a request).")

        handlers = _Handlers(engine)
        viewing = ViewerHandlers(engine)
        model_work = dict(concurrency_id=MODEL_GROUP, concurrency_limit=engine.config.concurrency,
                          show_progress="hidden")
        instant = dict(queue=False, show_progress="hidden")
        # The file box is emptied after each load (the status names the slide), ready for the next one.
        load_outputs = [status, slide_view, gallery, mpp_row, chatbot, chat_status, upload]
        show = dict(fn=viewing.show, inputs=None, outputs=[viewer, region], api_visibility="private", **model_work)
        upload.upload(handlers.load_upload, [upload, show_heatmap, opacity], load_outputs, api_name="load_upload",
                      **model_work).then(**show)
        example.click(handlers.load_example, [show_heatmap, opacity], load_outputs, api_name="load_example_slide",
                      **model_work).then(**show)
        mpp_load.click(handlers.load_with_mpp, [mpp, show_heatmap, opacity], load_outputs, api_name="load_with_mpp",
                       **model_work).then(**show)
        viewer.select(viewing.region_drawn, None, [region, viewer], api_visibility="private", **instant)
        region.submit(viewing.region_typed, [region], viewer, api_visibility="private", **instant)
        whole.click(viewing.whole_slide, None, [region, viewer], api_visibility="private", **instant)
        gallery.select(viewing.goto_patch, None, viewer, api_visibility="private", **instant)
        for guard in (repetition, no_repeat):  # per tab, kept in its session: the ask API stays as it was
            guard.release(handlers.set_repetition_guards, [repetition, no_repeat], None, api_visibility="private",
                          **instant)
        cancel.click(handlers.cancel, None, None, api_name="cancel", **instant)
        show_heatmap.change(handlers.recompose, [show_heatmap, opacity], slide_view, api_name="recompose", **instant)
        opacity.release(handlers.recompose, [show_heatmap, opacity], slide_view, api_visibility="private", **instant)

        chat_inputs = [question, temperature, max_tokens, system_prompt, region]
        chat_outputs = [chatbot, question, chat_status]
        send.click(handlers.ask, chat_inputs, chat_outputs, api_name="ask", **model_work)
        question.submit(handlers.ask, chat_inputs, chat_outputs, api_visibility="private", **model_work)
        retry.click(handlers.retry, chat_inputs, chat_outputs, api_name="retry", **model_work)
        stop.click(handlers.stop, None, None, api_name="stop", **instant)
        clear.click(handlers.clear, None, [chatbot, chat_status], api_name="clear", **instant)
        chatbot.clear(handlers.clear, None, [chatbot, chat_status], api_visibility="private", **instant)  # the chat's own bin icon
        demo.unload(handlers.end)
    return demo


class _Handlers:
    """The page's event handlers, bound to one engine; each looks up the caller's session."""

    def __init__(self, engine: AppEngine) -> None:
        self.engine = engine

    def _session(self, request: gr.Request) -> WebSession:
        """The caller's session; `ServerBusyError` when the server is at its limit of sessions."""
        return self.engine.session(request.session_hash)

    # -- slides ----------------------------------------------------------------------------------------
    def load_upload(self, upload: str | None, show: bool, opacity: float, request: gr.Request) -> Iterator[tuple]:
        if not upload:
            yield (gr.skip(),) * 7
            return
        try:
            session = self._session(request)
        except ServerBusyError as e:
            self._discard_gradio_copy(upload)  # a refused upload leaves nothing on disk
            yield error_html(str(e)), *(gr.skip(),) * 5, None
            return
        yield from self._loading(session, lambda report: session.load_upload(upload, None, report), show, opacity)

    def load_example(self, show: bool, opacity: float, request: gr.Request) -> Iterator[tuple]:
        try:
            session = self._session(request)
        except ServerBusyError as e:
            yield error_html(str(e)), *(gr.skip(),) * 6
            return
        yield from self._loading(session, lambda report: session.load(self.engine.example_slide(), None, report),
                                 show, opacity)

    def load_with_mpp(self, mpp: float | None, show: bool, opacity: float, request: gr.Request) -> Iterator[tuple]:
        low, high = MPP_RANGE
        if not mpp or not low <= float(mpp) <= high:  # the field's range, checked again on the server
            yield error_html(f"Enter the slide's µm per pixel first, between {low} and {high:g} (e.g. 0.25 for a "
                             "40× scan, 0.5 for 20×)."), *(gr.skip(),) * 6
            return
        try:
            session = self._session(request)
        except ServerBusyError as e:
            yield error_html(str(e)), *(gr.skip(),) * 6
            return
        yield from self._loading(session, lambda report: session.load_pending(float(mpp), report), show, opacity)

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
            while (progress := events.get()) is not None:
                yield progress_html(progress), skip, skip, skip, skip, skip, skip
        finally:
            if worker.is_alive():  # the browser went away mid-load
                session.cancel()
        error = outcome.get("error")
        if error is not None:
            missing_mpp = isinstance(error, MissingMppError)  # its message says to enter the value below
            message = user_message(error, "loading the slide", session.upload_folders())
            yield error_html(message), skip, skip, gr.update(visible=missing_mpp), skip, skip, None
            return
        view = outcome["view"]
        yield (done_html(view, time.perf_counter() - started), view.compose(show, opacity), gallery_items(view),
               gr.update(visible=False), [], "", None)

    def cancel(self, request: gr.Request) -> None:
        session = self.engine.find_session(request.session_hash)
        if session is not None:
            session.cancel()

    def set_repetition_guards(self, penalty: float, ngram: float, request: gr.Request) -> None:
        """This tab's anti-loop settings (advanced panel); values outside the sliders' ranges are ignored."""
        try:
            penalty, ngram = float(penalty), int(ngram)
        except (TypeError, ValueError, OverflowError):
            return
        if not (1.0 <= penalty <= 2.0 and 0 <= ngram <= 16):
            return
        try:
            chat = self.engine.session(request.session_hash).chat
        except ServerBusyError:  # the next question says the server is busy
            return
        chat.repetition_penalty, chat.no_repeat_ngram_size = penalty, ngram

    def recompose(self, show: bool, opacity: float, request: gr.Request):
        session = self.engine.find_session(request.session_hash)
        view = session.view if session is not None else None
        return gr.skip() if view is None else view.compose(show, opacity)

    # -- chat ------------------------------------------------------------------------------------------
    def ask(self, question: str, temperature: float, max_tokens: float, system_prompt: str,
            request: gr.Request, region: str = "") -> Iterator[tuple]:
        if not question or not question.strip():
            yield gr.skip(), gr.skip(), "Type a question first."
            return
        try:
            scope = Region.parse(region) if region and region.strip() else None  # empty: the whole slide
            session = self._session(request)
        except ChatEXAONEPathError as e:  # an unreadable region, or a server at its limit of sessions
            yield gr.skip(), question, f"**Error:** {e}"
            return
        yield from self._answer(session, question, temperature, max_tokens, system_prompt, region=scope)

    def retry(self, question: str, temperature: float, max_tokens: float, system_prompt: str,
              request: gr.Request, region: str = "") -> Iterator[tuple]:
        try:
            session = self._session(request)
            turns = session.turns
            scope = getattr(turns[-2], "region", None) if len(turns) >= 2 else None  # asked again as it was asked
            last = session.drop_last_exchange()
        except ChatEXAONEPathError as e:
            yield gr.skip(), gr.skip(), str(e)
            return
        yield from self._answer(session, last, temperature, max_tokens, system_prompt, keep_question=question,
                                region=scope)

    def _answer(self, session: WebSession, question: str, temperature: float, max_tokens: float,
                system_prompt: str, keep_question: str = "", region: Region | None = None) -> Iterator[tuple]:
        tiles = self.engine.tiles
        header = region_header(region, tiles.published(session)) if region is not None else ""
        history = chat_messages(session, tiles) + [{"role": "user", "content": header + question}]
        try:
            settings = GenerationSettings(float(temperature), _whole(max_tokens), system_prompt)
            stream = session.ask_stream(question, settings, region)  # starts now: the model reads meanwhile
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
        session = self.engine.find_session(request.session_hash)
        if session is not None:
            session.stop()

    def clear(self, request: gr.Request) -> tuple:
        session = self.engine.find_session(request.session_hash)
        if session is not None:
            session.stop()  # an answer being written ends first, then the conversation is forgotten
            session.clear()
        return [], ""

    def end(self, request: gr.Request) -> None:
        self.engine.end_session(request.session_hash)


def _whole(value: float) -> int:
    """A slider's number as a whole count; NaN or infinity (a scripted client) is refused in one sentence."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ChatEXAONEPathError(f"Max new tokens must be a whole number, got {value!r}.") from e
