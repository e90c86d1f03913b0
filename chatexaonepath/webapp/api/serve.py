"""The API without the page: uvicorn serving /v1 over the same engine (`chatexaonepath serve`, tests, benchmarks).

`ApiServer` serves a socket bound beforehand (`bind`), so a busy port is one sentence before the model
loads and a test can ask for any free port (0); `start()` serves from a thread, `run()` from the calling
thread (the command, which stops on Ctrl-C or SIGTERM). The root path says where the API is; nothing else is served.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from ...errors import ChatEXAONEPathError
from ..engine import AppEngine
from .app import build_api
from .keys import ApiKeys

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000


def headless_app(engine: AppEngine, keys: ApiKeys | None = None):
    """A Starlette app with the API at /v1 and a one-line JSON index at /."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    async def index(request):
        return JSONResponse({"service": "ChatEXAONEPath API (OpenAI-compatible)", "base_url": "/v1",
                             "routes": ["/v1/models", "/v1/files", "/v1/chat/completions"]})

    return Starlette(routes=[Route("/", index), Mount("/v1", app=build_api(engine, keys))])


class ApiServer:
    """uvicorn serving `headless_app(engine, keys)` on `host:port` (0: any free port)."""

    def __init__(self, engine: AppEngine, keys: ApiKeys | None = None, *, host: str = "127.0.0.1",
                 port: int = DEFAULT_PORT, sock: socket.socket | None = None, access_log: bool = False) -> None:
        import uvicorn

        self.app = headless_app(engine, keys)
        # `sock`: bound by the command before the model loaded, so a busy port failed fast
        self.socket = sock if sock is not None else bind(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        # proxy_headers: behind a reverse proxy on this machine the client is the one it forwards (X-Forwarded-For
        # from 127.0.0.1 only, unless $FORWARDED_ALLOW_IPS says otherwise), as for the page.
        config = uvicorn.Config(self.app, log_level="info" if access_log else "warning", access_log=access_log,
                                lifespan="off", proxy_headers=True, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until Ctrl-C or SIGTERM (uvicorn's own handling), in this thread."""
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> str:
        """Serve from a background thread; returns the base URL once it accepts requests."""
        self._thread = threading.Thread(target=self.run, name="api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ChatEXAONEPathError(f"The API server on {self.url} did not start.")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        """Stop serving (requests under way get a few seconds) and close the socket."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: any free port); a port in use is one sentence."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ChatEXAONEPathError(f"Could not serve on {host}:{port} ({e.strerror}); pick another port with --port.") \
            from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
