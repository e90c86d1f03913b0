"""`chatexaonepath app` (and `python app.py`): load the model once, then serve the page and its /v1 API;
`chatexaonepath serve`: the same engine and API without the page.

Safe by default: binds 127.0.0.1; another address without --auth is served only with a loud
warning (or an explicit --no-auth); a public share link needs --auth; Gradio analytics off; files
the app writes are private to its user (umask 077), uploads in a private temp folder (Gradio's
upload cache included) deleted when a tab closes, when its session expires and when the app stops.
The API (docs/api.md) needs a key from --api-key-file; without one it answers this machine only.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import ChatEXAONEPathError
from ..progress import console, setup_logging
from .config import AppConfig

if TYPE_CHECKING:  # torch, transformers and gradio load only when the app starts, not with every CLI command
    import gradio as gr

    from .api.keys import ApiKeys
    from .engine import AppEngine

logger = logging.getLogger(__name__)

AUTH_ENV = "CHATEXAONEPATH_AUTH"


def parse_auth(values: list[str] | None) -> list[tuple[str, str]] | None:
    """`USER:PASSWORD` strings → Gradio's list of (user, password); None when no login is asked for."""
    if not values:
        return None
    pairs = []
    for value in values:
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            raise ChatEXAONEPathError(f"--auth (or ${AUTH_ENV}) must look like USER:PASSWORD; "
                                      f"got a value {'without a colon' if not sep else 'with an empty part'}.")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    """True when `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may well face the network
        return False


def network_warning(host: str, share: bool, auth: list[tuple[str, str]] | None, no_auth: bool = False) -> str | None:
    """Refuse a public link without a login; return the warning for a network address without one (else None)."""
    if share and not auth:
        raise ChatEXAONEPathError("--share puts the app on the internet for anyone with the link; it needs a "
                                  "login: add --auth USER:PASSWORD (or set $" + AUTH_ENV + ").")
    if auth and no_auth:
        raise ChatEXAONEPathError("--no-auth and --auth contradict each other; pass one of them.")
    if is_loopback(host) or auth or no_auth:
        return None
    return (f"Serving on {host} WITHOUT a login: anyone who can reach this machine can upload slides and use the "
            "model. Add --auth USER:PASSWORD, or pass --no-auth to say this is intended.")


def launch_app(engine: AppEngine, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
               auth: list[tuple[str, str]] | None = None, quiet: bool = False,
               no_auth: bool = False, api: bool = True, api_keys: ApiKeys | None = None) -> tuple["gr.Blocks", str]:
    """Build the page for `engine` and start serving it without blocking; returns (demo, local URL).

    Refuses `share` without `auth`; logs a warning for a non-loopback `host` without `auth` unless
    `no_auth` acknowledges it. With `api` the same server serves /v1 (docs/api.md) over the same engine,
    to holders of `api_keys`, or without keys to clients on this machine only.
    """
    warning = network_warning(host, share, auth, no_auth)
    if warning:
        logger.warning(warning)
    if api and api_keys is None and (share or not is_loopback(host)):
        logger.warning("The /v1 API answers this machine only: give --api-key-file to serve it to the network.")
    # Gradio keeps uploads in GRADIO_TEMP_DIR: put them inside the app's private folder (mode 0700),
    # which is deleted at shutdown. Gradio reads the variable when the page is built, so set it first.
    os.environ["GRADIO_TEMP_DIR"] = str(engine.work_dir / "gradio")
    from starlette.middleware import Middleware
    from starlette.routing import Mount

    from .api import build_api
    from .sign_in import SignInThrottle
    from .ui import build_demo
    from .upload_gate import UploadGate
    from .viewer import viewer_routes

    demo = build_demo(engine)
    routes = viewer_routes(engine.tiles)
    if api:  # the same engine, model slot, sessions and limits as the page
        routes.append(Mount("/v1", app=build_api(engine, api_keys)))
    demo.queue(max_size=64, default_concurrency_limit=engine.config.concurrency)
    try:
        demo.launch(server_name=host, server_port=port, share=share, auth=auth, prevent_thread_lock=True,
                    quiet=quiet, show_error=False, max_file_size=engine.config.max_upload_bytes, ssr_mode=False,
                    mcp_server=False, pwa=False, enable_monitoring=False, footer_links=["api", "settings"],
                    # Run history would keep questions and answers in the browser (and offers cloud storage).
                    run_history=False, auth_message="ChatEXAONEPath — sign in",
                    # The slide viewer's routes (its script, tiles, overlay) and the API, ahead of Gradio's own; the
                    # gate on uploads and the brake on sign-ins, in front of Gradio's routes.
                    app_kwargs={"routes": routes,
                                "middleware": [Middleware(UploadGate, engine=engine), Middleware(SignInThrottle)]})
    except OSError as e:  # Gradio's message names its environment variables; ours names the option
        busy = f"port {port} is in use or not allowed" if port else "no port in 7860–7959 is free"
        raise ChatEXAONEPathError(f"Could not serve on {host}: {busy}; pick another with --port.") from e
    return demo, demo.local_url


def app_command(
    model: Annotated[Optional[Path], typer.Option("--model", help="A trained ChatEXAONEPath checkpoint folder (default: the demo model, trained on synthetic slides on the first run and cached).")] = None,
    untrained: Annotated[bool, typer.Option("--untrained", help="Without --model: serve an untrained tower around --llm instead of the demo model.")] = False,
    demo_seed: Annotated[int, typer.Option("--demo-seed", min=0, help="Without --model: the demo build's first seed. A build whose check failed at every seed it tried is served with a red banner; another first seed builds another one (README).")] = 0,
    llm: Annotated[str, typer.Option(help="LLM when no --model is given: a HF id, a path, or 'embedded' (SmolLM2-135M).")] = "embedded",
    encoder: Annotated[Optional[str], typer.Option(help="Patch encoder (default: the one the --model was trained on; without one exaonepath if its weights are found, else random-vit-b16).")] = None,
    encoder_weights: Annotated[Optional[str], typer.Option(help="EXAONEPath weights file, folder or hub id.")] = None,
    stain_norm: Annotated[Optional[str], typer.Option(help="none or macenko (default: what the --model was trained on).")] = None,
    stain_target: Annotated[Optional[Path], typer.Option(help="Macenko target image (default: the one the --model's features were fitted to).")] = None,
    allow_feature_mismatch: Annotated[bool, typer.Option("--allow-feature-mismatch", help="Serve features made differently from the model's training features; the banner says so.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N for the patch encoder.")] = "auto",
    host: Annotated[str, typer.Option(envvar="GRADIO_SERVER_NAME", help="Address to bind; 0.0.0.0 serves your whole network.")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option(envvar="GRADIO_SERVER_PORT", help="Port (default: the first free one from 7860).")] = None,
    share: Annotated[bool, typer.Option("--share", help="Also open a public *.gradio.live link (needs internet; use with --auth).")] = False,
    auth: Annotated[Optional[list[str]], typer.Option(envvar=AUTH_ENV, help=f"Require a login USER:PASSWORD (repeat for more users; or set ${AUTH_ENV}).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve a non-local --host without a login, on purpose (silences the warning).")] = False,
    max_upload_gb: Annotated[float, typer.Option(help="Largest slide upload accepted, in GB.")] = AppConfig.max_upload_gb,
    max_pixels: Annotated[int, typer.Option(help="Most pixels decoded at once: a whole PNG/JPEG, or one strip or tile of a TIFF.")] = AppConfig.max_pixels,
    max_patches_per_slide: Annotated[int, typer.Option(help="Most tissue patches per slide (bounds how long one load holds the model).")] = AppConfig.max_patches_per_slide,
    max_level_pixels: Annotated[int, typer.Option(help="Largest smallest-level of a slide, read whole (in strips) for the tissue map.")] = AppConfig.max_level_pixels,
    max_zip_members: Annotated[int, typer.Option(help="Most files in an uploaded zip.")] = AppConfig.max_zip_members,
    max_zip_depth: Annotated[int, typer.Option(help="Most folder levels inside an uploaded zip.")] = AppConfig.max_zip_depth,
    max_session_gb: Annotated[float, typer.Option(help="Disk one session's uploads may take, every slide of its case together, in GB.")] = AppConfig.max_session_gb,
    max_case_slides: Annotated[int, typer.Option(help="Most slides in one conversation (a case), 1 to 8.")] = AppConfig.max_case_slides,
    max_case_patches: Annotated[int, typer.Option(help="Most tissue patches of all a case's slides together.")] = AppConfig.max_case_patches,
    max_sessions: Annotated[int, typer.Option(help="Live sessions at once; beyond it visitors are told to try later.")] = AppConfig.max_sessions,
    max_sessions_per_client: Annotated[int, typer.Option(help="Live sessions of one client address, and of one --auth login.")] = AppConfig.max_sessions_per_client,
    session_idle_minutes: Annotated[float, typer.Option(help="End a session (and delete its uploads) after this long without a request.")] = AppConfig.session_idle_minutes,
    max_requests_per_minute: Annotated[int, typer.Option(help="Loads and questions one session may start per minute.")] = AppConfig.max_requests_per_minute,
    max_question_chars: Annotated[int, typer.Option(help="Longest question accepted, in characters.")] = AppConfig.max_question_chars,
    max_system_prompt_chars: Annotated[int, typer.Option(help="Longest system prompt accepted, in characters.")] = AppConfig.max_system_prompt_chars,
    max_new_tokens_limit: Annotated[int, typer.Option(help="Most new tokens a request may ask for.")] = AppConfig.max_new_tokens_limit,
    api: Annotated[bool, typer.Option("--api/--no-api", help="Also serve the OpenAI-compatible API at /v1 (docs/api.md).")] = True,
    api_key_file: Annotated[Optional[Path], typer.Option(help="API keys, one per line, optionally followed by a space and a name; without it the API answers this machine only.")] = None,
    api_max_files_per_key: Annotated[int, typer.Option(help="Slides one API key may hold at once (each counts in --max-sessions).")] = AppConfig.api_max_files_per_key,
    api_max_requests_per_key: Annotated[int, typer.Option(help="Uploads and answers of one API key under way at once.")] = AppConfig.api_max_requests_per_key,
    api_max_tokens_per_minute: Annotated[int, typer.Option(help="Prompt and answer tokens one API key may use per minute.")] = AppConfig.api_max_tokens_per_minute,
    api_max_requests_in_flight: Annotated[int, typer.Option(help="API requests under way at once, all keys together.")] = AppConfig.api_max_requests_in_flight,
    api_max_messages: Annotated[int, typer.Option(help="Messages in one API chat request.")] = AppConfig.api_max_messages,
    api_max_conversation_chars: Annotated[int, typer.Option(help="Characters of one API chat request's messages together.")] = AppConfig.api_max_conversation_chars,
    concurrency: Annotated[int, typer.Option(help="Requests the model serves at once; others wait in the queue.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Default longest answer in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="Default temperature (0: greedy, reproducible).")] = 0.0,
    example: Annotated[bool, typer.Option("--example/--no-example", help="Offer the synthetic example slide, prepared in the background.")] = True,
    features_dir: Annotated[Optional[Path], typer.Option(help="Feature cache (default: the user cache, shared with `chatexaonepath chat`).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    """Serve the chat app: upload a whole-slide image, see its attention heatmap, and chat about it."""
    setup_logging(verbose)
    started = time.perf_counter()
    config = engine_config(locals())  # every option named like an AppConfig field
    logins = parse_auth(auth)
    warning = network_warning(host, share, logins, no_auth)  # before the slow part: --share without --auth fails now
    keys = load_api_keys(api_key_file) if api else None  # a bad key file fails now too
    os.umask(0o077)  # everything the app writes (cache, thumbnails, uploads) is this user's alone
    if warning:
        console.print(f"[bold red]Warning:[/] {warning}", highlight=False)
    engine = load_engine(config)
    try:
        if example:
            engine.example_slide()
        demo, url = launch_app(engine, host=host, port=port, share=share, auth=logins, quiet=True,
                               no_auth=True if warning else no_auth,  # the warning was printed above
                               api=api, api_keys=keys)
        if example:
            engine.start_warm_up()
        banner = engine.card.banner()
        if banner:
            console.print(f"[bold yellow]{banner}[/]", highlight=False)
        login = f" (login required: {len(logins)} user(s))" if logins else ""
        typer.echo(f"ChatEXAONEPath app ready in {time.perf_counter() - started:.0f} s: {url}{login}")
        if api:
            typer.echo(f"OpenAI-compatible API: {url.rstrip('/')}/v1 ({api_access(keys)}; docs/api.md)")
        if demo.share_url:
            typer.echo(f"Public link: {demo.share_url}")
        typer.echo("Press Ctrl-C to stop.")
        _stop_on_sigterm()
        try:
            while demo.is_running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            typer.echo("Stopping the app.")
        finally:
            demo.close()
    finally:
        engine.close()


def engine_config(options: dict) -> AppConfig:
    """The engine's settings from a command's options: each option named like an `AppConfig` field."""
    names = {field.name for field in dataclasses.fields(AppConfig)}
    values = {name: str(value) if isinstance(value, Path) else value
              for name, value in options.items() if name in names}
    return AppConfig(**values)


def load_engine(config: AppConfig) -> "AppEngine":
    """Load the model and patch encoder (the demo model built first when needed), with a progress bar."""
    from ..synthetic.demo_model import build_progress
    from .engine import AppEngine

    console.print("Loading the model and the patch encoder …")
    with build_progress() as on_demo_progress:
        return AppEngine.load(config, on_demo_progress=on_demo_progress)


def load_api_keys(path: Path | None) -> "ApiKeys | None":
    """The keys of `--api-key-file`, or None (the API then answers this machine only)."""
    from .api.keys import ApiKeys

    return ApiKeys.load(path) if path is not None else None


def api_access(keys: "ApiKeys | None") -> str:
    """Who may use the API, for the start-up line."""
    return f"{len(keys)} API key(s)" if keys is not None else "no --api-key-file: this machine only"


# `serve` takes the app's options except the page's own, with its own --host and --port: its signature is
# made from app_command's, so an option added to the app (a new limit) reaches the API server too.
PAGE_ONLY = ("share", "auth", "no_auth", "example", "api")
SERVE_OPTIONS = {
    "host": Annotated[str, typer.Option(help="Address to bind; any other than this machine needs --api-key-file.")],
    "port": Annotated[int, typer.Option(help="Port to serve the API on.")],
}


def serve_command(**options) -> None:
    """Serve the OpenAI-compatible API (/v1) without the page: the same engine, limits and keys (docs/api.md)."""
    from .api.keys import check_loopback_only
    from .api.serve import ApiServer, bind

    setup_logging(options["verbose"])
    started = time.perf_counter()
    config = engine_config(options)
    keys = load_api_keys(options["api_key_file"])
    check_loopback_only(options["host"], keys)  # before the slow part, like a busy port
    sock = bind(options["host"], options["port"])
    os.umask(0o077)
    engine = load_engine(config)
    try:
        server = ApiServer(engine, keys, sock=sock, access_log=options["verbose"])
        banner = engine.card.banner()
        if banner:
            console.print(f"[bold yellow]{banner}[/]", highlight=False)
        typer.echo(f"ChatEXAONEPath API ready in {time.perf_counter() - started:.0f} s: {server.url}/v1 "
                   f"({api_access(keys)}). Press Ctrl-C to stop.")
        _stop_on_sigterm()  # uvicorn raises the signal again once it has stopped: end as after Ctrl-C, cleaned up
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        typer.echo("Stopping the API.")
    finally:
        sock.close()
        engine.close()


def _serve_signature() -> inspect.Signature:
    params = []
    for param in inspect.signature(app_command, eval_str=True).parameters.values():
        if param.name in PAGE_ONLY:
            continue
        if param.name in SERVE_OPTIONS:
            default = "127.0.0.1" if param.name == "host" else 8000
            param = param.replace(annotation=SERVE_OPTIONS[param.name], default=default)
        params.append(param)
    return inspect.Signature(params, return_annotation=None)


serve_command.__signature__ = _serve_signature()


def _stop_on_sigterm() -> None:
    """Treat SIGTERM (`kill`, `docker stop`) like Ctrl-C, so the private upload folder is deleted."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> None:
    """Run `app_command` as a program (for `python app.py`): user errors print one sentence, exit 2."""
    runner = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    runner.command()(app_command)
    try:
        runner(argv if argv is not None else sys.argv[1:], prog_name="app.py")
    except ChatEXAONEPathError as e:
        console.print(f"[bold red]Error:[/] {e}", highlight=False)
        sys.exit(2)
