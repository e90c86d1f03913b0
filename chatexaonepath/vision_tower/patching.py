"""The patch grid: non-overlapping patches of `patch_size` px at a target µm/px, inside tissue.

Coordinates are level-0 top-left (x, y), the CLAM/TRIDENT convention. The grid is anchored at the
level-0 origin so that, on tiled slides, reads line up with tile boundaries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import NoTissueError
from .slide import Slide
from .tissue import TissueMask

logger = logging.getLogger(__name__)


@dataclass
class PatchGrid:
    """Where to read patches and how: coordinates plus the level and size of each read."""

    coords: np.ndarray  # (N, 2) int64, level-0 top-left (x, y)
    tissue_fraction: np.ndarray  # (N,) float32, tissue share of each patch
    patch_size: int  # output pixels per side, at `target_mpp`
    patch_size_level0: int  # level-0 pixels per side
    target_mpp: float
    level0_mpp: float
    read_level: int  # pyramid level read from
    read_size: int  # pixels per side read at `read_level`, then resized to `patch_size`

    def __len__(self) -> int:
        return len(self.coords)


def patch_grid(
    slide: Slide, tissue: TissueMask, patch_size: int = 256, mpp: float = 0.5, min_tissue: float = 0.25,
) -> PatchGrid:
    """Lay a grid of `patch_size`-px patches at `mpp` µm/px over the slide; keep those ≥ `min_tissue`."""
    if patch_size < 16:
        raise ValueError(f"patch_size must be at least 16 px, got {patch_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")
    scale = mpp / slide.mpp
    if scale < 0.9:
        logger.warning("%s is scanned at %.3g µm/px, coarser than the target %.3g: patches are upsampled.",
                       slide.slide_id, slide.mpp, mpp)
    size0, read_level, read_size = read_geometry(slide, patch_size, mpp)
    width0, height0 = slide.dimensions
    xs = np.arange(0, width0 - size0 + 1, size0, dtype=np.int64)
    ys = np.arange(0, height0 - size0 + 1, size0, dtype=np.int64)
    if len(xs) == 0 or len(ys) == 0:
        raise NoTissueError(f"{slide.path} ({width0}×{height0} px) is smaller than one patch "
                            f"({size0} px at level 0).")
    grid_x, grid_y = np.meshgrid(xs, ys)
    coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    fraction = _tissue_fraction(tissue, coords, size0, (width0, height0))
    keep = fraction >= max(min_tissue, 1e-6)
    if not keep.any():
        raise NoTissueError(f"No patch of {slide.path} has at least {min_tissue:.0%} tissue; "
                            "lower --min-tissue or check the tissue mask thumbnail.")
    logger.info("%s: %d of %d grid patches kept (%d px at %.3g µm/px = %d px at level %d)",
                slide.slide_id, keep.sum(), len(coords), patch_size, mpp, read_size, read_level)
    return PatchGrid(
        coords=coords[keep], tissue_fraction=fraction[keep].astype(np.float32), patch_size=patch_size,
        patch_size_level0=size0, target_mpp=mpp, level0_mpp=slide.mpp, read_level=read_level,
        read_size=read_size,
    )


def read_geometry(slide: Slide, patch_size: int, mpp: float) -> tuple[int, int, int]:
    """(patch side in level-0 px, pyramid level to read, side read at that level) for `patch_size` px at `mpp`."""
    scale = mpp / slide.mpp
    size0 = max(1, int(round(patch_size * scale)))
    read_level = slide.best_level_for_downsample(scale)
    return size0, read_level, max(1, int(round(size0 / slide.level_downsamples[read_level])))


def _tissue_fraction(tissue: TissueMask, coords: np.ndarray, size0: int, dims0: tuple[int, int]) -> np.ndarray:
    """Tissue share of each patch footprint, from a summed-area table of the mask (O(1) per patch)."""
    mask = tissue.mask.astype(np.uint8)
    mask_h, mask_w = mask.shape
    sx, sy = mask_w / dims0[0], mask_h / dims0[1]
    integral = cv2.integral(mask).astype(np.int64)  # (H+1, W+1)
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(np.int64), 0, mask_w)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(np.int64), 0, mask_h)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) * sx).astype(np.int64), 0, mask_w)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) * sy).astype(np.int64), 0, mask_h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area


def read_patch(slide: Slide, grid: PatchGrid, x: int, y: int) -> np.ndarray:
    """Read one patch at level-0 (x, y) and resize it to `grid.patch_size`; RGB uint8 (S, S, 3)."""
    patch = slide.read_region((int(x), int(y)), grid.read_level, (grid.read_size, grid.read_size))
    if grid.read_size != grid.patch_size:
        # INTER_AREA averages when shrinking (no aliasing); cubic when a coarse scan must be enlarged.
        interp = cv2.INTER_AREA if grid.read_size > grid.patch_size else cv2.INTER_CUBIC
        patch = cv2.resize(patch, (grid.patch_size, grid.patch_size), interpolation=interp)
    return patch
