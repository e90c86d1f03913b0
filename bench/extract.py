"""Benchmark: slide → features throughput of the extraction pipeline against its encoder.

On a synthetic 0.25 µm/px slide (JPEG 256² tiles; each 0.5 µm/px patch is a 512² read resized to
256) with ViT-B/16 and batch 32, it measures:
  * loader-only patches/s (read + decode + resize + crop/normalise, no model),
  * encoder-only patches/s on preloaded tensors, float32 and the pipeline's precision,
  * end-to-end slide → .h5 patches/s,
  * cosine similarity between the pipeline's features and float32 features of the same patches.
Final lines: `loader_patches_per_s: X` and `extract_speedup_vs_fp32: X` (end-to-end / encoder-only fp32).

    python bench/extract.py [--size 16384] [--encoder random-vit-b16] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import chatexaonepath  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.vision_tower.encoder import build_encoder
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor, patch_loader
from chatexaonepath.vision_tower.features import read_features
from chatexaonepath.vision_tower.patching import read_patch
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.vision_tower.synthetic import make_synthetic_slide


def bench_slide(size: int, cache: Path) -> Path:
    """The benchmark slide, generated once and cached (it takes about a minute)."""
    path = cache / f"bench_tumor_{size}.tiff"
    if not path.exists():
        print(f"generating {path} ({size}×{size} px at 0.25 µm/px) …", flush=True)
        make_synthetic_slide(path, "tumor", (size, size), mpp=0.25, seed=2024, coverage=0.8)
    return path


def loader_rate(extractor: FeatureExtractor, slide, grid, workers: int) -> float:
    """Patches/s of the loader alone, including the crop/normalise the encoder input needs."""
    loader = patch_loader(slide, grid, extractor.config.batch_size, workers, extractor.device.type == "cuda")
    iterator = iter(loader)
    first_start, first = next(iterator)  # worker start-up is not throughput
    started, count = time.perf_counter(), 0
    for _, patches in iterator:
        extractor.encoder.preprocess(patches.to(extractor.device, non_blocking=True))
        count += len(patches)
    return count / (time.perf_counter() - started)


def encoder_rate(model: torch.nn.Module, device: torch.device, pixels: list[torch.Tensor], dtype: torch.dtype,
                 repeats: int) -> tuple[float, torch.Tensor]:
    """Median patches/s of `model` on preloaded, preprocessed batches, and its features."""
    rates, outputs = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(pixels[0].to(device))  # warm-up (kernel selection, allocator)
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            outputs = [model(batch.to(device, non_blocking=True)).float().cpu() for batch in pixels]
            _sync(device)
            rates.append(sum(len(b) for b in pixels) / (time.perf_counter() - started))
    return statistics.median(rates), torch.cat(outputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384, help="slide side in level-0 px (16384 → ~800 patches)")
    parser.add_argument("--encoder", default="random-vit-b16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoder-batches", type=int, default=3, help="batches timed for encoder-only rates")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "chatexaonepath-bench")
    args = parser.parse_args()
    torch.manual_seed(0)

    args.cache.mkdir(parents=True, exist_ok=True)
    slide_path = bench_slide(args.size, args.cache)
    encoder = build_encoder(args.encoder)
    extractor = FeatureExtractor(ExtractConfig(encoder=args.encoder, batch_size=args.batch_size, device=args.device), encoder)
    cores = len(os.sched_getaffinity(0))
    rows = []
    with open_slide(slide_path) as slide:
        tissue, grid = extractor.prepare(slide)
        loader_workers = max(cores, 1) if extractor.device.type == "cpu" else extractor.num_workers
        loader = statistics.median(loader_rate(extractor, slide, grid, loader_workers) for _ in range(args.repeats))
        rows.append(("loader only", f"{loader_workers} workers", loader))

        coords = grid.coords[: args.batch_size * args.encoder_batches]
        patches = torch.from_numpy(np.stack([read_patch(slide, grid, x, y) for x, y in coords]))
        pixels = [encoder.preprocess(b) for b in patches.split(args.batch_size)]
        # The baseline is the plain float32 network; the pipeline may run a repacked copy of it.
        fp32_model = copy.deepcopy(encoder.model).to(extractor.device).float()
        fp32, fp32_features = encoder_rate(fp32_model, extractor.device, pixels, torch.float32, args.repeats)
        rows.append(("encoder only", "fp32", fp32))
        pipe, _ = encoder_rate(extractor.model, extractor.device, pixels, extractor.dtype, args.repeats)
        rows.append(("encoder only", extractor.precision, pipe))

        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            result = extractor.extract(slide, out)
            e2e = result.num_patches / (time.perf_counter() - started)
            bag = read_features(Path(out) / f"{slide.slide_id}.h5")
        rows.append(("end to end", f"{extractor.precision}, {extractor.num_workers} worker(s)", e2e))

    n = len(fp32_features)
    cosine = torch.nn.functional.cosine_similarity(bag.features[:n].float(), fp32_features, dim=1)
    print(f"\nslide {slide_path.name}: {len(grid)} patches ({grid.read_size} px read at level {grid.read_level} → "
          f"{grid.patch_size} px); encoder {encoder.name}; device {extractor.device}; {cores} cores")
    print(f"{'stage':<14} {'setting':<22} {'patches/s':>10} {'vs fp32 encoder':>16}")
    for stage, setting, rate in rows:
        print(f"{stage:<14} {setting:<22} {rate:>10.1f} {rate / fp32:>15.2f}×")
    print(f"feature cosine vs fp32 (first {n} patches): min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    print(f"end-to-end efficiency vs {extractor.precision} encoder-only: {e2e / pipe:.2f}")
    print(f"loader_patches_per_s: {loader:.1f}")
    print(f"extract_speedup_vs_fp32: {e2e / fp32:.2f}")


if __name__ == "__main__":
    main()
