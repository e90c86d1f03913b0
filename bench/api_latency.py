"""Benchmark: does the /v1 API slow answers down, and does it answer 16 clients at once?

The app is served in-process as `make demo` serves it (the page's server, the API mounted at /v1,
keys from a key file) on the untrained default (embedded SmolLM2, EXAONEPath or a random ViT-B/16;
`--demo` for the demo model, built first if the cache has none):
  (1) upload → processed: the synthetic example slide uploaded through POST /v1/files (cold feature
      cache: extracted), polled until `processed`;
  (2) time to first token on that (now cached) slide, through the API (a streamed chat completion over
      a kept-alive connection, from a client process of its own as a harness would be: request sent →
      first non-blank content chunk received) and in a `ChatSession` as `chatexaonepath chat` uses it
      (ask → first non-blank piece), alternating, a fresh conversation each time, greedy, the same
      question; medians of `--repeats`;
  (3) 16 concurrent API clients on loopback (4 keys × 4 clients, each key its own copy of the slide),
      one streamed question each, every request bounded by `--timeout`: how many were answered whole.
The server's per-session rate (--max-requests-per-minute) is raised for the run: this is one client
asking many questions. Final line: `api_ttft_ratio: API/CLI` (target ≤ 1.1).

    python bench/api_latency.py [--repeats 9] [--new-tokens 32] [--clients 16] [--headless] [--demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

if __name__ == "__main__" and sys.argv[1:2] != ["--client"]:  # the client process imports httpx only
    try:
        import chatexaonepath  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from chatexaonepath.chat.session import ChatSession
    from chatexaonepath.progress import setup_logging
    from chatexaonepath.webapp.api import ApiKeys, ApiServer
    from chatexaonepath.webapp.cli import launch_app
    from chatexaonepath.webapp.engine import AppConfig, AppEngine

QUESTION = "What is the most likely diagnosis, and which features support it?"
KEYS = [f"bench-key-{n}-" + "x" * 24 for n in range(4)]


def upload(http: httpx.Client, slide: Path) -> tuple[str, float]:
    """Upload a slide and wait until it is processed: (file id, seconds)."""
    started = time.perf_counter()
    with open(slide, "rb") as f:
        response = http.post("/files", files={"file": (slide.name, f)}, data={"purpose": "user_data"})
    response.raise_for_status()
    file_id = response.json()["id"]
    while (body := http.get(f"/files/{file_id}").json())["status"] == "uploaded":
        time.sleep(0.1)
    if body["status"] != "processed":
        raise SystemExit(f"upload failed: {body['status_details']}")
    return file_id, time.perf_counter() - started


def api_ask(http: httpx.Client, model: str, file_id: str, question: str, max_tokens: int) -> tuple[float, str]:
    """(seconds from sending to the first non-blank content chunk, the whole answer) of one streamed completion."""
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": file_id}}, {"type": "text", "text": question}]}]}
    first, pieces = None, []
    started = time.perf_counter()
    with http.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            piece = chunk["choices"][0]["delta"].get("content") or "" if chunk["choices"] else ""
            if piece.strip() and first is None:
                first = time.perf_counter() - started
            pieces.append(piece)
    if first is None:
        raise RuntimeError("the answer had no words")
    return first, "".join(pieces)


def client_process(base: str, key: str, model: str, file_id: str, max_tokens: int) -> None:
    """`--client` mode: for each line read, one streamed question; prints its time to first token (JSON)."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        for line in sys.stdin:
            first, _ = api_ask(http, model, file_id, line.strip(), max_tokens)
            print(json.dumps(first), flush=True)


