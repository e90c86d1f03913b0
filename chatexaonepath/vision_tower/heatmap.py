"""Attention heatmaps: what the model looked at, drawn over the slide thumbnail.

Callers pass the projector's pooling weights softmax(q·k/√d + a) — what the visual tokens were made
from (`ChatSession`'s `LoadedSlide.attention`) — or CLAM's softmax(a) as a second view; before
training the two are equal, after it they are not.

Each patch is a square coloured by its attention with a perceptual colormap (viridis by default),
on one of three scales: by rank, as CLAM does, so that a few dominant patches do not flatten the rest
(but weights that are all equal still span the whole colormap); by weight from zero to the largest
("weight": equal weights look equal, a patch twice as heavy is twice as far up the map); or linearly
between the smallest and the largest weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from .slide import Slide

COLORMAPS = {"viridis": cv2.COLORMAP_VIRIDIS, "inferno": cv2.COLORMAP_INFERNO, "magma": cv2.COLORMAP_MAGMA,
             "plasma": cv2.COLORMAP_PLASMA, "cividis": cv2.COLORMAP_CIVIDIS, "turbo": cv2.COLORMAP_TURBO}


@dataclass
class AttendedPatch:
    """One of the most-attended patches: its full-resolution crop, level-0 position and score."""

    image: Image.Image
    coord: tuple[int, int]
    attention: float
    rank: int


def _as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _patch_side(coords: np.ndarray, patch_size_level0: int | None) -> int:
    if patch_size_level0:
        return int(patch_size_level0)
    # Grid coordinates are multiples of the patch side: the smallest non-zero step is that side.
    steps = np.concatenate([np.diff(np.unique(coords[:, 0])), np.diff(np.unique(coords[:, 1]))])
    steps = steps[steps > 0]
    if not len(steps):
        raise ValueError("cannot infer the patch size from a single coordinate; pass patch_size_level0")
    return int(steps.min())


SCALES = ("rank", "weight", "linear")


def attention_to_unit(attention: np.ndarray, scale: str = "rank") -> np.ndarray:
    """Map scores to [0, 1]: by rank (percentile, robust to outliers), by weight (score / the largest score:
    proportional, so equal scores map to one colour), or linearly between min and max."""
    if scale == "weight":
        high = float(attention.max()) if len(attention) else 0.0
        return np.clip(attention / high, 0.0, 1.0) if high > 0 else np.zeros_like(attention, dtype=np.float64)
    if scale == "rank":
        order = attention.argsort(kind="stable")
        ranks = np.empty(len(attention), np.float64)
        ranks[order] = np.arange(len(attention))
        return ranks / max(len(attention) - 1, 1)
    if scale == "linear":
        low, high = float(attention.min()), float(attention.max())
        return (attention - low) / (high - low) if high > low else np.zeros_like(attention, dtype=np.float64)
    raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")


def render_heatmap(
    slide: Slide, coords: torch.Tensor | np.ndarray, attention: torch.Tensor | np.ndarray, *,
    patch_size_level0: int | None = None, opacity: float = 0.5, colormap: str = "viridis",
    scale: str = "rank", max_side: int = 1024,
) -> Image.Image:
    """The slide thumbnail (about `max_side` px) with each patch tinted by its attention."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    thumbnail, downsample = slide.read_at_downsample(max(1.0, max(slide.dimensions) / max_side))
    colours, covered = heatmap_layer(thumbnail.shape[:2], downsample, coords, attention,
                                     patch_size_level0=patch_size_level0, colormap=colormap, scale=scale)
    blended = cv2.addWeighted(thumbnail, 1.0 - opacity, colours, opacity, 0.0)
    return Image.fromarray(np.where(covered[..., None], blended, thumbnail))


def heatmap_layer(
    shape: tuple[int, int], downsample: float, coords: torch.Tensor | np.ndarray,
    attention: torch.Tensor | np.ndarray, *, patch_size_level0: int | None = None, colormap: str = "viridis",
    scale: str = "rank",
) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap's colours for a thumbnail of `shape` at `downsample`× below level 0: (H, W, 3) uint8 RGB and
    the (H, W) bool mask of the pixels inside a patch (the rest is not coloured)."""
    coords, attention = _as_numpy(coords).astype(np.int64), _as_numpy(attention).reshape(-1)
    if coords.shape != (len(attention), 2):
        raise ValueError(f"{len(attention)} attention scores for coords of shape {coords.shape}")
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    side0 = _patch_side(coords, patch_size_level0)
    values = np.zeros(shape, np.float32)
    covered = np.zeros(shape, bool)
    unit = attention_to_unit(attention, scale)
    for (x, y), value in zip(coords, unit):
        x0, y0 = int(x / downsample), int(y / downsample)
        x1, y1 = max(x0 + 1, int((x + side0) / downsample)), max(y0 + 1, int((y + side0) / downsample))
        values[y0:y1, x0:x1] = value
        covered[y0:y1, x0:x1] = True
    colours = cv2.applyColorMap(np.round(values * 255).astype(np.uint8), COLORMAPS[colormap])
    return cv2.cvtColor(colours, cv2.COLOR_BGR2RGB), covered


def top_attended_patches(
    slide: Slide, coords: torch.Tensor | np.ndarray, attention: torch.Tensor | np.ndarray, k: int = 8, *,
    patch_size_level0: int | None = None, size: int = 256,
) -> list[AttendedPatch]:
    """The `k` most-attended patches read from level 0 and resized to `size` px, highest first."""
    coords, attention = _as_numpy(coords).astype(np.int64), _as_numpy(attention).reshape(-1)
    side0 = _patch_side(coords, patch_size_level0)
    best = np.argsort(-attention, kind="stable")[:k]
    patches = []
    for rank, index in enumerate(best, start=1):
        x, y = (int(v) for v in coords[index])
        crop = slide.read_region((x, y), 0, (side0, side0))
        if side0 != size:
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if side0 > size else cv2.INTER_CUBIC)
        patches.append(AttendedPatch(Image.fromarray(crop), (x, y), float(attention[index]), rank))
    return patches
