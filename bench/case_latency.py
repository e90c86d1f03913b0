"""Benchmark: does asking about a case of three slides cost more than asking about one?

On the embedded LLM (SmolLM2-135M), greedy, the same question and the same number of new tokens,
features cached on disk (`.h5` bags of N patches × 768, as extraction writes them):
  (a) a ChatSession on one slide,
  (b) a ChatSession on a case of three slides (each pooled by the tower on its own, each labelled).
It reports the time to load the features (read + tower), time-to-first-token and tokens/s for both
(median of alternating repeats, measured in this one run), and the prompt lengths.
Final lines: `case_ttft_ratio: case/single` (target ≤ 1.30) and `case_load_ratio: case/single`.

    python bench/case_latency.py [--repeats 7] [--new-tokens 32] [--patches 4000] [--visual-tokens 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.chat.session import ChatSession
from chatexaonepath.vision_tower.features import read_features, write_features

QUESTION = "Which slide shows the lesion, and what is the diagnosis of this case?"


def write_bags(folder: Path, count: int, patches: int) -> list[Path]:
    """`count` cached feature files of `patches` × 768 (float16, on a grid), as extraction leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(patches)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:patches] * 448
    paths = []
    for i in range(count):
        path = folder / f"slide{i + 1}.h5"
        if not path.exists():
            write_features(path, rng.normal(size=(patches, 768)).astype(np.float32), coords,
                           {"patch_size_level0": 448, "level0_width": side * 448, "level0_height": side * 448})
        paths.append(path)
    return paths


def run(session: ChatSession, paths: list[Path]) -> tuple[float, float, float, int]:
    """(load s, first-token s, tokens/s, prompt tokens) for one fresh conversation about `paths`."""
    started = time.perf_counter()
    for i, path in enumerate(paths):
        session.use_features(read_features(path), path.name, add=i > 0)
    load = time.perf_counter() - started
    answer = session.ask(QUESTION)
    rate = (answer.new_tokens - 1) / max(answer.seconds - answer.first_token_seconds, 1e-9)
    return load, answer.first_token_seconds, rate, answer.prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--patches", type=int, default=4000, help="patches per slide")
    parser.add_argument("--visual-tokens", type=int, default=ChatEXAONEPathConfig().num_visual_tokens)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path="embedded",
                                                                 num_visual_tokens=args.visual_tokens))
    paths = write_bags(Path(tempfile.gettempdir()) / f"chatexaonepath-bench-case-{args.patches}", 3, args.patches)
    session = ChatSession(model, max_new_tokens=args.new_tokens)
    original = model.llm.generate  # the same count of new tokens every time: an answer may stop early otherwise
    model.llm.generate = lambda *a, **kw: original(*a, **{**kw, "min_new_tokens": args.new_tokens})

    single, case = [], []
    run(session, paths[:1]), run(session, paths)  # warm-up
    for _ in range(args.repeats):  # alternate so that load drift hits both alike
        single.append(run(session, paths[:1]))
        case.append(run(session, paths))
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    print(f"\nembedded LLM, {args.new_tokens} new tokens, greedy; {args.patches} patches per slide, features cached; "
          f"K={args.visual_tokens} visual tokens per slide; {args.repeats} alternating repeats, medians")
    print(f"{'conversation':<24} {'prompt tokens':>14} {'load (ms)':>10} {'first token (ms)':>17} {'tokens/s':>9}")
    for name, rows in (("one slide", single), ("case of 3 slides", case)):
        print(f"{name:<24} {rows[0][3]:>14} {med(rows, 0) * 1e3:>10.1f} {med(rows, 1) * 1e3:>17.1f} "
              f"{med(rows, 2):>9.1f}")
    print(f"case_load_ratio: {med(case, 0) / med(single, 0):.3f}")
    print(f"case_ttft_ratio: {med(case, 1) / med(single, 1):.3f}")


if __name__ == "__main__":
    main()
