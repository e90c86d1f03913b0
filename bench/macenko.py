"""Benchmark: batched torch Macenko (chatexaonepath) vs torchstain's per-image loop.

Run from the repository root: `python bench/macenko.py`. The last line is `macenko_speedup: X`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import chatexaonepath  # noqa: F401
except ImportError:  # not installed yet: run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchstain.torch.normalizers import TorchMacenkoNormalizer

from chatexaonepath.vision_tower.stain import MacenkoNormalizer
from chatexaonepath.synthetic.slides import stained_patch

N_PATCHES, SIZE, REPEATS, SEED = 64, 256, 9, 0


def median_ms(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function in ms; runs are interleaved so load drifts hit all alike."""
    for fn in fns:  # warm-up
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1e3 for spent in times]


def main() -> None:
    rng = np.random.default_rng(SEED)
    strengths = rng.uniform(0.5, 1.5, (N_PATCHES, 2))
    patches = torch.from_numpy(np.stack([stained_patch(SEED + i, SIZE, h, e) for i, (h, e) in enumerate(strengths)]))
    chw = patches.permute(0, 3, 1, 2)
    reference = TorchMacenkoNormalizer()
    ours = MacenkoNormalizer()

    def run_torchstain() -> torch.Tensor:
        return torch.stack([reference.normalize(img, stains=False)[0] for img in chw])

    def run_ours() -> torch.Tensor:
        return ours.normalize(patches)

    mad = (run_ours().int() - run_torchstain()).abs().float().mean(dim=(1, 2, 3))
    ts_ms, our_ms = median_ms([run_torchstain, run_ours], REPEATS)
    rows = [("torchstain per-image loop", ts_ms), ("chatexaonepath batched", our_ms)]
    title = f"Macenko, {N_PATCHES} patches of {SIZE}², {torch.get_num_threads()} threads, median of {REPEATS}"
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("method", "ms per batch", "patches/s"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for name, ms in rows:
            table.add_row(name, f"{ms:.1f}", f"{N_PATCHES / ms * 1e3:.0f}")
        Console().print(table)
    except ImportError:
        print(title)
        print(f"{'method':<28}{'ms per batch':>14}{'patches/s':>12}")
        for name, ms in rows:
            print(f"{name:<28}{ms:>14.1f}{N_PATCHES / ms * 1e3:>12.0f}")
    print(f"agreement with torchstain: mean |diff| per patch: max {mad.max():.3f}, mean {mad.mean():.3f}")
    print(f"macenko_speedup: {ts_ms / our_ms:.2f}")


if __name__ == "__main__":
    main()
