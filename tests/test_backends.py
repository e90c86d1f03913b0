import asyncio
import socket
import time

import pytest

from chatexaonepath.backends import BackendError, BackendOptions, available_backends, build_backend
from chatexaonepath.loopback import FakeOpenAIServer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What organ?"}]


def test_openai_compatible_server_roundtrip_and_generation_settings():
    with FakeOpenAIServer() as server:
        backend = build_backend(f"openai:test-model@{server.url}")
        assert backend.complete(MESSAGES, max_tokens=12, temperature=0.0, seed=3) == "echo: What organ?"
        sent = server.requests[-1]
        assert sent["model"] == "test-model" and sent["max_tokens"] == 12 and sent["seed"] == 3
        assert sent["messages"] == MESSAGES


def test_async_calls_run_concurrently():
    with FakeOpenAIServer(delay=0.3) as server:
        backend = build_backend(f"openai:test-model@{server.url}")

        async def many():
            return await asyncio.gather(*(backend.acomplete(MESSAGES) for _ in range(6)))

        started = time.perf_counter()
        answers = asyncio.run(many())
        assert answers == ["echo: What organ?"] * 6
        assert time.perf_counter() - started < 6 * 0.3  # overlapped, not one after another


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case,expected", [
    ("unreachable", "Cannot reach"), ("auth", "refused the API key"), ("model", "has no model"),
])
def test_failures_are_one_clear_sentence(case, expected, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    if case == "unreachable":
        backend = build_backend(f"openai:test-model@http://127.0.0.1:{free_port()}/v1", BackendOptions(max_retries=0))
        with pytest.raises(BackendError, match=expected) as info:
            backend.complete(MESSAGES)
    else:
        with FakeOpenAIServer(api_key="right" if case == "auth" else None) as server:
            backend = build_backend(f"openai:{'test-model' if case == 'auth' else 'other'}@{server.url}")
            with pytest.raises(BackendError, match=expected) as info:
                backend.complete(MESSAGES)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec,expected", [
    ("gpt4", "Unknown LLM backend"), ("openai:model-without-url", "openai:MODEL@URL"), ("ollama:", "names no model"),
])
def test_malformed_specs_are_rejected(spec, expected):
    with pytest.raises(BackendError, match=expected):
        build_backend(spec)
    assert {"openai", "ollama", "local"} <= set(available_backends())


def test_ollama_shorthand_points_at_local_ollama(monkeypatch):
    monkeypatch.delenv("OLLAMA_URL", raising=False)
    backend = build_backend("ollama:llama3.1:70b-instruct")
    assert backend.model == "llama3.1:70b-instruct" and backend.base_url == "http://localhost:11434/v1"


def test_local_backend_generates_in_process(tmp_path):
    from tests.chat.conftest import make_tiny_llm

    backend = build_backend(f"local:{make_tiny_llm(tmp_path / 'llm')}")
    first = backend.complete(MESSAGES, max_tokens=4)
    assert isinstance(first, str) and backend.complete(MESSAGES, max_tokens=4) == first  # greedy
    assert asyncio.run(backend.acomplete(MESSAGES, max_tokens=4)) == first


def test_a_local_reply_limited_to_a_vocabulary_uses_only_its_tokens(tmp_path):
    # RAIDER limits the local model to the excerpts' words; a random tiny LLM shows it is a hard limit.
    from tests.chat.conftest import make_tiny_llm

    backend = build_backend(f"local:{make_tiny_llm(tmp_path / 'llm')}")
    assert backend.supports_vocabulary
    allowed = set(backend.vocabulary_ids("Colon: adenocarcinoma, low grade."))
    free = backend.tokenizer.encode(backend.complete(MESSAGES, max_tokens=12), add_special_tokens=False)
    assert not set(free) <= allowed  # unconstrained, it strays
    seen = []
    generate = backend.model.generate
    backend.model.generate = lambda *a, **k: seen.append(out := generate(*a, **k)) or out
    backend.complete(MESSAGES, max_tokens=12, vocabulary="Colon: adenocarcinoma, low grade.")
    prompt_length = backend.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True,
                                                          return_tensors="pt")["input_ids"].shape[1]
    assert seen and set(seen[0][0, prompt_length:].tolist()) <= allowed


def test_openai_backend_counts_tokens_for_run_summaries():
    with FakeOpenAIServer(reply=lambda messages: "three word answer") as server:
        backend = build_backend(f"openai:test-model@{server.url}")
        backend.complete([{"role": "user", "content": "one two"}])
        backend.complete([{"role": "user", "content": "four five six"}])
    assert backend.usage.as_dict() == {"requests": 2, "prompt_tokens": 5, "completion_tokens": 6}


