"""Tissue segmentation, CLAM-style: saturation at low resolution → median blur → Otsu → closing.

Deterministic (no randomness, no learned model); contours are filtered by physical area so the
same settings work at any scan resolution.

Two additions for real H&E, where CLAM's recipe loses tissue at the edge of a slide:
- Otsu splits the saturation histogram where it is emptiest, which on a slide of mostly dense tissue
  falls between pale and dense tissue, not between glass and tissue: very pale eosin stroma (saturation
  ~20 of 255 against ~80 for cellular tissue) went with the glass. The threshold is therefore capped a
  little above the glass's own saturation, measured on the slide's brightest pixels.
- Fat is empty vacuoles whose only stain is membranes a few µm thick; the median blur erases them, so a
  fat lobule at the edge of the tissue looked like glass. The unblurred stain is closed with a kernel the
  size of an adipocyte, which fills the cells of a membrane mesh but not the glass (dust is grey, not
  stained, and a few stained specks close into nothing larger than themselves).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from ..errors import NoTissueError
from .slide import Slide

logger = logging.getLogger(__name__)


@dataclass
class TissueConfig:
    """Settings of `segment_tissue`; saved beside every features file they produced."""

    seg_mpp: float = 8.0  # µm/px of the mask: 16 mask pixels per 256-px patch at 0.5 µm/px
    max_mask_side: int = 8192  # caps mask memory on very large slides
    median_kernel_um: float = 56.0  # median blur width, ≈ CLAM's 7 px at its usual resolution
    close_kernel_um: float = 32.0  # morphological closing, bridges small gaps inside tissue
    # Otsu picks a threshold even on empty glass; a floor keeps noise from becoming "tissue".
    min_saturation: int = 12
    # ...and a cap: at most this much above the glass's saturation (its brightest tenth's median), so pale
    # stroma counts as tissue even where Otsu splits pale from dense tissue. None: Otsu alone (CLAM).
    glass_margin: int | None = 8
    fat_cell_um: float = 100.0  # closes adipocytes up to this size whose membranes are their only stain; 0: off
    min_tissue_mm2: float = 0.05  # drop dust and debris smaller than this
    min_hole_mm2: float = 0.02  # holes (lumina, fat, tears) smaller than this are filled
    max_holes: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TissueMask:
    """A binary tissue mask at low resolution, with its contours in level-0 coordinates."""

    mask: np.ndarray  # (H, W) bool, at `downsample`× below level 0
    downsample: float  # level-0 pixels per mask pixel
    contours: list[np.ndarray]  # each (P, 2) int64, level-0 (x, y), outer tissue boundaries
    holes: list[list[np.ndarray]] = field(default_factory=list)  # per contour, its kept holes
    threshold: int = 0  # saturation threshold used (0–255)
    thumbnail: np.ndarray | None = None  # (H, W, 3) uint8 RGB the mask was computed on

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area that is tissue."""
        return float(self.mask.mean())


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def segment_tissue(slide: Slide, config: TissueConfig | None = None) -> TissueMask:
    """Find tissue on a slide; raises `NoTissueError` when there is none."""
    config = config or TissueConfig()
    width0, height0 = slide.dimensions
    downsample = max(config.seg_mpp / slide.mpp, max(width0, height0) / config.max_mask_side, 1.0)
    image, downsample = slide.read_at_downsample(downsample)
    mask_mpp = slide.mpp * downsample
    mask, threshold = _threshold_saturation(image, config, mask_mpp)
    contours, holes = _filter_contours(mask, config, mask_mpp)
    if not contours:
        raise NoTissueError(
            f"No tissue found on {slide.path} (saturation threshold {threshold}); check that the slide "
            "is not blank or that --min-saturation is not too high."
        )
    clean = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(clean, contours, -1, 1, thickness=cv2.FILLED)
    for contour_holes in holes:
        cv2.drawContours(clean, contour_holes, -1, 0, thickness=cv2.FILLED)
    scale = np.array([width0 / mask.shape[1], height0 / mask.shape[0]])
    to_level0 = lambda c: np.round(c.reshape(-1, 2) * scale).astype(np.int64)  # noqa: E731
    logger.info("%s: %d tissue regions, %.1f%% of the slide, threshold %d", slide.slide_id,
                len(contours), 100 * clean.mean(), threshold)
    return TissueMask(
        mask=clean.astype(bool), downsample=downsample,
        contours=[to_level0(c) for c in contours],
        holes=[[to_level0(h) for h in hs] for hs in holes], threshold=threshold, thumbnail=image,
    )


