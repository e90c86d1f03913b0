"""The /v1 routes: an OpenAI-compatible API over the app's own engine, as a Starlette app mounted at /v1.

The page's server mounts it (cli.launch_app), so `make demo` serves /v1 beside the page with the same
engine, model slot, sessions and limits; `chatexaonepath serve` runs it alone under uvicorn (serve.py).
Every request is checked in this order, each refusal one sentence in OpenAI's error shape: the key
(401; without a key file, a client not on this machine: 403), the body's size and form, the request's
fields against the server's limits (a case's slide count included), the key's files (404 for any id
that is not its own), the case's patch budget, then the key's budgets (429) — all before any work
starts. Work that may wait (a new session, ending one, an answer) runs in threads, so the event loop
only hands bytes on.
"""

from __future__ import annotations

import json
import logging
import time

from ..cli import is_loopback
from ..engine import AppEngine
from .completions import AnswerRun, completion_body, new_completion_id, stream_events
from .errors import ApiError, bad_request, from_exception, not_found
from .files import FileRegistry
from .keys import LOCAL, ApiKeys, ApiOwner, KeyBudgets
from .models import model_object, served_model_id
from .requests import parse_chat_request
from .upload import receive_upload, upload_boundary

logger = logging.getLogger(__name__)

JSON_BODY_SLACK = 1 << 20  # a chat request's JSON: escapes and structure around its characters