def slow_local_backend(tmp_path, seconds_per_token=0.02):
    """The tiny local LLM with every forward pass slowed down, so a long generation takes seconds."""
    from tests.chat.conftest import make_tiny_llm

    backend = build_backend(f"local:{make_tiny_llm(tmp_path / 'llm')}")
    forward = backend.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds_per_token)
        return forward(*args, **kwargs)

    backend.model.forward = slow_forward
    return backend


def test_a_cancelled_local_generation_stops_and_frees_the_model(tmp_path):
    backend = slow_local_backend(tmp_path)

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(backend.acomplete(MESSAGES, max_tokens=400), 0.3)  # ~8 s of generation
        started = time.perf_counter()
        await backend.acomplete(MESSAGES, max_tokens=2)
        return time.perf_counter() - started

    # Before: the abandoned thread kept generating under the model lock, and the next request waited for it.
    assert asyncio.run(scenario()) < 2.0


def test_the_local_backend_stops_at_its_own_deadline(tmp_path):
    backend = slow_local_backend(tmp_path)
    backend.timeout = 0.3
    started = time.perf_counter()
    with pytest.raises(BackendError, match="did not finish within 0.3 s") as info:
        backend.complete(MESSAGES, max_tokens=400)
    assert time.perf_counter() - started < 2.0 and info.value.retryable


def test_a_local_judge_timeout_does_not_cascade_to_the_next_answer(tmp_path):
    from chatexaonepath.eval.criteria import AcceptanceRule, load_criteria
    from chatexaonepath.eval.judge import Judge, JudgeBackendFailure, JudgeConfig, JudgeItem

    backend = slow_local_backend(tmp_path)
    judge = Judge(backend, load_criteria(), AcceptanceRule("major"),
                  JudgeConfig(timeout=0.5, retries=0, max_repairs=0, max_tokens=400))
    item = JudgeItem("x", "What is the diagnosis?", "Carcinoma.", "Carcinoma of the breast.")

    async def scenario():
        with pytest.raises(JudgeBackendFailure, match="no reply within 0.5 s"):
            await judge.judge(item, item.report)
        judge.config.max_tokens = 2
        started = time.perf_counter()
        record = await judge.judge(item, item.report)  # an unusable 2-token reply: an output error, in time
        return record, time.perf_counter() - started

    record, seconds = asyncio.run(scenario())
    assert record["error_kind"] == "output" and seconds < 2.0


# -- hostile servers: every request has a total deadline and a reply-size cap ------------------------------
class HostileServer:
    """An HTTP server on 127.0.0.1 that answers every POST with `respond(handler)` (headers and body its own)."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: what we want
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def drip(handler, seconds=30):
    """Valid headers, then one byte a second: each read is quick, the whole never ends."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    for _ in range(seconds):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(1.0)


def huge(handler, size=200 << 20):
    """A chunked reply of `size` bytes to a 48-token request."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    block = b" " * (1 << 20)
    for _ in range(size // len(block)):
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
    handler.wfile.write(b"0\r\n\r\n")


def nested(handler, depth=100_000):
    data = b"[" * depth + b"]" * depth
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.mark.parametrize("blocking", [True, False])
def test_a_dripping_server_ends_at_the_deadline(blocking):
    server = HostileServer(drip)
    backend = build_backend(f"openai:test-model@{server.url}", BackendOptions(timeout=2.0, max_retries=0))
    started = time.perf_counter()
    try:
        with pytest.raises(BackendError, match="did not finish its reply within 2 s") as info:
            backend.complete(MESSAGES) if blocking else asyncio.run(backend.acomplete(MESSAGES))
    finally:
        server.close()
    assert 1.5 < time.perf_counter() - started < 3.0 and info.value.retryable


def test_a_huge_reply_is_refused_as_it_arrives():
    server = HostileServer(huge)
    backend = build_backend(f"openai:test-model@{server.url}", BackendOptions(timeout=30, max_retries=0))
    started = time.perf_counter()
    try:
        with pytest.raises(BackendError, match="sent a reply of more than .* past the 33,554,432 accepted"):
            backend.complete(MESSAGES, max_tokens=48)
    finally:
        server.close()
    assert time.perf_counter() - started < 5.0


def test_a_reply_of_deeply_nested_json_is_one_sentence():
    server = HostileServer(lambda handler: nested(handler, 200_000))
    backend = build_backend(f"openai:test-model@{server.url}", BackendOptions(timeout=30, max_retries=0))
    try:
        with pytest.raises(BackendError, match="not a chat completion"):
            backend.complete(MESSAGES)
    finally:
        server.close()