def _threshold_saturation(image: np.ndarray, config: TissueConfig, mask_mpp: float) -> tuple[np.ndarray, int]:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    raw = hsv[..., 1]
    saturation = cv2.medianBlur(raw, min(_odd(config.median_kernel_um / mask_mpp), 255))
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = int(otsu)
    if config.glass_margin is not None:
        threshold = min(threshold, _glass_saturation(raw, hsv[..., 2]) + config.glass_margin)
    threshold = max(threshold, config.min_saturation)
    mask = (saturation > threshold).astype(np.uint8)
    if config.fat_cell_um > 0:
        cell = _odd(config.fat_cell_um / mask_mpp)
        if cell >= 3:  # below that the median blur has not erased the membranes
            # Padded with glass: OpenCV's erosion counts the outside of the image as tissue, which glued anything
            # within half a cell of the slide's edge to that edge.
            stained = cv2.copyMakeBorder((raw > threshold).astype(np.uint8), cell, cell, cell, cell,
                                         cv2.BORDER_CONSTANT, value=0)
            mesh = cv2.morphologyEx(stained, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cell, cell)))
            # what the closing made of lone stained pixels (a coloured speck, noise) goes again
            mesh = cv2.morphologyEx(mesh, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
            mask |= mesh[cell:-cell, cell:-cell]
    k = max(1, int(round(config.close_kernel_um / mask_mpp)))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    return mask, threshold


def _glass_saturation(saturation: np.ndarray, value: np.ndarray) -> int:
    """The glass's saturation: the median over the brightest tenth of the slide (glass, or the palest tissue
    when there is hardly any glass, which only raises the cap back towards Otsu's threshold)."""
    bright = value >= np.percentile(value, 90)
    return int(np.median(saturation[bright]))


def _filter_contours(mask: np.ndarray, config: TissueConfig, mask_mpp: float):
    """Keep tissue contours and their holes above the minimum physical areas (CLAM's filter)."""
    px_per_mm2 = (1000.0 / mask_mpp) ** 2
    min_tissue = config.min_tissue_mm2 * px_per_mm2
    min_hole = config.min_hole_mm2 * px_per_mm2
    found, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return [], []
    hierarchy = hierarchy[0]  # (n, 4): next, previous, first child, parent
    children: dict[int, list[np.ndarray]] = {}
    for j, parent in enumerate(hierarchy[:, 3]):
        if parent != -1:
            children.setdefault(int(parent), []).append(found[j])
    kept, kept_holes = [], []
    for i, contour in enumerate(found):
        if hierarchy[i][3] != -1:
            continue  # a hole; handled with its parent
        holes = children.get(i, [])
        holes = sorted((h for h in holes if cv2.contourArea(h) >= min_hole), key=cv2.contourArea, reverse=True)
        holes = holes[: config.max_holes]
        area = cv2.contourArea(contour) - sum(cv2.contourArea(h) for h in holes)
        if area >= min_tissue:
            kept.append(contour)
            kept_holes.append(holes)
    return kept, kept_holes


def draw_tissue_outline(
    image: np.ndarray, tissue: TissueMask, downsample: float, colour: tuple[int, int, int] = (0, 160, 60),
) -> np.ndarray:
    """Draw tissue contours (and holes, dashed colour) on a copy of a thumbnail at `downsample`×."""
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, round(max(out.shape[:2]) / 500))
    scaled = [np.round(c / downsample).astype(np.int32).reshape(-1, 1, 2) for c in tissue.contours]
    cv2.drawContours(out, scaled, -1, colour, thickness, cv2.LINE_AA)
    hole_colour = (30, 90, 220)
    for holes in tissue.holes:
        scaled_holes = [np.round(h / downsample).astype(np.int32).reshape(-1, 1, 2) for h in holes]
        cv2.drawContours(out, scaled_holes, -1, hole_colour, thickness, cv2.LINE_AA)
    return out
