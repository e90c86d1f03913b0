"""An OpenAI-compatible chat server on 127.0.0.1, for tests and benchmarks of the text-LLM backends.

Hand-written on `http.server` because what it must do is tiny and exact: answer after a fixed
delay, record the prompts it received, and fail the way real servers fail (401, 404, 500), with
nothing to install and nothing leaving the machine. Not for production serving: use vLLM or Ollama.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Reply = Callable[[list[dict]], str]


class FakeOpenAIServer:
    """Answers POST /v1/chat/completions with `reply(messages)` after `delay` seconds.

    A wrong key gets 401, an unknown model 404, and a `reply` that raises gets 500. A
    `response_format` (structured output, as vLLM, Ollama and OpenAI take it) is accepted and left to
    `reply` to honour, or, with `structured_output=False`, refused with 400 as servers without it do.
    Every request body is kept in `requests` (in arrival order) so tests can check what a client sent.
    """

    def __init__(self, models: tuple[str, ...] = ("test-model",), api_key: str | None = None,
                 delay: float = 0.0, reply: Reply | None = None, structured_output: bool = True) -> None:
        self.models, self.api_key, self.delay = set(models), api_key, delay
        self.structured_output = structured_output
        self.reply: Reply = reply or (lambda messages: "echo: " + messages[-1]["content"])
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers: the client pools connections
            disable_nagle_algorithm = True  # else each small reply waits ~40 ms for a delayed ACK

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.rstrip("/").endswith("/models"):
                    return self._send(200, {"object": "list", "data": [{"id": m, "object": "model"}
                                                                       for m in sorted(server.models)]})
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(body)
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "invalid api key", "type": "auth"}})
                if body.get("model") not in server.models:
                    return self._send(404, {"error": {"message": f"model {body.get('model')} not found"}})
                if body.get("response_format") is not None and not server.structured_output:
                    return self._send(400, {"error": {"message": "response_format is not supported by this server",
                                                      "type": "invalid_request_error"}})
                time.sleep(server.delay)
                try:
                    text = server.reply(body["messages"])
                except Exception as e:  # noqa: BLE001 - a failing reply is a server error, as in real servers
                    return self._send(500, {"error": {"message": f"reply failed: {e}"}})
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
                completion_tokens = len(text.split())
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens}})

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default backlog of 5 stalls 8+ clients connecting at once

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients that hang up (a killed run) are expected here, not worth a traceback

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def prompts(self) -> list[list[dict]]:
        """The `messages` of every chat request received so far."""
        with self._lock:
            return [r.get("messages", []) for r in self.requests]

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
