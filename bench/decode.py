"""Benchmark: one loader worker decoding 0.5 µm/px patches of a 40× JPEG slide, DCT vs OpenSlide.

The slide is an Aperio-like SVS at 0.25 µm/px (256² JPEG tiles in RGB colour space with shared
tables, quality 70), so each 256-px patch is a 512² read: OpenSlide decodes four tiles at full
size and the loader shrinks them; the DCT decoder decodes the same four tiles at half size.
Both run in one DataLoader worker process, as in extraction, yielding uint8 batches. The two are
timed back to back within each repeat (in alternating order) and the ratio taken per repeat; the
median over repeats is reported, since the machine is shared and noisy. The agreement of the two
decoders (mean absolute pixel difference per patch) is checked on a sample.
Final lines: `dct_decode_speedup: X` (target ≥ 2.5) and `loader_patches_per_s_per_worker: Y`
(the DCT loader's rate; target ≥ 500).

    python bench/decode.py [--block 8192] [--repeat 2] [--patches 600] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import chatexaonepath  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.vision_tower.extraction import patch_loader, patch_reader
from chatexaonepath.vision_tower.jpeg_tiles import choose_decoder
from chatexaonepath.vision_tower.patching import PatchGrid, patch_grid
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.synthetic.slides import make_synthetic_slide
from chatexaonepath.vision_tower.tissue import segment_tissue


def bench_slide(block: int, repeat: int, cache: Path) -> Path:
    """The 40× Aperio-like slide, generated once and cached (rendering the block takes ~15 s per 8k²)."""
    path = cache / f"bench_aperio_{block}x{repeat}.svs"
    if not path.exists():
        print(f"generating {path} ({block * repeat}² px at 0.25 µm/px) …", flush=True)
        make_synthetic_slide(path, "tumor", (block, block), mpp=0.25, seed=2024, coverage=0.8, aperio=True,
                             repeat=(repeat, repeat))
    return path


def sample(grid: PatchGrid, count: int) -> PatchGrid:
    """`count` patches spread evenly over the grid (not just its first rows)."""
    pick = np.unique(np.linspace(0, len(grid) - 1, min(count, len(grid))).astype(int))
    return dataclasses.replace(grid, coords=grid.coords[pick], tissue_fraction=grid.tissue_fraction[pick])


def loader_rate(slide, grid: PatchGrid, decoder: str, workers: int, batch_size: int) -> float:
    """Steady patches/s of a DataLoader with `workers` processes (worker start-up excluded)."""
    reader = patch_reader(slide, grid, decoder)
    iterator = iter(patch_loader(slide, grid, batch_size, workers, reader=reader))
    next(iterator)  # the first batch waits for the workers to start
    started, count = time.perf_counter(), 0
    for _, patches in iterator:
        count += len(patches)
    return count / (time.perf_counter() - started)


def agreement(slide, grid: PatchGrid, count: int) -> np.ndarray:
    """Mean absolute pixel difference per patch between the two decoders."""
    small = sample(grid, count)
    dct, openslide = patch_reader(slide, small, "dct"), patch_reader(slide, small, "openslide")
    return np.array([np.abs(dct.read_patch(x, y).astype(np.int16) - openslide.read_patch(x, y)).mean()
                     for x, y in small.coords])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=8192, help="side of the rendered block (level-0 px)")
    parser.add_argument("--repeat", type=int, default=2, help="the block laid out repeat × repeat times")
    parser.add_argument("--patches", type=int, default=600, help="patches decoded per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "chatexaonepath-bench")
    args = parser.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    path = bench_slide(args.block, args.repeat, args.cache)
    with open_slide(path) as slide:
        grid = patch_grid(slide, segment_tissue(slide), 256, 0.5, 0.25)
        chosen = choose_decoder(slide, 256, 0.5)
        timed = sample(grid, args.patches)
        rates: dict[str, list[float]] = {"dct": [], "openslide": []}
        ratios = []
        for repeat in range(args.repeats):
            for decoder in ("dct", "openslide") if repeat % 2 == 0 else ("openslide", "dct"):
                rates[decoder].append(loader_rate(slide, timed, decoder, 1, args.batch_size))
            ratios.append(rates["dct"][-1] / rates["openslide"][-1])
            print(f"repeat {repeat + 1}: dct {rates['dct'][-1]:.0f}/s, openslide {rates['openslide'][-1]:.0f}/s, "
                  f"ratio {ratios[-1]:.2f}", flush=True)
        differences = agreement(slide, grid, 64)

    print(f"\nslide {path.name}: {slide.dimensions[0]}² px at {slide.mpp} µm/px ({slide.vendor}), {len(grid)} patches; "
          f"{grid.read_size} px read at level {grid.read_level} → {grid.patch_size} px; auto decoder: {chosen}")
    print(f"{'decoder':<10} {'workers':>7} {'patches':>8} {'median patches/s':>17} {'min':>7} {'max':>7}")
    for decoder, values in rates.items():
        print(f"{decoder:<10} {1:>7} {len(timed):>8} {statistics.median(values):>17.0f} "
              f"{min(values):>7.0f} {max(values):>7.0f}")
    print(f"per-repeat speedup: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"dct vs openslide pixels (64 patches): mean abs diff per patch mean {differences.mean():.3f}, "
          f"max {differences.max():.3f} (bound 3)")
    print(f"dct_decode_speedup: {statistics.median(ratios):.2f}")
    print(f"loader_patches_per_s_per_worker: {statistics.median(rates['dct']):.0f}")


if __name__ == "__main__":
    main()
