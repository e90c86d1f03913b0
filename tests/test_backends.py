import asyncio
import socket
import time

import pytest

from chatexaonepath.backends import BackendError, available_backends, build_backend
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
        backend = build_backend(f"openai:test-model@http://127.0.0.1:{free_port()}/v1")
        backend._client = backend._client.with_options(max_retries=0)
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
