"""The Gradio page: `build_demo(engine)` lays out the slide viewer and the chat beside it, and wires the events.

The slide comes first: the viewer fills the window's height, the chat is a side panel beside it, the
most-attended patches, the thumbnail and the generation settings are tabs of that panel, and the
model card is a fold-out of the title line, open on a browser's first visit until a slide is ready
(the demo warning stays, on one line). Page-level
behaviour that needs no server (fitting the page to the window, the conversation download) is in
static/page.js; the viewer's in static/viewer.js.

The page's load event starts its session; every handler (handlers.py) finds it through
`gr.Request.session_hash` and the login, so nothing lives in module globals and two tabs never share
a slide or a conversation. Loads and answers wait in two Gradio queues, each as wide as the engine's
model slots, and the engine's gate (gate.py) decides who runs on the model, answers first; an upload
is taken into the session's folder the moment it arrives, outside the queue; Cancel, Stop and the
heatmap controls bypass the queue so they act at once. Cancel and Stop are enabled only while a load
or an answer runs (each load and answer is wrapped in two instant events that say so).
"""

from __future__ import annotations

import html
import logging

import gradio as gr

from ..chat.session import repetition_defaults
from ..vision_tower.slide import MPP_RANGE
from .engine import AppEngine
from .case import STRIP_JS, strip_html
from .handlers import PageHandlers, adding_controls, box, progress_html, upload_label  # noqa: F401 - progress_html: tested
from .messages import redact_paths
from .uploads import ACCEPTED_SUFFIXES
from .viewer_page import ViewerHandlers, region_label, viewer_component
from .wording import plain_html

logger = logging.getLogger(__name__)

# Loads and answers queue apart, each up to `concurrency` at once: the engine's gate (gate.py) decides who
# uses the model, answers first. One queue for both made a question wait in Gradio's queue for a whole load.
LOAD_GROUP, ANSWER_GROUP = "loads", "answers"
DEFAULT_OPACITY = 0.3  # low enough to see the stain through it (viewer.js fades it further at cell zoom)
NO_SLIDE_PLACEHOLDER = "Load a slide, then ask about it."
# The model card's rows in plain words, the technical name in the tooltip.
CARD_LABELS = {
    "LLM": ("Language model", "LLM: the language model that writes the answers"),
    "patch encoder": ("Patch encoder", "the image model that turns each tissue patch into a feature vector"),
    "vision tower": ("Slide reader", "vision tower: the attention aggregator and projector that turn the patch "
                                     "features into the language model's visual tokens"),
    "LoRA": ("Fine-tuning", "LoRA: low-rank adapters trained into the language model"),
}
# Runs in the browser once a load has finished: with a slide ready, the model card folds away (the slide needs the
# room) and the question box takes focus without scrolling the page.
FOCUS_QUESTION_JS = """() => { if (!document.querySelector('#status [data-ready]')) return;
  document.querySelector('#model-card')?.removeAttribute('open');
  document.querySelector('#question textarea')?.focus({preventScroll: true}); }"""


def example_questions() -> list[str]:
    """One question per category of the RAIDER question bank (diagnosis, organ, type, grade, margins…)."""
    from ..raider.generate import load_questions

    first: dict[str, str] = {}
    for question in load_questions():
        first.setdefault(question.category, question.text)
    return list(first.values())


def banner_html(engine: AppEngine) -> str:
    """The honesty banner on one line (the whole text in its tooltip and a click away); empty for a trained model."""
    text = engine.card.banner()
    if text is None:
        return ""
    tail = "" if "not a medical device" in text.lower() else " Not a medical device."  # said once, not twice
    head, _, rest = text.partition(": ")
    failed = " cxp-banner-failed" if engine.card.failure else ""  # red: this build's answers ignore the slide
    return (f'<div id="banner" class="cxp-banner{failed}" role="alert" tabindex="0" title="{html.escape(text + tail)}">'
            f"<b>{'⛔' if failed else '⚠'} {html.escape(head)}</b>{': ' if rest else ''}{plain_html(rest)}"
            f"{html.escape(tail)}</div>")


def header_html(engine: AppEngine) -> str:
    """The page's first line: the title, the demo warning and the model card (a fold-out, open on a browser's
    first visit until a slide is ready: static/page.js)."""
    return ('<div class="cxp-header"><h1 class="cxp-title">ChatEXAONEPath <span>chat about a whole-slide image'
            f"</span></h1>{banner_html(engine)}{model_card_html(engine)}</div>")


