"""The README's main job for now: synthetic slide → tissue → patches → features, with a summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..vision_tower.encoder import build_encoder_or_random
from ..vision_tower.extraction import ExtractConfig, FeatureExtractor
from ..vision_tower.features import read_features
from ..vision_tower.slide import open_slide
from .slides import make_synthetic_slide

logger = logging.getLogger(__name__)

DEMO_SLIDE_SIZE = 6144  # at 0.25 µm/px: about 80 tissue patches at 0.5 µm/px, ~15 s on 2 cores


def run_demo(out_dir: str | Path, encoder_name: str | None = None, progress=None) -> dict[str, object]:
    """Make (once) a synthetic slide, extract its features, and return a summary for display."""
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    slide_path = out_dir / "slides" / "demo_tumor.tiff"
    started = time.perf_counter()
    if not slide_path.exists():
        make_synthetic_slide(slide_path, "tumor", (DEMO_SLIDE_SIZE, DEMO_SLIDE_SIZE), mpp=0.25, seed=7)
    timings["synthetic slide"] = time.perf_counter() - started

    started = time.perf_counter()
    encoder = build_encoder_or_random(encoder_name)
    extractor = FeatureExtractor(ExtractConfig(encoder=encoder.name), encoder=encoder)
    timings["load encoder"] = time.perf_counter() - started

    features_dir = out_dir / "features"
    with open_slide(slide_path) as slide:
        started = time.perf_counter()
        tissue, grid = extractor.prepare(slide)
        timings["tissue + patch grid"] = time.perf_counter() - started
        task = progress.add_task("features", total=len(grid), unit="patches") if progress else None
        update = (lambda done, _total: progress.update(task, completed=done)) if progress else None
        started = time.perf_counter()
        extractor.extract(slide, features_dir, update, prepared=(tissue, grid))
        timings["features"] = time.perf_counter() - started
        slide_desc = f"{slide_path} ({slide.dimensions[0]}×{slide.dimensions[1]} px at {slide.mpp} µm/px)"

    bag = read_features(features_dir / f"{slide.slide_id}.h5")
    encoder_note = encoder.name + (" — RANDOM weights, features are not meaningful" if encoder.is_random else "")
    return {
        "slide": slide_desc,
        "tissue": f"{len(tissue.contours)} region(s), {tissue.tissue_fraction:.0%} of the slide",
        "patches": f"{len(bag)} of {grid.patch_size} px at {grid.target_mpp} µm/px "
                   f"(read {grid.read_size} px at level {grid.read_level})",
        "features": f"{tuple(bag.features.shape)} {bag.features.dtype}, coords {tuple(bag.coords.shape)}",
        "encoder": encoder_note,
        "device / precision": f"{extractor.device} / {extractor.precision}",
        **{f"time: {k}": f"{v:.1f} s" for k, v in timings.items()},
        "throughput": f"{len(bag) / timings['features']:.1f} patches/s",
        "features file": str(features_dir / f"{slide.slide_id}.h5"),
        "thumbnail": str(features_dir / "thumbnails" / f"{slide.slide_id}.png"),
    }
