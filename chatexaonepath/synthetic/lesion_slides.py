"""Synthetic slides of an organ's normal tissue carrying small lesions, with the lesion mask known.

The hard case of slide-level pathology is a small focus in a large section (CAMELYON16's
micrometastases): a slide-level model must find a few patches among many. Each organ has its own
background texture; each lesion type its own colour and architecture, drawn at two grades (high
grade: larger, denser, more pleomorphic nuclei). The lesion mask is returned with the image, so the
attention a model puts on each patch can be scored against where the lesion really is.

The textures are made so that even a *random* ViT-B/16 tells them apart (the EXAONEPath weights are
not available offline): they differ in colour and nuclear density, which random features keep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .slides import BACKGROUND_RGB, TissueStyle, _draw_texture, _smooth_noise, _tissue_shape, write_pyramidal_tiff

logger = logging.getLogger(__name__)

MASK_DOWNSAMPLE = 8  # the stored lesion mask is 1/8 of level 0 (a patch of 256 px is 32 mask pixels)


@dataclass(frozen=True)
class OrganStyle:
    """The normal tissue of one organ: a base texture and, for some organs, an extra pattern."""

    base: TissueStyle
    pattern: str  # "glands" (colon), "cords" (liver), "follicles" (lymph node)


ORGAN_STYLES: dict[str, OrganStyle] = {
    # Colon mucosa: pink lamina propria, regular crypts lined by small uniform nuclei.
    "colon": OrganStyle(TissueStyle((232, 165, 200), (85, 45, 140), 1800, (6.0, 8.0), 1.2, "glandular"), "glands"),
    # Liver: plates of pink-brown hepatocytes with round central nuclei, pale sinusoids between them.
    "liver": OrganStyle(TissueStyle((222, 150, 160), (95, 55, 120), 1400, (7.0, 9.0), 1.05, "solid"), "cords"),
    # Lymph node: dense small lymphocytes, paler germinal centres.
    "lymph node": OrganStyle(TissueStyle((205, 150, 205), (60, 40, 125), 6500, (5.0, 6.5), 1.05, "solid"),
                             "follicles"),
}


@dataclass(frozen=True)
class LesionStyle:
    """One lesion type at one grade."""

    base: TissueStyle
    pattern: str  # "glands" (adenocarcinoma), "pearls" (squamous), "pigment" (melanoma)


def _lesion(stroma, nucleus, density, size, elongation, pattern) -> LesionStyle:
    return LesionStyle(TissueStyle(stroma, nucleus, density, size, elongation, "solid"), pattern)


LESION_STYLES: dict[tuple[str, str], LesionStyle] = {
    # Adenocarcinoma: crowded, dark purple, back-to-back irregular glands; high grade is solid and darker.
    ("adenocarcinoma", "low"): _lesion((175, 95, 165), (55, 20, 105), 6000, (9.0, 13.0), 1.4, "glands"),
    ("adenocarcinoma", "high"): _lesion((150, 70, 150), (40, 10, 90), 11000, (12.0, 19.0), 1.5, "glands"),
    # Squamous cell carcinoma: bright orange-pink keratinising sheets with keratin pearls.
    ("squamous cell carcinoma", "low"): _lesion((245, 135, 110), (120, 50, 110), 2000, (9.0, 12.0), 1.2, "pearls"),
    ("squamous cell carcinoma", "high"): _lesion((235, 115, 100), (90, 30, 100), 5500, (13.0, 20.0), 1.4, "pearls"),
    # Melanoma: brown melanin pigment in sheets of cells; high grade denser, larger nuclei.
    ("melanoma", "low"): _lesion((160, 115, 80), (70, 40, 60), 3000, (8.0, 11.0), 1.2, "pigment"),
    ("melanoma", "high"): _lesion((125, 85, 55), (45, 25, 45), 7500, (12.0, 18.0), 1.4, "pigment"),
}

ORGANS = tuple(ORGAN_STYLES)
LESION_TYPES = tuple(dict.fromkeys(kind for kind, _ in LESION_STYLES))
GRADES = ("low", "high")


@dataclass(frozen=True)
class LesionSpec:
    """What to draw: an organ, and optionally a lesion of a type and grade covering a fraction of the tissue."""

    organ: str
    lesion: str | None = None  # None: normal tissue only
    grade: str | None = None
    fraction: float = 0.02  # lesion area / tissue area
    foci: int = 1  # the lesion's area split over this many separate foci
    margin_involved: bool = False  # a focus touches the edge of the section (the resection margin)

    def __post_init__(self) -> None:
        if self.organ not in ORGAN_STYLES:
            raise ValueError(f"unknown organ {self.organ!r}; choose one of {', '.join(ORGANS)}")
        if self.lesion is not None and (self.lesion, self.grade) not in LESION_STYLES:
            raise ValueError(f"unknown lesion {self.lesion!r} of grade {self.grade!r}; lesions: "
                             f"{', '.join(LESION_TYPES)}; grades: {', '.join(GRADES)}")
        if self.lesion is not None and not 0.0 < self.fraction < 0.5:
            raise ValueError(f"lesion fraction must be between 0 and 0.5, got {self.fraction}")
        if self.foci < 1:
            raise ValueError(f"foci must be at least 1, got {self.foci}")


def _draw_pattern(canvas: np.ndarray, rng: np.random.Generator, pattern: str, style: TissueStyle,
                  region: np.ndarray, mpp: float) -> None:
    """The organ- or lesion-specific architecture, drawn before the nuclei."""
    h, w = region.shape
    px = 1.0 / mpp
    area_mm2 = max(region.sum(), 1) * (mpp / 1000.0) ** 2
    centres = lambda n: zip(rng.integers(0, w, n), rng.integers(0, h, n))  # noqa: E731
    if pattern == "cords":  # pale sinusoids: short thin lines between plates of hepatocytes
        for x, y in centres(int(area_mm2 * 900)):
            length, angle = rng.uniform(30, 70) * px, rng.uniform(0, np.pi)
            end = (int(x + length * np.cos(angle)), int(y + length * np.sin(angle)))
            cv2.line(canvas, (int(x), int(y)), end, (240, 215, 225), max(1, int(2.5 * px)), cv2.LINE_AA)
    elif pattern == "follicles":  # paler germinal centres in the sea of lymphocytes
        for x, y in centres(max(1, int(area_mm2 * 6))):
            cv2.circle(canvas, (int(x), int(y)), int(rng.uniform(80, 150) * px), (215, 175, 215), -1, cv2.LINE_AA)
    elif pattern == "glands":  # irregular, crowded malignant glands: dark rims, small lumens
        for x, y in centres(int(area_mm2 * 300)):
            axes = (int(rng.uniform(15, 35) * px), int(rng.uniform(8, 20) * px))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(canvas, (int(x), int(y)), axes, angle, 0, 360, style.nucleus_rgb, max(2, int(5 * px)))
            inner = (max(1, axes[0] - int(5 * px)), max(1, axes[1] - int(5 * px)))
            cv2.ellipse(canvas, (int(x), int(y)), inner, angle, 0, 360, (240, 225, 240), -1)
    elif pattern == "pearls":  # keratin pearls: concentric eosinophilic whorls
        for x, y in centres(int(area_mm2 * 120)):
            r = int(rng.uniform(15, 35) * px)
            for k, shade in enumerate((1.05, 0.92, 1.08, 0.95)):
                colour = tuple(int(min(255, c * shade)) for c in style.stroma_rgb)
                cv2.circle(canvas, (int(x), int(y)), max(1, r - k * int(r / 4)), colour, -1, cv2.LINE_AA)
    elif pattern == "pigment":  # coarse brown-black melanin granules
        count = int(area_mm2 * 20000)
        xs, ys = rng.integers(0, w, count), rng.integers(0, h, count)
        shades = rng.uniform(0.35, 0.7, count)
        for x, y, k in zip(xs, ys, shades):
            colour = (int(110 * k), int(70 * k), int(35 * k))
            cv2.circle(canvas, (int(x), int(y)), max(1, int(rng.uniform(1.0, 2.5) * px)), colour, -1)
    _draw_texture(canvas, rng, style, region, mpp)


def _render_texture(rng: np.random.Generator, style: TissueStyle, pattern: str, region: np.ndarray,
                    mpp: float) -> np.ndarray:
    """A texture canvas the size of `region` (only `region` matters), with mid-frequency shading."""
    h, w = region.shape
    shade = (0.9 + 0.15 * _smooth_noise(rng, (h, w), max(8, int(60 / mpp)))).astype(np.float32)
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = style.stroma_rgb
    canvas = np.clip(canvas * shade[..., None], 0, 255).astype(np.uint8)
    _draw_pattern(canvas, rng, pattern, style, region, mpp)
    return canvas


def _edge_distance(tissue: np.ndarray) -> np.ndarray:
    """Distance in pixels from each tissue pixel to the edge of the section (the margin)."""
    padded = np.pad(tissue.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


LESION_GRID = 4  # the lesion outline is planned on a grid 4× coarser than level 0, then upsampled smoothly


def lesion_mask(rng: np.random.Generator, tissue: np.ndarray, spec: LesionSpec) -> np.ndarray:
    """Where the lesion is: `spec.foci` blobs inside the tissue covering `spec.fraction` of it in total."""
    h, w = tissue.shape
    small = cv2.resize(tissue.astype(np.uint8), (w // LESION_GRID, h // LESION_GRID),
                       interpolation=cv2.INTER_NEAREST).astype(bool)
    per_focus = max(1, int(round(spec.fraction * small.sum() / spec.foci)))
    radius = np.sqrt(per_focus / np.pi)
    edge = _edge_distance(small)
    field = np.full(small.shape, -np.inf, np.float32)
    taken = np.zeros_like(small)
    yy, xx = np.mgrid[0 : small.shape[0], 0 : small.shape[1]].astype(np.float32)
    noise = _smooth_noise(rng, small.shape, max(4, int(radius / 2)))
    for focus in range(spec.foci):
        if spec.margin_involved and focus == 0:  # centred just inside the edge, so it reaches the margin
            candidates = (edge > 0.3 * radius) & (edge < 0.6 * radius)
        else:  # well inside: a clear margin of at least one lesion radius
            candidates = edge > 2.2 * radius
        if focus:  # apart from the foci already placed
            candidates &= ~cv2.dilate(taken.astype(np.uint8), np.ones((3, 3), np.uint8),
                                      iterations=max(1, int(radius))).astype(bool)
        ys, xs = np.nonzero(candidates)
        if not len(ys):
            raise ValueError(f"no room for a lesion of {spec.fraction:.1%} of the tissue; draw a larger slide")
        pick = int(rng.integers(len(ys)))
        cy, cx = float(ys[pick]), float(xs[pick])
        stretch, angle = rng.uniform(1.0, 1.6), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        raw = 1.0 - np.sqrt((u / stretch) ** 2 + (v * stretch) ** 2) / radius + 0.5 * (noise - 0.5)
        inside = np.where(small & ~taken, raw, -np.inf).ravel()  # the area is counted on tissue only
        threshold = np.partition(inside, inside.size - per_focus)[inside.size - per_focus]
        # Unmasked, so that upsampling does not pull the outline back from the edge of the section.
        field = np.maximum(field, raw - threshold)  # 0 on this focus's outline
        taken |= small & (raw >= threshold)
    # Upsampling the smooth field (not the mask) gives a smooth outline at level 0.
    return (cv2.resize(field.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0) & tissue


def render_lesion_image(spec: LesionSpec, size: tuple[int, int] = (3072, 3072), mpp: float = 0.5, seed: int = 0,
                        coverage: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB image H×W×3 uint8, tissue mask H×W bool, lesion mask H×W bool) of one synthetic slide."""
    width, height = size
    rng = np.random.default_rng(seed)
    tissue = _tissue_shape(rng, (height, width), coverage)
    organ = ORGAN_STYLES[spec.organ]
    image = _render_texture(rng, organ.base, organ.pattern, tissue, mpp)
    image[~tissue] = BACKGROUND_RGB
    lesion = np.zeros_like(tissue)
    if spec.lesion is not None:
        lesion = lesion_mask(rng, tissue, spec)
        style = LESION_STYLES[(spec.lesion, spec.grade)]
        count, labels, stats, _ = cv2.connectedComponentsWithStats(lesion.astype(np.uint8))
        for component in range(1, count):  # each focus drawn in its own box: densities stay per area
            x, y, bw, bh = stats[component, :4]
            box = labels[y : y + bh, x : x + bw] == component
            # Drawn over the organ's tissue, not blended with it: a lesion that let the organ show through
            # (tried at 75 % opacity) was too faint for the tower to learn to find in phase 1.
            texture = _render_texture(rng, style.base, style.pattern, np.ones_like(box), mpp)
            image[y : y + bh, x : x + bw][box] = texture[box]
    noise = (rng.standard_normal((height, width, 1), dtype=np.float32) * 3.0).astype(np.int16)
    return np.clip(image + noise, 0, 255).astype(np.uint8), tissue, lesion


