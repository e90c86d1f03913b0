"""Benchmark: slide → features throughput of the extraction pipeline against its encoder.

On a synthetic 0.25 µm/px (40×) slide — Aperio-like by default (256² RGB JPEG tiles, shared
tables), or tifffile's generic YCbCr TIFF — with ViT-B/16, each 0.5 µm/px patch is a 512² read
shrunk to 256. It measures:
  * loader-only patches/s (read + decode + resize, plus crop/normalise on the device) for each
    decoder and worker count asked for,
  * encoder-only patches/s on preloaded tensors: float32 and the pipeline's precision, at each
    encoder batch size asked for,
  * end-to-end slide → .h5 patches/s with the pipeline's own settings,
  * cosine similarity between the pipeline's features and float32 features of the same patches,
  * peak GPU memory (on CUDA).
Final lines: `loader_patches_per_s: X` (the first decoder at the last worker count),
`extract_speedup_vs_fp32: X` (end-to-end / encoder-only fp32), and with `--gpu-report`
`gpu_patches_per_s: X` (end to end). bench/gpu_extract.sh runs this with the GPU settings.

    python bench/extract.py [--block 8192] [--repeat 2] [--encoder random-vit-b16] [--device auto]
                            [--decoders dct openslide] [--workers 1 4 15] [--encoder-batch-sizes 64 256]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor, patch_loader, patch_reader
from chatexaonepath.vision_tower.features import read_features
from chatexaonepath.vision_tower.patching import PatchGrid
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.synthetic.slides import make_synthetic_slide


def bench_slide(layout: str, block: int, repeat: int, cache: Path) -> Path:
    """The benchmark slide, generated once and cached (rendering takes ~15 s per 8k² block)."""
    if layout == "aperio":
        path = cache / f"bench_aperio_{block}x{repeat}.svs"
        if not path.exists():
            print(f"generating {path} ({block * repeat}² px at 0.25 µm/px) …", flush=True)
            make_synthetic_slide(path, "tumor", (block, block), mpp=0.25, seed=2024, coverage=0.8, aperio=True,
                                 repeat=(repeat, repeat))
        return path
    if repeat != 1:
        raise SystemExit("--repeat needs --layout aperio (the generic writer renders the whole slide)")
    path = cache / f"bench_tumor_{block}.tiff"
    if not path.exists():
        print(f"generating {path} ({block}² px at 0.25 µm/px) …", flush=True)
        make_synthetic_slide(path, "tumor", (block, block), mpp=0.25, seed=2024, coverage=0.8)
    return path


def spread(grid: PatchGrid, count: int) -> PatchGrid:
    """The grid cut to `count` patches spread evenly over it."""
    pick = np.unique(np.linspace(0, len(grid) - 1, min(count, len(grid))).astype(int))
    return dataclasses.replace(grid, coords=grid.coords[pick], tissue_fraction=grid.tissue_fraction[pick])


def loader_rate(extractor: FeatureExtractor, slide, grid, decoder: str, workers: int) -> float:
    """Patches/s of the loader alone, including the crop/normalise the encoder input needs."""
    reader = patch_reader(slide, grid, decoder)
    loader = patch_loader(slide, grid, extractor.config.batch_size, workers, extractor.device.type == "cuda", reader)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    started, count = time.perf_counter(), 0
    for _, patches in iterator:
        extractor.encoder.preprocess(patches.to(extractor.device, non_blocking=True))
        count += len(patches)
    _sync(extractor.device)
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("aperio", "generic"), default="aperio")
    parser.add_argument("--block", type=int, default=8192, help="side of the rendered block (level-0 px)")
    parser.add_argument("--repeat", type=int, default=2, help="aperio: the block laid out repeat × repeat times")
    parser.add_argument("--encoder", default="random-vit-b16")
    parser.add_argument("--encoder-weights", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decoder", default="auto", help="the pipeline's decoder (end to end)")
    parser.add_argument("--num-workers", type=int, default=None, help="the pipeline's loader workers (end to end)")
    parser.add_argument("--batch-size", type=int, default=32, help="the pipeline's batch size")
    parser.add_argument("--decoders", nargs="+", default=["dct"], help="decoders timed loader-only")
    parser.add_argument("--workers", nargs="+", type=int, default=None,
                        help="loader-only worker counts (default: the cores on a CPU, the pipeline's on a GPU)")
    parser.add_argument("--loader-patches-per-worker", type=int, default=400)
    parser.add_argument("--encoder-batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--encoder-batches", type=int, default=3, help="batches timed for encoder-only rates")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-report", action="store_true", help="peak GPU memory and `gpu_patches_per_s`")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "chatexaonepath-bench")
    return parser.parse_args()


def measure_loaders(args, extractor, slide, grid, workers_list) -> list[tuple[str, str, float]]:
    rows = []
    for decoder in args.decoders:
        for workers in workers_list:
            part = spread(grid, args.loader_patches_per_worker * max(1, workers))
            rate = statistics.median(loader_rate(extractor, slide, part, decoder, workers) for _ in range(args.repeats))
            rows.append(("loader only", f"{decoder}, {workers} workers", rate))
    return rows


def measure_encoders(args, extractor, slide, grid, batch_sizes):
    """Rows, the fp32 rate and features at the first batch size, their coords, and pipeline rates by batch size."""
    reader = patch_reader(slide, grid, extractor.decoder(slide))
    sample = spread(grid, max(batch_sizes) * args.encoder_batches)
    patches = torch.from_numpy(np.stack([reader.read_patch(x, y) for x, y in sample.coords]))
    device, encoder = extractor.device, extractor.encoder
    # The baseline is the plain float32 network; the pipeline may run a repacked or half copy of it.
    fp32_model = copy.deepcopy(encoder.model).to(device).float()
    rows, pipe, baseline = [], {}, None
    for size in batch_sizes:
        pixels = [encoder.preprocess(b.to(device)) for b in patches[: size * args.encoder_batches].split(size)]
        rate, features = encoder_rate(fp32_model, device, pixels, torch.float32, args.repeats)
        baseline = baseline or (rate, features, sample.coords[: len(features)])
        rows.append(("encoder only", f"fp32, batch {size}", rate))
        pipe[size], _ = encoder_rate(extractor.model, device, pixels, extractor.dtype, args.repeats)
        rows.append(("encoder only", f"{extractor.precision}, batch {size}", pipe[size]))
    del fp32_model
    return rows, baseline, pipe


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    args.cache.mkdir(parents=True, exist_ok=True)
    slide_path = bench_slide(args.layout, args.block, args.repeat, args.cache)
    encoder = build_encoder(args.encoder, args.encoder_weights)
    config = ExtractConfig(encoder=args.encoder, encoder_weights=args.encoder_weights, batch_size=args.batch_size,
                           device=args.device, decoder=args.decoder, num_workers=args.num_workers)
    extractor = FeatureExtractor(config, encoder)
    device, cores = extractor.device, len(os.sched_getaffinity(0))
    workers_list = args.workers or [max(cores, 1) if device.type == "cpu" else extractor.num_workers]
    batch_sizes = args.encoder_batch_sizes or [args.batch_size]
    with open_slide(slide_path) as slide:
        _, grid = extractor.prepare(slide)
        rows = measure_loaders(args, extractor, slide, grid, workers_list)
        loader = rows[len(workers_list) - 1][2]  # the first decoder at the most workers
        encoder_rows, (fp32, fp32_features, feature_coords), pipe = measure_encoders(args, extractor, slide, grid,
                                                                                     batch_sizes)
        rows += encoder_rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            result = extractor.extract(slide, out)
            e2e = result.num_patches / (time.perf_counter() - started)
            bag = read_features(Path(out) / f"{slide.slide_id}.h5")
        rows.append(("end to end", f"{extractor.precision}, {bag.attrs['decoder']}, {extractor.num_workers} workers, "
                                   f"batch {args.batch_size}", e2e))
    index = {tuple(c): i for i, c in enumerate(bag.coords.tolist())}
    same = [index[tuple(c)] for c in feature_coords.tolist()]
    cosine = torch.nn.functional.cosine_similarity(bag.features[same].float(), fp32_features, dim=1)

    print(f"\nslide {slide_path.name}: {len(grid)} patches ({grid.read_size} px read at level {grid.read_level} "
          f"→ {grid.patch_size} px); encoder {encoder.name}; device {device}; {cores} cores")
    print(f"{'stage':<14} {'setting':<46} {'patches/s':>10} {'vs fp32 encoder':>16}")
    for stage, setting, rate in rows:
        print(f"{stage:<14} {setting:<46} {rate:>10.1f} {rate / fp32:>15.2f}×")
    print(f"feature cosine vs fp32 ({len(same)} patches): min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    batch = args.batch_size if args.batch_size in pipe else batch_sizes[0]
    print(f"end-to-end efficiency vs {extractor.precision} encoder-only (batch {batch}): {e2e / pipe[batch]:.2f}")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        print(f"peak GPU memory (end to end): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB of {total:.0f}")
    print(f"loader_patches_per_s: {loader:.1f}")
    print(f"extract_speedup_vs_fp32: {e2e / fp32:.2f}")
    if args.gpu_report:
        print(f"gpu_patches_per_s: {e2e:.1f}")


if __name__ == "__main__":
    main()
