"""Slide → features: the extraction engine (`FeatureExtractor`); batch.py runs it over many slides.

Worker processes read, decode and resize patches while the main process normalises and encodes
them on the device, so on a GPU the loader is what must keep up. Each slide ends as one atomic
`.h5` (features.py) plus a thumbnail with the tissue outline.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..assets import usable_cores
from ..errors import ChatEXAONEPathError
from ..fileio import atomic_write_with
from .cpu_inference import oneDNN_bf16_available, pack_for_cpu_bf16
from .encoder import PatchEncoder, build_encoder
from .features import FORMAT_VERSION, write_features
from .jpeg_tiles import DECODERS, JpegTilePatchReader, choose_decoder
from .patching import PatchGrid, patch_grid, read_patch
from .slide import DEFAULT_MAX_LEVEL_PIXELS, DEFAULT_MAX_PATCHES, DEFAULT_MAX_PIXELS, MPP_RANGE, Slide, SlideLimits
from .stain import macenko_normalizer, stain_target_sha256
from .tissue import TissueConfig, TissueMask, draw_tissue_outline, segment_tissue

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (patches done, patches total)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExtractConfig:
    """Settings of a feature extraction; saved as `extract_config.json` beside the features."""

    encoder: str = "exaonepath"
    encoder_weights: str | None = None
    stain_norm: str = "none"  # "none" (the paper's v3) or "macenko"
    stain_target: str | None = None  # macenko only: fit the reference to this image (EXAONEPath's TCGA target)
    patch_size: int = 256
    target_mpp: float = 0.5
    min_tissue: float = 0.25
    batch_size: int = 32
    num_workers: int | None = None  # None: chosen from the device and the cores
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"
    mpp: float | None = None  # level-0 µm/px override for slides without it
    seed: int = 0  # for random encoders only
    decoder: str = "auto"  # auto | openslide | dct (jpeg_tiles.py): how patches are decoded
    # Budgets (slide.SlideLimits), checked before the work starts; they never change the features, so they are not settings.
    max_pixels: int = DEFAULT_MAX_PIXELS  # most pixels decoded at once: a whole PNG/JPEG, a TIFF strip or tile
    max_patches_per_slide: int = DEFAULT_MAX_PATCHES  # refuse slides with more tissue patches
    max_level_pixels: int = DEFAULT_MAX_LEVEL_PIXELS  # area of the smallest level (read whole for the tissue map)
    tissue: TissueConfig = field(default_factory=TissueConfig)

    @property
    def limits(self) -> SlideLimits:
        """The budgets slides of this extraction are opened with."""
        return SlideLimits(max_pixels=self.max_pixels, max_patches=self.max_patches_per_slide,
                           max_level_pixels=self.max_level_pixels)

    def __post_init__(self) -> None:
        if self.stain_norm not in ("none", "macenko"):
            raise ChatEXAONEPathError(f"--stain-norm must be 'none' or 'macenko', got {self.stain_norm!r}.")
        if self.stain_target is not None and self.stain_norm != "macenko":
            raise ChatEXAONEPathError(f"--stain-target {self.stain_target} fits a Macenko reference; it needs "
                                      "--stain-norm macenko.")
        if self.precision not in ("auto", *PRECISIONS):
            raise ChatEXAONEPathError(f"--precision must be one of auto, {', '.join(PRECISIONS)}; got {self.precision!r}.")
        if self.batch_size < 1:
            raise ChatEXAONEPathError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.patch_size < 16:
            raise ChatEXAONEPathError(f"--patch-size must be at least 16 pixels, got {self.patch_size}.")
        if not 0.05 <= self.target_mpp <= 50:
            raise ChatEXAONEPathError(f"--target-mpp must be a plausible µm/px (0.05–50; the paper uses 0.5), got {self.target_mpp}.")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ChatEXAONEPathError(f"--min-tissue is a fraction between 0 and 1, got {self.min_tissue}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise ChatEXAONEPathError(f"--num-workers must be 0 or more, got {self.num_workers}.")
        if self.mpp is not None and not MPP_RANGE[0] <= self.mpp <= MPP_RANGE[1]:
            raise ChatEXAONEPathError(f"--mpp {self.mpp} is not a plausible µm/px ({MPP_RANGE[0]}–{MPP_RANGE[1]:g}; "
                                      "e.g. 0.25 for 40×, 0.5 for 20×).")
        self.limits  # noqa: B018 - building the limits validates the budgets now, with their flags' names
        if self.decoder not in DECODERS:
            raise ChatEXAONEPathError(f"--decoder must be one of {', '.join(DECODERS)}; got {self.decoder!r}.")
        if isinstance(self.tissue, dict):
            self.tissue = TissueConfig(**self.tissue)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ChatEXAONEPathError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ChatEXAONEPathError(f"--device {name} was asked for, but no CUDA GPU is available.")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` → bf16 on GPUs and CPUs that run it natively (AVX-512 BF16 / AMX), else fp32/fp16."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


class OpenSlidePatchReader:
    """Reads a grid's patches through OpenSlide (`patching.read_patch`): every format, full-size decode."""

    name = "openslide"

    def __init__(self, slide: Slide, grid: PatchGrid) -> None:
        self.slide, self.grid = slide, grid

    def read_patch(self, x: int, y: int) -> np.ndarray:
        """The patch at level-0 (x, y) as RGB uint8 (patch_size, patch_size, 3)."""
        return read_patch(self.slide, self.grid, x, y)

    def close(self) -> None:
        """Nothing to release: the slide belongs to the caller."""