def downsample_mask(mask: np.ndarray, factor: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """A boolean mask shrunk by `factor` into uint8 lesion fractions (255: all lesion, 0: none, >0 if any)."""
    h, w = mask.shape
    padded = np.pad(mask, ((0, -h % factor), (0, -w % factor))).astype(np.float32)
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).mean(axis=(1, 3))
    return np.where(blocks > 0, np.maximum(1, np.rint(blocks * 255)), 0).astype(np.uint8)


def make_lesion_slide(path: str | Path, spec: LesionSpec, size: tuple[int, int] = (3072, 3072), mpp: float = 0.5,
                      seed: int = 0, coverage: float = 0.6) -> tuple[Path, np.ndarray]:
    """Write a pyramidal TIFF of `spec`; returns its path and the lesion mask at 1/MASK_DOWNSAMPLE of level 0."""
    image, _, lesion = render_lesion_image(spec, size, mpp, seed, coverage)
    return write_pyramidal_tiff(path, image, mpp), downsample_mask(lesion)


def patch_lesion_coverage(coords: np.ndarray, patch_size_level0: int, mask: np.ndarray,
                          downsample: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """For each patch (level-0 top-left `coords`), the fraction of it that is lesion (`mask`: uint8 fractions
    at 1/`downsample` of level 0, as `downsample_mask` makes them; > 0 whenever the patch overlaps the lesion)."""
    fraction = np.asarray(mask, np.float32) / 255.0
    coverage = np.zeros(len(coords), np.float64)
    for i, (x, y) in enumerate(np.asarray(coords, np.int64)):
        x0, y0 = x // downsample, y // downsample
        x1, y1 = -(-(x + patch_size_level0) // downsample), -(-(y + patch_size_level0) // downsample)
        block = fraction[y0:y1, x0:x1]
        coverage[i] = float(block.mean()) if block.size else 0.0
    return coverage