class ApiClient:
    """A client process of its own (as a harness is), asked one question at a time over a kept-alive connection."""

    def __init__(self, base: str, key: str, model: str, file_id: str, max_tokens: int) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, "--client", base, key, model, file_id,
                                         str(max_tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, question: str) -> float:
        self.process.stdin.write(question + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the API client process failed (its error is above)")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def cli_ask(session: ChatSession, slide: Path, question: str) -> float:
    """Seconds from `ask` to the first words, as `chatexaonepath chat` runs it (cached slide)."""
    session.load_slide(slide)  # a fresh conversation; features come from the cache
    first: list[float] = []

    def on_text(piece: str) -> None:
        if piece.strip() and not first:
            first.append(time.perf_counter())

    started = time.perf_counter()
    session.ask(question, on_text=on_text)
    return first[0] - started


def concurrent_clients(base: str, model: str, files: dict[str, str], clients: int, max_tokens: int,
                       timeout: float) -> tuple[int, list[float], list[str], float]:
    """`clients` threads, spread over the keys, each asking one streamed question: (ok, seconds, errors, wall)."""
    results: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(n: int) -> None:
        key = KEYS[n % len(KEYS)]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as http:
            start.wait()
            began = time.perf_counter()
            try:
                _, text = api_ask(http, model, files[key], f"{QUESTION} ({n})", max_tokens)
                if not text.strip():
                    raise RuntimeError("empty answer")
                with lock:
                    results.append(time.perf_counter() - began)
            except Exception as e:  # counted and shown: the point is how many fail
                with lock:
                    errors.append(f"client {n}: {type(e).__name__}: {str(e)[:120]}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    return len(results), results, errors, time.perf_counter() - began


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        base, key, model, file_id, max_tokens = sys.argv[2:7]
        return client_process(base, key, model, file_id, int(max_tokens))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--concurrent-tokens", type=int, default=16, help="Answer length for the concurrent clients.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds one concurrent request may take.")
    parser.add_argument("--headless", action="store_true", help="Serve the API alone (as `chatexaonepath serve`).")
    parser.add_argument("--demo", action="store_true", help="Serve the demo model (built first if not cached).")
    args = parser.parse_args()
    setup_logging()

    work = Path(tempfile.mkdtemp(prefix="chatexaonepath-bench-api-"))
    key_file = work / "keys.txt"
    key_file.write_text("".join(f"{key} bench{n}\n" for n, key in enumerate(KEYS)))
    keys = ApiKeys.load(key_file)
    config = AppConfig(features_dir=str(work / "features"), max_new_tokens=args.new_tokens, untrained=not args.demo,
                       max_requests_per_minute=10_000, example=False)
    engine = AppEngine.load(config)
    slide = Path(shutil.copy(engine.example_slide(), work / "example_case.tiff"))
    if args.headless:
        server = ApiServer(engine, keys, port=0)
        base, stop = server.start() + "/v1", server.stop
    else:
        demo, url = launch_app(engine, port=None, quiet=True, api_keys=keys)
        base, stop = url.rstrip("/") + "/v1", demo.close
    try:
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=600)
        model = http.get("/models").json()["data"][0]["id"]
        file_id, cold = upload(http, slide)
        cli = ChatSession(engine.model, engine.extractor.config, features_dir=engine.features_dir,
                          extractor=engine.extractor, max_new_tokens=args.new_tokens)
        client = ApiClient(base, KEYS[0], model, file_id, args.new_tokens)
        client.ask("Warm-up question?"), cli_ask(cli, slide, "Warm-up question?")
        api_ttft, cli_ttft = [], []
        for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
            api_ttft.append(client.ask(QUESTION))
            cli_ttft.append(cli_ask(cli, slide, QUESTION))
        client.close()

        files = {KEYS[0]: file_id}
        for key in KEYS[1:]:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as other:
                files[key] = upload(other, slide)[0]  # the same bytes: its features come from the cache
        ok, seconds, errors, wall = concurrent_clients(base, model, files, args.clients, args.concurrent_tokens,
                                                       args.timeout)
    finally:
        stop()
        engine.close()
        shutil.rmtree(work, ignore_errors=True)

    patches = len(cli.slide.features)
    api, cli_median = statistics.median(api_ttft), statistics.median(cli_ttft)
    served = "headless API (chatexaonepath serve)" if args.headless else "the page's server (make demo)"
    print(f"\n{served}; {engine.card.encoder.split(' —')[0]}, {engine.card.llm.split(' (')[0]}; {patches} patches; "
          f"{args.new_tokens} new tokens max, greedy; {args.repeats} alternating repeats, medians")
    print(f"{'measure':<56} {'seconds':>8}")
    print(f"{'upload → processed (cold cache: features extracted)':<56} {cold:>8.2f}")
    print(f"{'first token through the API (request → first chunk)':<56} {api:>8.3f}")
    print(f"{'first token in ChatSession, as in the CLI':<56} {cli_median:>8.3f}")
    if seconds:
        print(f"{f'{args.clients} concurrent clients: median / slowest answer':<56} "
              f"{statistics.median(seconds):>8.2f} / {max(seconds):.2f}")
    print(f"api runs: {', '.join(f'{v:.3f}' for v in api_ttft)}")
    print(f"cli runs: {', '.join(f'{v:.3f}' for v in cli_ttft)}")
    for error in errors:
        print(f"error: {error}")
    print(f"api_concurrent_clients: {ok}/{args.clients} answered with no error "
          f"({len(KEYS)} keys, {args.concurrent_tokens} tokens each, {wall:.1f} s in all)")
    print(f"api_ttft_ratio: {api / cli_median:.3f}")


if __name__ == "__main__":
    main()
