"""Text-LLM backends shared by RAIDER (answer generation) and the evaluator (the judge).

One interface, `complete(messages, **gen) -> str` with an async twin `acomplete`, behind a small
registry of spec strings:
  `openai:MODEL@URL`   any OpenAI-compatible server (vLLM, llama.cpp server, TGI, Ollama's /v1)
  `ollama:MODEL`       shorthand for a local Ollama (http://localhost:11434/v1), e.g. the paper's
                       `ollama:llama3.1:70b-instruct`
  `local:embedded`     in-process transformers (`local:ID_OR_PATH` for any causal LM)
Nothing leaves the machine unless the user names a remote endpoint.

Every request has a total deadline and a reply-size cap, enforced here for RAIDER, the judge and
anything else: a server that drips one byte a second, or answers a 48-token request with 200 MB,
ends the request with a `BackendError` instead of holding a worker or the memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Protocol

from .errors import ChatEXAONEPathError

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": …}, …]
OLLAMA_URL = "http://localhost:11434/v1"


class BackendError(ChatEXAONEPathError):
    """A text-LLM backend could not be reached or refused the request.

    `retryable` is true for failures that may pass on a later try (timeouts, overload, 5xx), false
    for those that will not (wrong key, unknown model, bad request).
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Usage:
    """Token counts over a backend's lifetime (thread-safe), for run summaries."""

    def __init__(self) -> None:
        self.prompt_tokens = self.completion_tokens = self.requests = 0
        self._lock = threading.Lock()

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one finished request."""
        with self._lock:
            self.prompt_tokens += int(prompt_tokens or 0)
            self.completion_tokens += int(completion_tokens or 0)
            self.requests += 1

    def as_dict(self) -> dict[str, int]:
        """Counts as a JSON-ready dict."""
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


class TextBackend(Protocol):
    """What RAIDER and the judge need from an LLM."""

    name: str
    usage: Usage
    max_concurrency: int | None  # requests it serves at once; None: as many as the server takes

    def complete(self, messages: Messages, **gen: object) -> str: ...

    async def acomplete(self, messages: Messages, **gen: object) -> str: ...

    async def aclose(self) -> None: ...


Builder = Callable[[str, "BackendOptions"], TextBackend]
_BACKENDS: dict[str, Builder] = {}


def register_backend(kind: str) -> Callable[[Builder], Builder]:
    """Register a builder `fn(rest_of_spec, options) -> TextBackend` for specs `kind:…`."""

    def decorator(fn: Builder) -> Builder:
        _BACKENDS[kind] = fn
        return fn

    return decorator


def available_backends() -> list[str]:
    """The spec prefixes `build_backend` accepts."""
    return sorted(_BACKENDS)


@dataclass
class BackendOptions:
    """How a backend treats a request: seconds per try, the HTTP client's retries (with backoff), the largest reply.

    A request ends, retries included, within `timeout` × (1 + `max_retries`) seconds whatever the server
    does; a reply body larger than `max_reply_bytes` is refused as it arrives.
    """

    timeout: float = 120.0
    max_retries: int = 2
    # A chat completion is tens of kB (a few MB with log-probabilities); 32 MiB leaves room for any honest
    # server, and a 200 MB reply to a 48-token question ends at the cap instead of filling memory.
    max_reply_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout) and self.timeout > 0) or self.max_retries < 0 or self.max_reply_bytes < 1024:
            raise BackendError(f"Backend options need a timeout > 0, retries ≥ 0 and a reply cap ≥ 1 kB; got "
                               f"{self.timeout}, {self.max_retries}, {self.max_reply_bytes}.")

    @property
    def deadline(self) -> float:
        """Seconds one request may take in all, its retries included."""
        return self.timeout * (1 + self.max_retries)


def build_backend(spec: str, options: BackendOptions | None = None) -> TextBackend:
    """Build a backend from a spec such as `openai:qwen2.5-7b@http://127.0.0.1:8000/v1` or `local:embedded`."""
    kind, _, rest = spec.partition(":")
    if kind not in _BACKENDS:
        raise BackendError(f"Unknown LLM backend {spec!r}; use one of {', '.join(k + ':…' for k in available_backends())}.")
    if not rest:
        raise BackendError(f"LLM backend {spec!r} names no model (e.g. {kind}:MODEL).")
    return _BACKENDS[kind](rest, options or BackendOptions())


class OpenAICompatibleBackend:
    """Chat completions from an OpenAI-compatible HTTP server, through the official `openai` client.

    The reply is read as a stream (`with_streaming_response`) so its size is checked as it arrives, and
    the whole request, retries included, runs under `options.deadline`; the blocking `complete` runs the
    same coroutine on an event loop of its own, so both paths end on time (a blocking read cannot be
    interrupted, a coroutine can).
    """

    def __init__(self, model: str, base_url: str, api_key: str | None = None,
                 options: BackendOptions | None = None) -> None:
        self.model, self.base_url = model, base_url.rstrip("/")
        self.name = f"openai:{model}@{self.base_url}"
        self.usage = Usage()
        self.max_concurrency: int | None = None
        self.options = options or BackendOptions()
        # Local servers accept any key; the client insists on one.
        key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed-for-local-servers"
        self._client_options = dict(base_url=self.base_url, api_key=key, timeout=self.options.timeout,
                                    max_retries=self.options.max_retries)
        self._async_clients: dict[int, object] = {}

    def _async_client(self) -> object:
        """An async client for the running event loop: httpx pools cannot outlive the loop they were made in."""
        from openai import AsyncOpenAI

        loop = asyncio.get_running_loop()
        if id(loop) not in self._async_clients:
            self._async_clients = {id(loop): AsyncOpenAI(**self._client_options)}  # drop clients of finished loops
        return self._async_clients[id(loop)]

    def _request(self, messages: Messages, gen: dict) -> dict:
        request = {"model": self.model, "messages": messages}
        for ours, theirs in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("seed", "seed"),
                             ("top_p", "top_p"), ("stop", "stop"), ("response_format", "response_format")):
            if gen.get(ours) is not None:
                request[theirs] = gen[ours]
        return request

    def complete(self, messages: Messages, **gen: object) -> str:
        """One chat completion (blocking), under the same deadline and reply cap as `acomplete`."""

        async def once() -> str:
            try:
                return await self.acomplete(messages, **gen)
            finally:
                await self.aclose()

        return _run_coroutine(once())

    async def acomplete(self, messages: Messages, **gen: object) -> str:
        """One chat completion (async, for concurrent generation)."""
        deadline = self.options.deadline
        try:
            async with asyncio.timeout(deadline):
                body = await self._post(self._request(messages, gen))
        except TimeoutError as e:
            raise BackendError(f"The LLM server at {self.base_url} did not finish its reply within {deadline:g} s "
                               "(--timeout, per try); is it overloaded?", retryable=True) from e
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to one sentence per failure kind
            raise self._explain(e) from e
        return self._text(body)

    async def _post(self, request: dict) -> bytes:
        """The reply's body, read as it arrives and refused past `max_reply_bytes`."""
        cap = self.options.max_reply_bytes
        async with self._async_client().chat.completions.with_streaming_response.create(**request) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise self._too_large(int(declared))
            body = bytearray()
            async for chunk in response.iter_bytes():
                body += chunk
                if len(body) > cap:
                    raise self._too_large(len(body))
        return bytes(body)

    def _too_large(self, size: int) -> BackendError:
        return BackendError(f"The LLM server at {self.base_url} sent a reply of more than {size:,} bytes, past the "
                            f"{self.options.max_reply_bytes:,} accepted; it is not answering as a chat server should.")

    async def aclose(self) -> None:
        """Close the running loop's connections (call before the loop ends, or httpx complains at exit)."""
        client = self._async_clients.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            await client.close()

    def _text(self, body: bytes) -> str:
        """The first choice's text from a chat-completion body; usage counted. Parsing is bounded by the cap."""
        try:
            data = json.loads(body)
            text = data["choices"][0]["message"]["content"] if data.get("choices") else None
            usage = data.get("usage") or {}
        except (ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise BackendError(f"The LLM server at {self.base_url} sent a reply that is not a chat completion "
                               f"({type(e).__name__}).") from e
        if not data.get("choices"):
            raise BackendError(f"The LLM server at {self.base_url} returned no choices.")
        if isinstance(usage, dict):
            self.usage.add(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
        return text if isinstance(text, str) else ""

    def _explain(self, error: Exception) -> BackendError:
        import openai

        if isinstance(error, openai.APITimeoutError):
            return BackendError(f"The LLM server at {self.base_url} did not answer in time; is it overloaded?",
                                retryable=True)
        if isinstance(error, openai.APIConnectionError):
            return BackendError(f"Cannot reach the LLM server at {self.base_url}; is it running (and the URL right)?")
        if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return BackendError(f"The LLM server at {self.base_url} refused the API key; set OPENAI_API_KEY.")
        if isinstance(error, openai.NotFoundError):
            return BackendError(f"The LLM server at {self.base_url} has no model {self.model!r}; check the name "
                                "(for Ollama: `ollama pull MODEL`).")
        if isinstance(error, openai.APIStatusError):
            return BackendError(f"The LLM server at {self.base_url} answered HTTP {error.status_code}: "
                                f"{str(error.message)[:200]}.", retryable=error.status_code in (408, 429) or
                                error.status_code >= 500)
        return BackendError(f"The request to {self.base_url} failed: {str(error)[:200]}.")


def _count(value: Any) -> int:
    return value if isinstance(value, int) and 0 <= value < 1 << 40 else 0


def _run_coroutine(coroutine: Coroutine) -> Any:
    """Run `coroutine` to the end from blocking code, on a loop of its own (in a helper thread if one runs here)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="backend-request", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@register_backend("openai")
def _openai(rest: str, options: BackendOptions) -> OpenAICompatibleBackend:
    model, at, url = rest.rpartition("@")
    if not at or not model or not url.startswith(("http://", "https://")):
        raise BackendError(f"openai backends are written openai:MODEL@URL (e.g. openai:llama3@http://127.0.0.1:8000/v1), "
                           f"got openai:{rest}.")
    return OpenAICompatibleBackend(model, url, options=options)


@register_backend("ollama")
def _ollama(model: str, options: BackendOptions) -> OpenAICompatibleBackend:
    backend = OpenAICompatibleBackend(model, os.environ.get("OLLAMA_URL", OLLAMA_URL), options=options)
    backend.name = f"ollama:{model}"
    return backend


class LocalBackend:
    """In-process generation with transformers (the embedded SmolLM2 by default); greedy unless asked.

    A generation can be stopped mid-way: by its deadline (`timeout` seconds from when it starts) or
    by a stop event, which `acomplete` sets when its caller gives up (a timeout cancels the await,
    and without the event the thread would go on generating under the model lock, so every request
    after a timeout would time out too). Both are checked after every generated token.
    """

    supports_response_format = False  # no grammar-constrained decoding here: the judge asks in free text
    # `vocabulary=TEXT` restricts the reply to the words of TEXT (RAIDER: the excerpts it must answer from).
    supports_vocabulary = True

    def __init__(self, name_or_path: str = "embedded", timeout: float | None = None) -> None:
        from .llm import load_llm

        self.name = f"local:{name_or_path}"
        self.usage = Usage()
        self.max_concurrency = 1  # one model, one generation at a time
        self.timeout = timeout
        self.model, self.tokenizer = load_llm(name_or_path)
        self._lock = threading.Lock()  # one generation at a time: the model is not re-entrant

    def complete(self, messages: Messages, stop: threading.Event | None = None, **gen: object) -> str:
        """Generate a reply with the tokenizer's chat template; BackendError when stopped or past the deadline."""
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"].to(self.model.device)
        temperature = float(gen.get("temperature") or 0.0)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        stop = stop or threading.Event()
        with self._lock, torch.inference_mode():
            if stop.is_set():  # its caller gave up while it waited for the model
                raise BackendError("The request was cancelled before the local model started on it.", retryable=True)
            if gen.get("seed") is not None:  # under the lock: concurrent requests must not reseed each other
                torch.manual_seed(int(gen["seed"]))
            halt = _halting_criterion(stop, None if self.timeout is None else time.monotonic() + self.timeout)
            if gen.get("vocabulary"):
                allowed = self.vocabulary_ids(str(gen["vocabulary"]))
                sampling["prefix_allowed_tokens_fn"] = lambda batch_id, sent: allowed
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=int(gen.get("max_tokens") or 256),
                                      pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=[halt], **sampling)
        self.usage.add(ids.shape[1], out.shape[1] - ids.shape[1])
        if halt.fired == "deadline":
            raise BackendError(f"The local model did not finish within {self.timeout:g} s.", retryable=True)
        if halt.fired == "stop":
            raise BackendError("The local generation was stopped by its caller.", retryable=True)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def vocabulary_ids(self, text: str) -> list[int]:
        """The token ids a reply made only of `text`'s words may use: each word as written, lower-case and
        capitalised, with and without a leading space, plus punctuation and the end-of-turn tokens.

        A 135M model asked to answer from report excerpts mostly writes about the prompt instead ("The
        contents of the excerpts are…"); limited to the excerpts' own tokens it can only reuse the report's
        words, which is what RAIDER's grounding check asks. Sub-word pieces can still combine into new
        words: the check still runs on every answer.
        """
        words = set(re.findall(r"[^\W\d_]+|\d+", text)) | set(".,;:()-/'")
        pieces = {f"{space}{form}" for w in words for form in (w, w.lower(), w.capitalize()) for space in ("", " ")}
        ids = {i for piece in pieces for i in self.tokenizer.encode(piece, add_special_tokens=False)}
        stops = self.model.generation_config.eos_token_id
        ids.update([stops] if isinstance(stops, int) else (stops or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    async def acomplete(self, messages: Messages, **gen: object) -> str:
        """`complete` in a worker thread, stopped at the next token if the caller stops waiting."""
        stop = threading.Event()
        try:
            return await asyncio.to_thread(self.complete, messages, stop, **gen)
        finally:
            stop.set()  # a cancelled await (a timeout) must end the generation too, not only the wait

    async def aclose(self) -> None:
        """Nothing to close: no connections."""


def _halting_criterion(stop: threading.Event, deadline: float | None):
    """A transformers StoppingCriteria that ends generation once `stop` is set or `deadline` (monotonic) passes."""
    import torch
    from transformers import StoppingCriteria

    class Halt(StoppingCriteria):
        fired: str | None = None

        def __call__(self, input_ids: torch.LongTensor, scores: object, **kwargs: object) -> torch.BoolTensor:
            if stop.is_set():
                self.fired = "stop"
            elif deadline is not None and time.monotonic() > deadline:
                self.fired = "deadline"
            return torch.full((input_ids.shape[0],), self.fired is not None, dtype=torch.bool,
                              device=input_ids.device)

    return Halt()


@register_backend("local")
def _local(name_or_path: str, options: BackendOptions) -> LocalBackend:
    return LocalBackend(name_or_path, timeout=options.timeout)
