"""The Gradio page: `build_demo(engine)` lays out the slide panel and the chat, and wires the events.

The page's load event starts its session; every handler (handlers.py) finds it through
`gr.Request.session_hash` and the login, so nothing lives in module globals and two tabs never share
a slide or a conversation. Loads and answers wait in two Gradio queues, each as wide as the engine's
model slots, and the engine's gate (gate.py) decides who runs on the model, answers first; an upload
is taken into the session's folder the moment it arrives, outside the queue; Cancel, Stop and the
heatmap controls bypass the queue so they act at once.
"""

from __future__ import annotations

import html
import logging

import gradio as gr

from ..chat.session import repetition_defaults
from ..vision_tower.slide import MPP_RANGE
from .engine import AppEngine
from .handlers import PageHandlers, box, progress_html  # noqa: F401 - progress_html: the page's API, tested
from .uploads import ACCEPTED_SUFFIXES
from .viewer import ViewerHandlers, viewer_component

logger = logging.getLogger(__name__)

# Loads and answers queue apart, each up to `concurrency` at once: the engine's gate (gate.py) decides who
# uses the model, answers first. One queue for both made a question wait in Gradio's queue for a whole load.
LOAD_GROUP, ANSWER_GROUP = "loads", "answers"


def example_questions() -> list[str]:
    """One question per category of the RAIDER question bank (diagnosis, organ, type, grade, margins…)."""
    from ..raider.generate import load_questions

    first: dict[str, str] = {}
    for question in load_questions():
        first.setdefault(question.category, question.text)
    return list(first.values())


def banner_html(engine: AppEngine) -> str:
    """The honesty banner (empty for a fully trained model)."""
    text = engine.card.banner()
    if text is None:
        return ""
    tail = "" if "not a medical device" in text.lower() else " Not a medical device."  # said once, not twice
    return box(f"<b>⚠ {html.escape(text)}</b>{tail}", "#b91c1c", "#fee2e2")


def model_card_markdown(engine: AppEngine) -> str:
    rows = "\n".join(f"| {name} | {value.replace('|', '/')} |" for name, value in engine.card.rows())
    return f"| part | in use |\n|---|---|\n{rows}"


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

        # `/load_upload` for API clients (file in, slide loaded); the page itself claims then loads.
        api_file = gr.File(visible=False, file_types=list(ACCEPTED_SUFFIXES))
        api_load = gr.Button(visible=False)

        handlers = PageHandlers(engine)
        viewing = ViewerHandlers(engine)
        model_work = dict(concurrency_id=LOAD_GROUP, concurrency_limit=engine.config.concurrency,
                          show_progress="hidden")
        answer_work = dict(model_work, concurrency_id=ANSWER_GROUP)
        instant = dict(queue=False, show_progress="hidden")
        demo.load(handlers.start, None, status, api_name="start_session", **instant)  # the only way a session starts
        # The file box is emptied after each load (the status names the slide), ready for the next one.
        load_outputs = [status, slide_view, gallery, mpp_row, chatbot, chat_status, upload]
        show = dict(fn=viewing.show, inputs=None, outputs=[viewer, region], api_visibility="private", **model_work)
        upload.upload(handlers.claim, upload, status, api_visibility="private", **instant).then(
            handlers.load_claimed, [show_heatmap, opacity], load_outputs, api_visibility="private",
            **model_work).then(**show)
        api_load.click(handlers.load_upload, [api_file, show_heatmap, opacity], load_outputs, api_name="load_upload",
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
        send.click(handlers.ask, chat_inputs, chat_outputs, api_name="ask", **answer_work)
        question.submit(handlers.ask, chat_inputs, chat_outputs, api_visibility="private", **answer_work)
        retry.click(handlers.retry, chat_inputs, chat_outputs, api_name="retry", **answer_work)
        stop.click(handlers.stop, None, None, api_name="stop", **instant)
        clear.click(handlers.clear, None, [chatbot, chat_status], api_name="clear", **instant)
        chatbot.clear(handlers.clear, None, [chatbot, chat_status], api_visibility="private", **instant)  # the chat's own bin icon
        demo.unload(handlers.end)
    return demo