class Api:
    """The API's state: the engine, the keys (None: loopback only), the files and the per-key budgets."""

    def __init__(self, engine: AppEngine, keys: ApiKeys | None) -> None:
        import anyio

        self.engine, self.keys = engine, keys
        self.files = FileRegistry(engine)
        self.budgets = KeyBudgets(engine.config)
        self.model_id = served_model_id(engine)
        self.created = int(time.time())
        # Threads of our own: waits here must not take the page's (Gradio's) worker threads.
        self.threads = anyio.CapacityLimiter(engine.config.api_max_requests_in_flight)

    async def _in_thread(self, fn, *args):
        import anyio

        return await anyio.to_thread.run_sync(fn, *args, limiter=self.threads)

    # -- who is asking -----------------------------------------------------------------------------------
    def owner(self, request) -> ApiOwner:
        """The key's owner; without a key file every client on this machine is `local` and others are refused."""
        if self.keys is None:
            host = request.client.host if request.client is not None else None
            if host is None or not is_loopback(host):
                raise ApiError(403, "This server's API answers this machine only; its operator can open it to the "
                                    "network with --api-key-file.", "loopback_only", kind="permission_error")
            return LOCAL
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "This server needs an API key, sent as the header 'Authorization: Bearer KEY'.",
                           "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        owner = self.keys.owner(key.strip())
        if owner is None:
            raise ApiError(401, "The API key is not valid on this server.", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return owner

    # -- models ------------------------------------------------------------------------------------------
    async def models(self, request):
        self.owner(request)
        return {"object": "list", "data": [model_object(self.engine, self.created)]}

    async def model(self, request):
        self.owner(request)
        self._check_model(request.path_params["model_id"])
        return model_object(self.engine, self.created)

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise not_found(f"The model {name[:64]!r} is not served here; this server serves {self.model_id!r} "
                            "(GET /v1/models).", "model_not_found", "model")

    # -- files -------------------------------------------------------------------------------------------
    async def upload(self, request):
        from starlette.requests import ClientDisconnect

        owner = self.owner(request)
        boundary = upload_boundary(request.headers, self.engine.config)  # length and form, before a byte is read
        self.budgets.enter(owner)
        try:
            record, session = await self._in_thread(self.files.open, owner)  # files per key, sessions on the server
            try:
                upload = await receive_upload(request, boundary, self.files.staging / record.id, self.engine.config)
            except BaseException as e:
                await self._in_thread(self.files.abandon, record)  # nothing of a refused upload is kept
                if isinstance(e, ClientDisconnect):
                    raise bad_request("The upload ended before its last byte; send it again.",
                                      "incomplete_upload") from e
                raise
            self.files.received(record, upload, session)
            return record.as_openai()
        finally:
            self.budgets.leave(owner)

    async def list_files(self, request):
        owner = self.owner(request)
        return {"object": "list", "data": [f.as_openai() for f in self.files.list(owner)], "has_more": False}

    async def get_file(self, request):
        return self.files.get(self.owner(request), request.path_params["file_id"]).as_openai()

    async def delete_file(self, request):
        owner = self.owner(request)
        record = await self._in_thread(self.files.delete, owner, request.path_params["file_id"])
        return {"id": record.id, "object": "file", "deleted": True}

    # -- chat --------------------------------------------------------------------------------------------
    async def chat(self, request):
        from starlette.responses import StreamingResponse

        owner = self.owner(request)
        config = self.engine.config
        body = await read_json(request, JSON_BODY_SLACK + 8 * config.api_max_conversation_chars)
        parsed = parse_chat_request(body, config, self.engine.default_settings.system_prompt)
        self._check_model(parsed.model)
        members = self.files.ready_case(owner, parsed.file_ids)  # each the key's own and ready, then the case's budget
        self.budgets.enter(owner)
        try:
            self.budgets.check_tokens(owner, parsed.settings.max_new_tokens)
            run = AnswerRun(members, parsed, owner, self.budgets)
        except BaseException:
            self.budgets.leave(owner)
            raise
        run.start()  # from here on, the answer's thread ends the request's count
        event = await run.next_event(request.is_disconnected)
        if event[0] == "error":
            raise event[1]
        completion_id = new_completion_id()
        if parsed.stream:
            if event[0] == "gone":
                return _json({}, 204)
            return StreamingResponse(stream_events(run, event, completion_id, self.model_id),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while event[0] == "text":
            event = await run.next_event(request.is_disconnected)
        if event[0] == "error":
            raise event[1]
        if event[0] == "gone":
            return _json({}, 204)
        return completion_body(run, completion_id, self.model_id)


async def read_json(request, limit: int) -> object:
    """The request's JSON body, refused past `limit` bytes before and while it is read."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"The request body is over {limit:,} bytes, more than this server reads.", "too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"The request body is over {limit:,} bytes, more than this server reads.", "too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise bad_request("The request body is not valid JSON.", "invalid_json") from e


def _json(body: object, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    if status == 204:
        return Response(status_code=204)
    return Response(json.dumps(body, ensure_ascii=False), status, headers, media_type="application/json")


def _endpoint(handler):
    """Run a handler; its dict becomes JSON, every error OpenAI's error shape (never a traceback)."""
    async def run(request):
        try:
            result = await handler(request)
        except Exception as e:  # an ApiError as it is; anything else in the page's words, logged
            error = from_exception(e, "serving an API request")
            return _json(error.body(), error.status, error.headers)
        return _json(result) if isinstance(result, dict) else result

    return run


def build_api(engine: AppEngine, keys: ApiKeys | None = None):
    """The /v1 app for `engine` (mount it at /v1); `keys` None: answers clients on this machine only."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    api = Api(engine, keys)

    async def http_error(request, error: HTTPException):  # unknown routes and methods, in OpenAI's shape
        message = ("There is no such API route; this server serves /v1/models, /v1/files and /v1/chat/completions."
                   if error.status_code == 404 else f"This route does not take {request.method} requests.")
        return _json(ApiError(error.status_code, message, "unknown_route").body(), error.status_code)

    routes = [Route("/models", _endpoint(api.models), methods=["GET"]),
              Route("/models/{model_id:path}", _endpoint(api.model), methods=["GET"]),
              Route("/files", _endpoint(api.upload), methods=["POST"]),
              Route("/files", _endpoint(api.list_files), methods=["GET"]),
              Route("/files/{file_id}", _endpoint(api.get_file), methods=["GET"]),
              Route("/files/{file_id}", _endpoint(api.delete_file), methods=["DELETE"]),
              Route("/chat/completions", _endpoint(api.chat), methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.api = api  # tests and the benchmark reach the registry through it
    return app