def model_card_html(engine: AppEngine) -> str:
    """What the app runs on, in plain words, as a fold-out; never a server folder."""
    rows = []
    for name, value in engine.card.rows():
        label, tip = CARD_LABELS.get(name, (name, name))
        rows.append(f'<tr><th><span class="cxp-term" title="{html.escape(tip)}">{html.escape(label)}</span></th>'
                    f"<td>{plain_html(redact_paths(value))}</td></tr>")
    warning = engine.card.banner()
    note = f'<p class="cxp-card-warning">⚠ {plain_html(warning)}</p>' if warning else ""
    return (f'<details id="model-card" class="cxp-model-card"><summary>Model in use</summary>'
            f'<div class="cxp-card-body"><table class="cxp-card">{"".join(rows)}</table>{note}</div></details>')


def model_card_markdown(engine: AppEngine) -> str:
    """The model card as a Markdown table (the conversation export carries it)."""
    rows = "\n".join(f"| {CARD_LABELS.get(name, (name,))[0]} | {redact_paths(value).replace('|', '/')} |"
                     for name, value in engine.card.rows())
    return f"| part | in use |\n|---|---|\n{rows}"


class PageState:
    """Instant events that keep the page's controls true to what runs: Cancel and Stop, the chat's placeholder,
    the model card."""

    def __init__(self, engine: AppEngine) -> None:
        self.engine = engine

    @staticmethod
    def loading():
        return gr.update(interactive=True, variant="stop")

    def loaded(self, request: gr.Request) -> tuple:
        """After a load (done, failed or cancelled): Cancel off; the chat names the slide on show."""
        session = self.engine.find_session(request.session_hash, getattr(request, "username", None))
        idle = gr.update(interactive=False, variant="secondary")
        controls = adding_controls(session, self.engine)
        if session is None or session.chat.slide is None or session.slide_path is None:
            return idle, gr.update(placeholder=NO_SLIDE_PLACEHOLDER), *controls
        name = html.escape(session.display_name(session.slide_path))
        if len(session.case) > 1:
            placeholder = (f"A case of **{len(session.case)} slides** is loaded ({name} on show). Ask about them "
                           "together below, or draw a region on the slide on show first.")
        else:
            placeholder = (f"**{name}** is loaded. Ask about it below — about the whole slide, or draw a region on "
                           "the slide first.")
        return idle, gr.update(placeholder=placeholder), *controls

    @staticmethod
    def answering():
        return gr.update(interactive=True, variant="stop")

    @staticmethod
    def answered():
        return gr.update(interactive=False, variant="secondary")


def example_picked(event: gr.SelectData) -> str:
    """An example question clicked in the empty chat goes into the question box (to send or edit)."""
    value = event.value if isinstance(event.value, dict) else {}
    return str(value.get("text", ""))