PatchReader = OpenSlidePatchReader | JpegTilePatchReader


def patch_reader(slide: Slide, grid: PatchGrid, decoder: str) -> PatchReader:
    """The reader for a decoder name that `choose_decoder` returned (`openslide` or `dct`)."""
    return JpegTilePatchReader(slide, grid) if decoder == "dct" else OpenSlidePatchReader(slide, grid)


class PatchBatches(torch.utils.data.Dataset):
    """Batches of patches of one slide; each item is a whole batch, so workers hand over few, large arrays."""

    def __init__(self, slide: Slide, grid: PatchGrid, batch_size: int, reader: PatchReader | None = None) -> None:
        self.slide, self.grid, self.batch_size = slide, grid, batch_size
        self.reader = reader or OpenSlidePatchReader(slide, grid)

    def __len__(self) -> int:
        return (len(self.grid) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        start = index * self.batch_size
        coords = self.grid.coords[start : start + self.batch_size]
        size = self.grid.patch_size
        batch = np.empty((len(coords), size, size, 3), np.uint8)
        for i, (x, y) in enumerate(coords):
            batch[i] = self.reader.read_patch(x, y)
        return start, torch.from_numpy(batch)  # (B, S, S, 3) uint8


def _worker_init(_: int) -> None:
    # Workers decode and resize; many threads per worker would only fight the encoder for cores.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def default_num_workers(device: torch.device, processes: int = 1) -> int:
    """Loader processes: on a GPU all spare cores (up to 16); on a CPU few or none.

    On a CPU the encoder is ~30× slower than the loader and already uses every core, so a loader
    process only competes with it; measured on 2 cores, 0 and 1 workers tie end to end.
    `processes` extractors on one host (one per GPU under torchrun) share its cores.
    """
    cores = max(1, usable_cores() // max(1, processes))
    if device.type == "cuda":
        return min(16, max(1, cores - 1))
    return 0 if cores <= 4 else max(1, cores // 8)


def _loader_context():
    # A plain fork copies OpenCV's and OpenMP's thread pools mid-state, and the worker's first
    # cv2 call can deadlock. The forkserver starts clean once, with the heavy imports preloaded,
    # and then forks cheap workers for every slide.
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "cv2", "openslide", "PIL.JpegImagePlugin", __name__])
    return context


def patch_loader(slide: Slide, grid: PatchGrid, batch_size: int, num_workers: int, pin_memory: bool = False,
                 reader: PatchReader | None = None):
    """A DataLoader yielding (start index, uint8 (B, S, S, 3)) batches of one slide's patches."""
    return torch.utils.data.DataLoader(
        PatchBatches(slide, grid, batch_size, reader), batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
        multiprocessing_context=_loader_context() if num_workers else None,
    )


@dataclass
class SlideResult:
    """What extracting one slide produced."""

    slide_id: str
    path: Path
    num_patches: int
    seconds: float
    status: str  # "extracted" | "skipped" | "locked" | "failed"
    error: str | None = None


class FeatureExtractor:
    """Holds the encoder on its device and turns slides into features files."""

    def __init__(self, config: ExtractConfig, encoder: PatchEncoder | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.encoder = encoder or build_encoder(config.encoder, config.encoder_weights, config.seed)
        self.model = self._inference_model()
        self.normalizer = macenko_normalizer(config.stain_target) if config.stain_norm == "macenko" else None
        self.stain_target_sha256 = stain_target_sha256(config.stain_target)  # "none" without a target
        self.num_workers = config.num_workers if config.num_workers is not None else default_num_workers(self.device)

    def _inference_model(self) -> torch.nn.Module:
        if self.device.type == "cuda":
            # A copy in half precision: half the memory traffic, and the caller's encoder stays fp32.
            return copy.deepcopy(self.encoder.model).to(self.device, self.dtype)
        model = self.encoder.model.to(self.device)
        if self.dtype == torch.bfloat16 and oneDNN_bf16_available():
            return pack_for_cpu_bf16(model)  # ~15% faster than autocast alone (see cpu_inference.py)
        return model

    @torch.inference_mode()
    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) patches → float32 (B, D) features on the CPU."""
        patches = patches.to(self.device, non_blocking=True)
        if self.normalizer is not None:
            patches = self.normalizer.normalize(patches)
        pixels = self.encoder.preprocess(patches, torch.float32)
        # Autocast keeps LayerNorm and softmax in float32 while matmuls run in bf16/fp16.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            features = self.model(pixels)
        return features.float().cpu()

    def decoder(self, slide: Slide) -> str:
        """`openslide` or `dct`: how this slide's patches are decoded (jpeg_tiles.choose_decoder)."""
        return choose_decoder(slide, self.config.patch_size, self.config.target_mpp, self.config.decoder)

    def settings(self, slide: Slide) -> dict:
        """The attributes that identify how a features file was made (see features.SETTINGS_ATTRS)."""
        return {
            "encoder": self.encoder.name, "encoder_weights_sha256": self.encoder.weights_sha256,
            "encoder_weights": self.encoder.weights_source, "stain_norm": self.config.stain_norm,
            "stain_target_sha256": self.stain_target_sha256,
            "patch_size": self.config.patch_size, "target_mpp": self.config.target_mpp, "level0_mpp": slide.mpp,
            "min_tissue": self.config.min_tissue, "precision": self.precision, "decoder": self.decoder(slide),
            "tissue_config": json.dumps(self.config.tissue.to_dict(), sort_keys=True),
            "slide_fingerprint": slide.fingerprint(), "version": FORMAT_VERSION,
        }

    def prepare(self, slide: Slide) -> tuple[TissueMask, PatchGrid]:
        """Segment tissue and lay the patch grid."""
        tissue = segment_tissue(slide, self.config.tissue)
        grid = patch_grid(slide, tissue, self.config.patch_size, self.config.target_mpp, self.config.min_tissue)
        return tissue, grid

    def iter_features(self, slide: Slide, grid: PatchGrid) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start index, float32 (B, D) features) batch by batch.

        With `slide.checkpoint` set (the app's loads), each batch is encoded in slices short enough to
        call it every `CHECKPOINT_SECONDS`: on a CPU one batch of a ViT-B/16 takes seconds.
        """
        reader = patch_reader(slide, grid, self.decoder(slide))
        loader = patch_loader(slide, grid, self.config.batch_size, self.num_workers, self.device.type == "cuda", reader)
        slicer = _Slicer(self.config.batch_size) if slide.checkpoint is not None else None
        try:
            for start, patches in loader:
                yield start, self.encode(patches) if slicer is None else slicer.encode(self.encode, patches,
                                                                                        slide.checkpoint)
        finally:
            reader.close()

    def extract(self, slide: Slide, out_dir: str | Path, progress: ProgressFn | None = None,
                prepared: tuple[TissueMask, PatchGrid] | None = None) -> SlideResult:
        """Extract one open slide into `out_dir/<slide_id>.h5` plus a tissue thumbnail."""
        started = time.perf_counter()
        out_dir = Path(out_dir)
        tissue, grid = prepared or self.prepare(slide)
        write_thumbnail(out_dir / "thumbnails" / f"{slide.slide_id}.png", slide, tissue)
        features = np.empty((len(grid), self.encoder.embed_dim), np.float16)
        done = 0
        for start, batch in self.iter_features(slide, grid):
            features[start : start + len(batch)] = batch.numpy()
            done += len(batch)
            if progress:
                progress(done, len(grid))
        width0, height0 = slide.dimensions
        attrs = self.settings(slide) | {
            "patch_size_level0": grid.patch_size_level0,
            "mpp_source": slide.mpp_source, "level0_width": width0, "level0_height": height0,
            "read_level": grid.read_level, "slide_id": slide.slide_id, "slide_path": str(slide.path),
            "encoder_is_random": self.encoder.is_random, "stain_target": self.config.stain_target or "none",
        }
        write_features(out_dir / f"{slide.slide_id}.h5", features, grid.coords, attrs)
        return SlideResult(slide.slide_id, slide.path, len(grid), time.perf_counter() - started, "extracted")


CHECKPOINT_SECONDS = 0.5  # most time between two checkpoints while encoding, when the caller asks for them


class _Slicer:
    """Encodes a batch in slices sized (from the measured rate) to take about `CHECKPOINT_SECONDS` each."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = self.size = batch_size

    def encode(self, encode: Callable[[torch.Tensor], torch.Tensor], patches: torch.Tensor,
               checkpoint: Callable[[], None]) -> torch.Tensor:
        pieces, begin = [], 0
        while begin < len(patches):  # the slice size adapts as it goes: no precomputed range
            checkpoint()
            started = time.perf_counter()
            piece = patches[begin:begin + self.size]
            pieces.append(encode(piece))
            begin += len(piece)
            per_patch = (time.perf_counter() - started) / len(piece)
            self.size = max(1, min(self.batch_size, int(CHECKPOINT_SECONDS / max(per_patch, 1e-6))))
        return torch.cat(pieces)


def write_thumbnail(path: Path, slide: Slide, tissue: TissueMask, long_side: int = 1024) -> None:
    """Save a slide thumbnail (about `long_side` px) with the tissue outline as PNG, atomically."""
    import cv2

    downsample = max(1.0, max(slide.dimensions) / long_side)
    if downsample >= tissue.downsample and tissue.thumbnail is not None:
        image, downsample = tissue.thumbnail, tissue.downsample  # the mask's image is fine enough
    else:
        image, downsample = slide.read_at_downsample(downsample)
    outlined = draw_tissue_outline(image, tissue, downsample)
    atomic_write_with(path, lambda tmp: _imwrite(tmp, cv2.cvtColor(outlined, cv2.COLOR_RGB2BGR)))


def _imwrite(path: Path, bgr: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), bgr):  # OpenCV reports a failed write by its return value only
        raise OSError(f"Could not write the image {path.name}")
