"""Benchmark: does talking about a slide cost more than talking to the bare LLM?

On the embedded LLM (SmolLM2-135M), greedy, same question and the same number of new tokens:
  (a) the bare LLM given the same text prompt (system prompt + question, no image),
  (b) a ChatSession on a slide whose features are cached (K visual tokens spliced in).
It reports time-to-first-token and tokens/s for both (median of alternating repeats), the time to
(re)load a cached slide, and the latency of a second question on the same slide.
Final line: `ttft_ratio: MLLM/LLM` (target ≤ 1.10).

    python bench/chat_latency.py [--repeats 7] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TextIteratorStreamer

from chatexaonepath.assets import user_cache_dir
from chatexaonepath.chat.conversation import Turn
from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.chat.session import ChatSession
from chatexaonepath.vision_tower.encoder import build_encoder
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.synthetic.slides import make_synthetic_slide

QUESTION = "What is the most likely diagnosis, and which features support it?"


def bare_llm_run(model: ChatEXAONEPathForCausalLM, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token, tokens/s after it) of the bare LLM on a text-only prompt."""
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = torch.tensor([prompt_ids])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, do_sample=False,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=model.tokenizer.pad_token_id)
    started = time.perf_counter()
    worker = threading.Thread(target=lambda: model.llm.generate(**kwargs))
    worker.start()
    first = None
    for piece in streamer:
        if piece and first is None:
            first = time.perf_counter() - started
    worker.join()
    total = time.perf_counter() - started
    return first, (new_tokens - 1) / (total - first)


def session_run(session: ChatSession, slide: Path) -> tuple[float, float, float, float]:
    """(first-token s, tokens/s, slide reload s, second-question s) for a ChatSession on a cached slide."""
    started = time.perf_counter()
    session.load_slide(slide)
    reload = time.perf_counter() - started
    answer = session.ask(QUESTION)
    rate = (answer.new_tokens - 1) / (answer.seconds - answer.first_token_seconds)
    second = session.ask("Is there necrosis?")
    return answer.first_token_seconds, rate, reload, second.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path="embedded"))
    encoder = build_encoder("random-vit-b16")
    extract = ExtractConfig(encoder=encoder.name)
    cache = Path(tempfile.gettempdir()) / "chatexaonepath-bench"
    slide = cache / "chat_tumor_4096.tiff"
    if not slide.exists():
        make_synthetic_slide(slide, "tumor", (4096, 4096), mpp=0.25, seed=5)
    session = ChatSession(model, extract, extractor=FeatureExtractor(extract, encoder),
                          features_dir=user_cache_dir() / "bench-features", max_new_tokens=args.new_tokens)
    session.load_slide(slide)  # extracts once (or finds the cache)
    # Same count of new tokens in both runs: the answer may stop early otherwise.
    session_kwargs = {"min_new_tokens": args.new_tokens}
    original = model.llm.generate
    model.llm.generate = lambda *a, **kw: original(*a, **{**kw, **session_kwargs})
    prompt_ids = session.builder.build([Turn("user", QUESTION)], add_generation_prompt=True).input_ids

    bare, mllm = [], []
    bare_llm_run(model, prompt_ids, 4), session_run(session, slide)  # warm-up
    for _ in range(args.repeats):  # alternate so that load drift hits both alike
        bare.append(bare_llm_run(model, prompt_ids, args.new_tokens))
        mllm.append(session_run(session, slide))
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    print(f"\nembedded LLM, {args.new_tokens} new tokens, greedy; {len(session.slide.features)} patches cached; "
          f"{args.repeats} alternating repeats, medians")
    print(f"{'path':<34} {'first token (ms)':>17} {'tokens/s':>9}")
    print(f"{'bare LLM, text prompt':<34} {med(bare, 0) * 1e3:>17.1f} {med(bare, 1):>9.1f}")
    print(f"{'ChatSession, cached slide':<34} {med(mllm, 0) * 1e3:>17.1f} {med(mllm, 1):>9.1f}")
    print(f"reload of the cached slide (no extraction): {med(mllm, 2) * 1e3:.1f} ms")
    print(f"second question on the same slide, whole answer: {med(mllm, 3) * 1e3:.1f} ms")
    print(f"ttft_ratio: {med(mllm, 0) / med(bare, 0):.3f}")


if __name__ == "__main__":
    main()