# -- the page -------------------------------------------------------------------------------------------
def build_demo(engine: AppEngine) -> gr.Blocks:
    """The app's page for `engine`; launch it with `.queue(...).launch(...)` (cli.launch_app does)."""
    with gr.Blocks(title="ChatEXAONEPath", analytics_enabled=False, delete_cache=(1800, 3600),
                   fill_width=True) as demo:
        gr.HTML(header_html(engine), elem_id="cxp-top", padding=False, apply_default_css=False)
        with gr.Row(equal_height=False, elem_id="cxp-main"):
            with gr.Column(scale=7, min_width=480, elem_id="cxp-slide"):
                viewer = viewer_component()  # pan and zoom to full resolution, with the overlays (viewer.py)
            with gr.Column(scale=3, min_width=340, elem_id="cxp-side"):
                upload = gr.File(label=upload_label(engine.config), file_types=list(ACCEPTED_SUFFIXES),
                                 elem_id="upload", height=76)
                with gr.Row(elem_id="slide-buttons"):
                    example = gr.Button("Load the synthetic example slide", elem_id="example", size="sm",
                                        visible=engine.config.example)
                    example_case = gr.Button("Load an example case (held-out demo slides)", elem_id="example-case",
                                             size="sm", visible=engine.demo is not None)
                    add_slide = gr.Button("Add a slide to this case", elem_id="add-slide", size="sm", visible=False)
                    cancel = gr.Button("Cancel loading", variant="secondary", elem_id="cancel", size="sm",
                                       interactive=False)
                with gr.Row(visible=False, elem_id="mpp-row") as mpp_row:
                    mpp = gr.Number(label="µm per pixel at full resolution (0.25 for a 40× scan, 0.5 for 20×)",
                                    elem_id="mpp", minimum=MPP_RANGE[0], maximum=MPP_RANGE[1])
                    mpp_load = gr.Button("Load with this µm/px", elem_id="mpp-load", variant="primary")
                status = gr.HTML("", elem_id="status")
                # The case's slides, a click shows one (case.py); empty for a lone slide.
                strip = gr.HTML(strip_html([], 0), elem_id="case-strip", js_on_load=STRIP_JS, padding=False,
                                apply_default_css=False)
                with gr.Tabs(elem_id="side-tabs"):
                    with gr.Tab("Chat", id="chat-tab", elem_id="chat-tab"):
                        questions = engine.demo.questions() if engine.demo is not None else example_questions()
                        chatbot = gr.Chatbot(label="Chat", show_label=False, elem_id="chat", height="100%",
                                             buttons=["copy"], placeholder=NO_SLIDE_PLACEHOLDER,
                                             feedback_options=None, examples=[{"text": q} for q in questions])
                        with gr.Row(elem_id="ask-row"):
                            question = gr.Textbox(placeholder="Ask about the slide …", show_label=False, scale=6,
                                                  elem_id="question", max_lines=4, container=False,
                                                  max_length=engine.config.max_question_chars)
                            send = gr.Button("Send", variant="primary", scale=1, elem_id="send", min_width=70, size="md")
                        with gr.Row(equal_height=True, elem_id="region-row"):
                            # value="": an API client that predates regions may leave it out (the whole slide)
                            region = gr.Textbox("", label=region_label(None, None),
                                                placeholder="draw a region on the slide, or type x, y, w, h in "
                                                            "full-resolution pixels",
                                                elem_id="region", scale=6, max_lines=1)
                            whole = gr.Button("Whole slide", size="sm", scale=1, elem_id="whole-slide", min_width=90)
                        with gr.Row(elem_id="chat-buttons"):
                            stop = gr.Button("Stop", variant="secondary", size="sm", elem_id="stop", interactive=False)
                            retry = gr.Button("Retry", size="sm", elem_id="retry")
                            clear = gr.Button("Clear chat", size="sm", elem_id="clear")
                            gr.HTML('<button type="button" id="export-chat" class="cxp-page-button" title="Download '
                                    'the conversation as Markdown, each answer with its evidence">Save chat'
                                    "</button>", padding=False, apply_default_css=False, elem_id="export-chat-box")
                        chat_status = gr.Markdown("", elem_id="chat-status")
                    with gr.Tab("Top patches", id="patches-tab", elem_id="patches-tab"):
                        gallery = gr.Gallery(label="The patches the model weighed most (full resolution, highest "
                                                   "first); a click shows one on the slide",
                                             columns=2, format="png", elem_id="patches", height="auto")
                    with gr.Tab("Thumbnail", id="thumbnail-tab", elem_id="thumbnail-tab"):
                        slide_view = gr.Image(label="The whole slide with the tissue outline and the attention, as "
                                                    "the viewer's toolbar sets them (to download or print)",
                                              type="numpy", interactive=False, elem_id="slide-view",
                                              buttons=["download", "fullscreen"])
                    with gr.Tab("Settings", id="settings-tab", elem_id="settings-tab"):
                        temperature = gr.Slider(0.0, 2.0, engine.default_settings.temperature, step=0.05,
                                                label="Temperature (0 = greedy, reproducible)", elem_id="temperature")
                        max_tokens = gr.Slider(1, engine.config.max_new_tokens_limit,
                                               engine.default_settings.max_new_tokens, step=1,
                                               label="Longest answer (new tokens)", elem_id="max-tokens")
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
                    f"(or after {engine.config.session_idle_minutes:g} minutes without a request).",
                    elem_id="cxp-footer")

        # For API clients and the load handlers: `/load_upload` (file in, slide loaded), and the thumbnail's
        # heatmap settings, which the page sets from the viewer's toolbar (its one overlay control).
        api_file = gr.File(visible=False, file_types=list(ACCEPTED_SUFFIXES))
        api_load = gr.Button(visible=False)
        api_recompose = gr.Button(visible=False)
        show_heatmap = gr.Checkbox(True, visible=False, elem_id="heatmap-toggle")
        opacity = gr.Slider(0.0, 1.0, DEFAULT_OPACITY, visible=False, elem_id="opacity")

        handlers = PageHandlers(engine)
        viewing = ViewerHandlers(engine)
        state = PageState(engine)
        model_work = dict(concurrency_id=LOAD_GROUP, concurrency_limit=engine.config.concurrency,
                          show_progress="hidden")
        answer_work = dict(model_work, concurrency_id=ANSWER_GROUP)
        instant = dict(queue=False, show_progress="hidden")
        private = dict(instant, api_visibility="private")
        demo.load(handlers.start, None, status, api_name="start_session", **instant)  # the only way a session starts
        # The file box is emptied after each load (the status names the slide), ready for the next one.
        load_outputs = [status, slide_view, gallery, mpp_row, chatbot, chat_status, upload, strip]
        show = dict(fn=viewing.show, inputs=None, outputs=[viewer, region], api_visibility="private", **model_work)
        loading = dict(fn=state.loading, inputs=None, outputs=cancel, **private)
        loaded = dict(fn=state.loaded, inputs=None, outputs=[cancel, chatbot, add_slide, upload, example], **private)
        focus = dict(fn=None, inputs=None, outputs=None, js=FOCUS_QUESTION_JS, **private)
        upload.upload(handlers.claim, upload, status, **private).then(**loading).then(
            handlers.load_claimed, [show_heatmap, opacity], load_outputs, api_visibility="private",
            **model_work).then(**show).then(**loaded).then(**focus)
        api_load.click(**loading).then(handlers.load_upload, [api_file, show_heatmap, opacity], load_outputs,
                                       api_name="load_upload", **model_work).then(**show).then(**loaded).then(**focus)
        example.click(**loading).then(handlers.load_example, [show_heatmap, opacity], load_outputs,
                                      api_name="load_example_slide", **model_work).then(**show).then(**loaded).then(**focus)
        example_case.click(**loading).then(handlers.load_example_case, [show_heatmap, opacity], load_outputs,
                                           api_name="load_example_case", **model_work).then(**show).then(
            **loaded).then(**focus)
        add_slide.click(handlers.toggle_adding, None, [status, add_slide, upload, example], api_name="add_slide",
                        **instant)
        strip.select(viewing.switch_slide, [show_heatmap, opacity], [viewer, strip, slide_view, gallery],
                     api_visibility="private", **model_work)
        mpp_load.click(**loading).then(handlers.load_with_mpp, [mpp, show_heatmap, opacity], load_outputs,
                                       api_name="load_with_mpp", **model_work).then(**show).then(**loaded).then(**focus)
        viewer.select(viewing.region_drawn, None, [region, viewer], **private)
        viewer.input(viewing.overlay_settings, None, [slide_view, show_heatmap, opacity], **private)
        region.submit(viewing.region_typed, [region], [viewer, region], **private)
        whole.click(viewing.whole_slide, None, [region, viewer], **private)
        gallery.select(viewing.goto_patch, None, viewer, **private)
        chatbot.example_select(example_picked, None, question, **private)
        for guard in (repetition, no_repeat):  # per tab, kept in its session: the ask API stays as it was
            guard.release(handlers.set_repetition_guards, [repetition, no_repeat], None, **private)
        cancel.click(handlers.cancel, None, None, api_name="cancel", **instant)
        api_recompose.click(handlers.recompose, [show_heatmap, opacity], slide_view, api_name="recompose", **instant)

        chat_inputs = [question, temperature, max_tokens, system_prompt, region]
        chat_outputs = [chatbot, question, chat_status]
        answering = dict(fn=state.answering, inputs=None, outputs=stop, **private)
        answered = dict(fn=state.answered, inputs=None, outputs=stop, **private)
        send.click(**answering).then(handlers.ask, chat_inputs, chat_outputs, api_name="ask",
                                     **answer_work).then(**answered)
        question.submit(**answering).then(handlers.ask, chat_inputs, chat_outputs, api_visibility="private",
                                          **answer_work).then(**answered)
        retry.click(**answering).then(handlers.retry, chat_inputs, chat_outputs, api_name="retry",
                                      **answer_work).then(**answered)
        stop.click(handlers.stop, None, None, api_name="stop", **instant)
        clear.click(handlers.clear, None, [chatbot, chat_status], api_name="clear", **instant)
        chatbot.clear(handlers.clear, None, [chatbot, chat_status], **private)  # the chat's own bin icon
        demo.unload(handlers.end)
    return demo
