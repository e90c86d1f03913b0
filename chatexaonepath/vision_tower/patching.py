"""The patch grid: non-overlapping patches of `patch_size` px at a target µm/px, inside tissue.

Coordinates are level-0 top-left (x, y), the CLAM/TRIDENT convention. The grid is anchored at the
level-0 origin so that, on tiled slides, reads line up with tile boundaries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import BudgetExceededError, NoTissueError, SlideError
from .slide import Slide
from .tissue import TissueMask

logger = logging.getLogger(__name__)

# Patches enlarged more than this from a coarse scan carry no detail the encoder was trained on.
MAX_UPSAMPLE = 4.0
GRID_BAND_CELLS = 1 << 20  # grid cells scored at once while counting patches against the budget


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
    max_patches: int | None = None,
) -> PatchGrid:
    """Lay a grid of `patch_size`-px patches at `mpp` µm/px over the slide; keep those ≥ `min_tissue`.

    More than `max_patches` kept patches (default: the slide's `limits.max_patches`) raises
    `BudgetExceededError` before any patch is read; the grid is scanned in bands, so its memory
    never exceeds a band plus the patches kept.
    """
    if patch_size < 16:
        raise ValueError(f"patch_size must be at least 16 px, got {patch_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")
    scale = mpp / slide.mpp
    if scale * MAX_UPSAMPLE < 1:
        raise SlideError(f"{slide.path} is scanned at {slide.mpp:.3g} µm/px, more than {MAX_UPSAMPLE:g}× coarser "
                         f"than the patches' {mpp:g} µm/px: each patch would be enlarged from "
                         f"{patch_size * scale:.0f} px; check the slide's µm/px.")
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
    if max_patches is None:
        max_patches = getattr(getattr(slide, "limits", None), "max_patches", None)
    coords, fraction = _tissue_patches(slide, tissue, xs, ys, size0, max(min_tissue, 1e-6), max_patches, mpp)
    if not len(coords):
        raise NoTissueError(f"No patch of {slide.path} has at least {min_tissue:.0%} tissue; "
                            "lower --min-tissue or check the tissue mask thumbnail.")
    logger.info("%s: %d of %d grid patches kept (%d px at %.3g µm/px = %d px at level %d)",
                slide.slide_id, len(coords), len(xs) * len(ys), patch_size, mpp, read_size, read_level)
    return PatchGrid(
        coords=coords, tissue_fraction=fraction, patch_size=patch_size,
        patch_size_level0=size0, target_mpp=mpp, level0_mpp=slide.mpp, read_level=read_level,
        read_size=read_size,
    )


def read_geometry(slide: Slide, patch_size: int, mpp: float) -> tuple[int, int, int]:
    """(patch side in level-0 px, pyramid level to read, side read at that level) for `patch_size` px at `mpp`."""
    scale = mpp / slide.mpp
    size0 = max(1, int(round(patch_size * scale)))
    read_level = slide.best_level_for_downsample(scale)
    return size0, read_level, max(1, int(round(size0 / slide.level_downsamples[read_level])))


def _tissue_patches(slide: Slide, tissue: TissueMask, xs: np.ndarray, ys: np.ndarray, size0: int,
                    min_tissue: float, max_patches: int | None, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Coords (K, 2) and tissue fractions (K,) of the grid patches with enough tissue, band by band.

    Stops as soon as more than `max_patches` are kept: a crafted size or µm/px cannot make this
    allocate the whole grid (a 100k² image at 50 µm/px would need 17.8 GB of coordinates).
    """
    dims0 = slide.dimensions
    integral = cv2.integral(tissue.mask.astype(np.uint8))  # int32 is exact: a mask has < 2³¹ pixels
    rows_per_band = max(1, GRID_BAND_CELLS // len(xs))
    kept_coords, kept_fraction, kept = [], [], 0
    for top in range(0, len(ys), rows_per_band):
        band_x, band_y = np.meshgrid(xs, ys[top:top + rows_per_band])
        coords = np.stack([band_x.ravel(), band_y.ravel()], axis=1)
        fraction = _tissue_fraction(tissue, coords, size0, dims0, integral)
        keep = fraction >= min_tissue
        kept_coords.append(coords[keep])
        kept_fraction.append(fraction[keep].astype(np.float32))
        kept += int(keep.sum())
        if max_patches and kept > max_patches:
            scanned = min(len(ys), top + rows_per_band) * len(xs)
            estimate = kept * len(xs) * len(ys) / scanned
            raise BudgetExceededError(
                f"{slide.path} has about {estimate:,.0f} tissue patches at {mpp:g} µm/px, more than the "
                f"{max_patches:,} allowed per slide (--max-patches-per-slide); check its µm/px "
                f"({slide.mpp:.3g}) or raise the limit.")
    return np.concatenate(kept_coords), np.concatenate(kept_fraction)


def _tissue_fraction(tissue: TissueMask, coords: np.ndarray, size0: int, dims0: tuple[int, int],
                     integral: np.ndarray | None = None) -> np.ndarray:
    """Tissue share of each patch footprint, from a summed-area table of the mask (O(1) per patch)."""
    mask_h, mask_w = tissue.mask.shape
    sx, sy = mask_w / dims0[0], mask_h / dims0[1]
    if integral is None:
        integral = cv2.integral(tissue.mask.astype(np.uint8))  # (H+1, W+1) int32
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
