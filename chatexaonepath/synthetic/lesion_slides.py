"""Synthetic H&E slides of an organ's normal tissue carrying a small lesion told apart by morphology, not colour.

The hard case of slide-level pathology is a small focus in a large section (CAMELYON16's
micrometastases): a slide-level model must find a few patches among many and read them. Here the
lesion is defined the way a pathologist defines it — nuclear size, density and pleomorphism, and
architecture (malignant glands; squamous nests with keratin pearls and intercellular bridges; sheets of
epithelioid cells with prominent nucleoli) — and drawn in the organ's own palette:

- everything is painted as haematoxylin and eosin *concentrations* and turned into RGB by Beer–Lambert
  with the slide's own stain vectors, so every slide has its own stain and scanner look (perturbed stain
  vectors and concentrations, uneven section thickness, blur, JPEG quality);
- inside the lesion, the haematoxylin and eosin concentrations are quantile-matched to the surrounding
  normal tissue's, so a lesion patch has the colour statistics of a normal one; only its arrangement
  differs (melanin is drawn on a third of melanomas only, sparse: never the only cue);
- the lesion's edge interdigitates with the normal tissue rather than ending on a smooth outline.

The lesion mask comes with the image, so the attention a model puts on each patch can be scored
against where the lesion really is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .slides import _smooth_noise, _tissue_shape, write_pyramidal_tiff

logger = logging.getLogger(__name__)

MASK_DOWNSAMPLE = 8  # the stored lesion mask is 1/8 of level 0 (a patch of 256 px is 32 mask pixels)
ORGANS = ("colon", "liver", "lymph node")
LESION_TYPES = ("adenocarcinoma", "squamous cell carcinoma", "melanoma")
GRADES = ("low", "high")

# Optical-density directions (Ruifrok & Johnston): haematoxylin (blue-purple), eosin (pink), melanin (brown).
H_OD = np.array([0.650, 0.704, 0.286], np.float32)
E_OD = np.array([0.072, 0.990, 0.105], np.float32)
M_OD = np.array([0.33, 0.52, 0.79], np.float32)


@dataclass(frozen=True)
class Palette:
    """An organ's stain intensities: nuclei (haematoxylin), cytoplasm and stroma (eosin), background."""

    nucleus: float  # haematoxylin concentration of a nucleus
    cytoplasm: float  # eosin of cell cytoplasm
    stroma: float  # eosin of the connective tissue between structures


PALETTES = {"colon": Palette(0.95, 0.55, 0.42), "liver": Palette(0.85, 0.75, 0.45),
            "lymph node": Palette(1.10, 0.30, 0.35)}


@dataclass(frozen=True)
class LesionSpec:
    """What to draw: an organ, and optionally a lesion of a type and grade covering a fraction of the tissue."""

    organ: str
    lesion: str | None = None  # None: normal tissue only
    grade: str | None = None
    fraction: float = 0.01  # lesion area / tissue area
    foci: int = 1  # the lesion's area split over this many separate foci
    margin_involved: bool = False  # a focus touches the edge of the section (the resection margin)
    pigment: bool = False  # melanoma only: some cells carry melanin

    def __post_init__(self) -> None:
        if self.organ not in ORGANS:
            raise ValueError(f"unknown organ {self.organ!r}; choose one of {', '.join(ORGANS)}")
        if self.lesion is not None and (self.lesion not in LESION_TYPES or self.grade not in GRADES):
            raise ValueError(f"unknown lesion {self.lesion!r} of grade {self.grade!r}; lesions: "
                             f"{', '.join(LESION_TYPES)}; grades: {', '.join(GRADES)}")
        if self.lesion is not None and not 0.0 < self.fraction < 0.5:
            raise ValueError(f"lesion fraction must be between 0 and 0.5, got {self.fraction}")
        if self.foci < 1:
            raise ValueError(f"foci must be at least 1, got {self.foci}")
        if self.pigment and self.lesion != "melanoma":
            raise ValueError("only a melanoma carries pigment")


@dataclass(frozen=True)
class ScannerLook:
    """One slide's staining and scanning: stain vectors and strengths, glass brightness, blur, JPEG quality."""

    h_od: np.ndarray
    e_od: np.ndarray
    h_strength: float
    e_strength: float
    glass: float  # transmitted light through empty glass (0–255)
    blur_px: float
    jpeg_quality: int

    @classmethod
    def draw(cls, rng: np.random.Generator, variation: float = 1.0) -> "ScannerLook":
        """A random but plausible look: stain hues turned a few degrees, strengths ±30 %, mild blur; `variation`
        scales how far stains and glass stray from the reference (0: every slide stained alike)."""
        return cls(_turned(H_OD, rng, 0.12 * variation), _turned(E_OD, rng, 0.12 * variation),
                   float(1 + 0.3 * variation * rng.uniform(-1, 1)), float(1 + 0.3 * variation * rng.uniform(-1, 1)),
                   float(239 + 11 * variation * rng.uniform(-1, 1)), float(rng.uniform(0.3, 1.3)),
                   int(rng.integers(60, 96)))


def _turned(vector: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    turned = np.clip(vector + rng.normal(0, amount, 3).astype(np.float32) * vector.max(), 0.02, None)
    return (turned / np.linalg.norm(turned)).astype(np.float32)


# -- drawing cells into concentration maps ---------------------------------------------------------------
class Canvas:
    """Haematoxylin, eosin and melanin concentration maps (H×W float32) being painted."""

    def __init__(self, shape: tuple[int, int], mpp: float) -> None:
        self.h = np.zeros(shape, np.float32)
        self.e = np.zeros(shape, np.float32)
        self.m = np.zeros(shape, np.float32)
        self.px = 1.0 / mpp  # pixels per micrometre
        self.shape = shape

    def area_mm2(self, region: np.ndarray) -> float:
        return float(region.sum()) / (self.px * 1000.0) ** 2

    def nucleus(self, rng: np.random.Generator, x: float, y: float, length_um: float, elongation: float,
                angle: float, strength: float, vesicular: bool = False, nucleolus: bool = False) -> None:
        """One nucleus: dense (hyperchromatic) or vesicular (dark rim, pale centre), optionally a nucleolus."""
        axes = (max(1, int(length_um * self.px / 2)), max(1, int(length_um * self.px / 2 / elongation)))
        centre = (int(x), int(y))
        if vesicular:
            cv2.ellipse(self.h, centre, axes, angle, 0, 360, strength * 0.45, -1, cv2.LINE_AA)
            cv2.ellipse(self.h, centre, axes, angle, 0, 360, strength, max(1, int(1.2 * self.px)), cv2.LINE_AA)
        else:
            cv2.ellipse(self.h, centre, axes, angle, 0, 360, strength, -1, cv2.LINE_AA)
        if nucleolus:  # a prominent nucleolus: a pink (eosinophilic) dot in the nucleus
            cv2.circle(self.h, centre, max(1, int(1.6 * self.px)), strength * 0.3, -1, cv2.LINE_AA)
            cv2.circle(self.e, centre, max(1, int(1.6 * self.px)), 1.2, -1, cv2.LINE_AA)

    def scatter(self, rng: np.random.Generator, region: np.ndarray, per_mm2: float) -> np.ndarray:
        """Random points inside `region` at a density per mm² → (n, 2) x, y."""
        count = rng.poisson(max(0.0, per_mm2 * self.area_mm2(region)))
        ys, xs = np.nonzero(region)
        if not len(ys) or not count:
            return np.zeros((0, 2))
        pick = rng.integers(0, len(ys), count)
        return np.stack([xs[pick], ys[pick]], 1).astype(np.float64) + rng.uniform(-0.5, 0.5, (count, 2))


def _lattice(rng: np.random.Generator, shape: tuple[int, int], spacing_px: float, jitter: float) -> np.ndarray:
    """A jittered hexagonal lattice of points covering `shape` → (n, 2) x, y."""
    h, w = shape
    rows = np.arange(-1, h / (spacing_px * 0.866) + 1)
    points = [(x + (r % 2) * spacing_px / 2, r * spacing_px * 0.866)
              for r in rows for x in np.arange(-spacing_px, w + spacing_px, spacing_px)]
    points = np.asarray(points, np.float64)
    return points + rng.normal(0, jitter * spacing_px, points.shape)


def _inside(points: np.ndarray, region: np.ndarray) -> np.ndarray:
    h, w = region.shape
    xi, yi = np.clip(points[:, 0].astype(int), 0, w - 1), np.clip(points[:, 1].astype(int), 0, h - 1)
    return points[region[yi, xi]]


# -- the organs' normal tissue ---------------------------------------------------------------------------
def _colon(c: Canvas, rng: np.random.Generator, region: np.ndarray, p: Palette) -> None:
    """Mucosa: regular round crypts (goblet cells, a single row of small basal nuclei) in lamina propria."""
    px = c.px
    c.e[region] = p.stroma
    for x, y in c.scatter(rng, region, 1800):  # lamina propria: scattered small round inflammatory cells
        c.nucleus(rng, x, y, rng.uniform(5, 6.5), 1.05, rng.uniform(0, 180), p.nucleus)
    for x, y in _inside(_lattice(rng, c.shape, 80 * px, 0.08), region):
        r = rng.uniform(26, 32) * px
        stretch, angle = rng.uniform(1.0, 1.25), rng.uniform(0, 180)
        axes = (int(r * stretch), int(r / stretch))
        cv2.ellipse(c.e, (int(x), int(y)), axes, angle, 0, 360, p.cytoplasm, -1, cv2.LINE_AA)
        cv2.ellipse(c.h, (int(x), int(y)), axes, angle, 0, 360, 0.0, -1, cv2.LINE_AA)
        inner = (max(1, axes[0] - int(16 * px)), max(1, axes[1] - int(16 * px)))
        cv2.ellipse(c.e, (int(x), int(y)), inner, angle, 0, 360, 0.04, -1, cv2.LINE_AA)  # the lumen
        for t in np.linspace(0, 2 * np.pi, int(2 * np.pi * r / (7 * px)), endpoint=False):
            ca, sa = np.cos(np.radians(angle)), np.sin(np.radians(angle))
            u, v = axes[0] * np.cos(t) * 0.88, axes[1] * np.sin(t) * 0.88
            nx, ny = x + u * ca - v * sa, y + u * sa + v * ca
            if rng.random() < 0.35:  # a goblet cell: a pale mucin vacuole in the epithelium
                gx, gy = x + (u * ca - v * sa) * 0.8, y + (u * sa + v * ca) * 0.8
                cv2.circle(c.e, (int(gx), int(gy)), max(1, int(3.5 * px)), 0.08, -1, cv2.LINE_AA)
                cv2.circle(c.h, (int(gx), int(gy)), max(1, int(3.5 * px)), 0.12, -1, cv2.LINE_AA)
            c.nucleus(rng, nx, ny, rng.uniform(6, 8), 2.0, np.degrees(t) + angle, p.nucleus)


def _liver(c: Canvas, rng: np.random.Generator, region: np.ndarray, p: Palette) -> None:
    """Plates of polygonal hepatocytes (round central nuclei, some binucleate) between thin pale sinusoids."""
    px = c.px
    c.e[region] = p.cytoplasm
    flow = _smooth_noise(rng, c.shape, int(250 * px)) * np.pi  # the plates' local direction
    for x, y in c.scatter(rng, region, 2600):  # sinusoids: short pale lines along the plates
        a = flow[int(y), int(x)] + rng.normal(0, 0.2)
        length = rng.uniform(25, 50) * px
        end = (int(x + length * np.cos(a)), int(y + length * np.sin(a)))
        cv2.line(c.e, (int(x), int(y)), end, 0.12, max(1, int(2.5 * px)), cv2.LINE_AA)
    for x, y in _inside(_lattice(rng, c.shape, 24 * px, 0.12), region):
        shift = rng.normal(0, 1.5 * px, 2)
        c.nucleus(rng, x + shift[0], y + shift[1], rng.uniform(7, 8.5), 1.08, rng.uniform(0, 180), p.nucleus * 0.85,
                  vesicular=True)
        if rng.random() < 0.08:  # binucleate hepatocyte
            c.nucleus(rng, x + 9 * px, y, rng.uniform(7, 8.5), 1.08, 0, p.nucleus * 0.85, vesicular=True)
    for x, y in c.scatter(rng, region, 25):  # central veins
        cv2.circle(c.e, (int(x), int(y)), int(rng.uniform(20, 35) * px), 0.03, -1, cv2.LINE_AA)
        cv2.circle(c.h, (int(x), int(y)), int(rng.uniform(20, 35) * px), 0.0, -1, cv2.LINE_AA)


def _lymph_node(c: Canvas, rng: np.random.Generator, region: np.ndarray, p: Palette) -> None:
    """Sheets of small dark lymphocytes; follicles whose germinal centres hold larger, paler cells."""
    px = c.px
    c.e[region] = p.cytoplasm
    centres = np.zeros(c.shape, np.uint8)
    for x, y in c.scatter(rng, region, 6):
        cv2.circle(centres, (int(x), int(y)), int(rng.uniform(90, 160) * px), 1, -1)
    centres = centres.astype(bool) & region
    for x, y in c.scatter(rng, region & ~centres, 9000):
        c.nucleus(rng, x, y, rng.uniform(5.5, 6.5), 1.05, rng.uniform(0, 180), p.nucleus)
    for x, y in c.scatter(rng, centres, 4200):
        c.nucleus(rng, x, y, rng.uniform(7, 10), 1.2, rng.uniform(0, 180), p.nucleus * 0.8, vesicular=True)
    for x, y in c.scatter(rng, region & ~centres, 60):  # sinuses and small vessels: pale channels, pink walls
        a, length = rng.uniform(0, np.pi), rng.uniform(60, 160) * px
        end = (int(x + length * np.cos(a)), int(y + length * np.sin(a)))
        cv2.line(c.e, (int(x), int(y)), end, 0.7, max(1, int(9 * px)), cv2.LINE_AA)
        cv2.line(c.e, (int(x), int(y)), end, 0.08, max(1, int(6 * px)), cv2.LINE_AA)
        cv2.line(c.h, (int(x), int(y)), end, 0.0, max(1, int(6 * px)), cv2.LINE_AA)
    for x, y in c.scatter(rng, centres, 120):  # tingible-body macrophages: pale cytoplasm, debris
        cv2.circle(c.h, (int(x), int(y)), int(7 * px), 0.05, -1, cv2.LINE_AA)
        cv2.circle(c.h, (int(x), int(y)), max(1, int(1.5 * px)), p.nucleus, -1, cv2.LINE_AA)


NORMAL = {"colon": _colon, "liver": _liver, "lymph node": _lymph_node}


# -- the lesions ---------------------------------------------------------------------------------------------
# A lesion is coarser than the normal tissue it grows in — larger nuclei, larger glands, nests and pearls —
# while spending about the same share of its area on nuclei (the quantile match then removes what is left of
# the colour difference): what tells it apart is its architecture and the size and shape of its cells.
NUCLEAR_SHARE = 0.16


def _nuclei_for(area_px: float, length_um: float, elongation: float, px: float) -> int:
    """How many nuclei of this size fill NUCLEAR_SHARE of an area."""
    nucleus_px = np.pi / 4 * (length_um * px) ** 2 / elongation
    return max(1, int(round(NUCLEAR_SHARE * area_px / nucleus_px)))


def _adenocarcinoma(c: Canvas, rng: np.random.Generator, region: np.ndarray, p: Palette, high: bool) -> None:
    """Large back-to-back glands with wide lumens, rimmed by a thick band of stratified elongated nuclei; high
    grade: irregular, cribriform or solid glands with larger, rounder, pleomorphic nuclei and dirty necrosis."""
    px = c.px
    c.e[region] = p.stroma
    length, elongation = ((16, 28), 1.5) if high else ((14, 20), 2.4)
    spacing = (110 if high else 100) * px
    for x, y in _inside(_lattice(rng, c.shape, spacing, 0.15), region):
        r = rng.uniform(42, 52) * px
        n = int(rng.integers(6, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n)) if high else np.linspace(0, 2 * np.pi, n, endpoint=False)
        radii = r * (rng.uniform(0.65, 1.3, n) if high else rng.uniform(0.9, 1.1, n))
        outline = np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(c.e, [outline], p.cytoplasm, cv2.LINE_AA)
        lumens = [(x, y, r * rng.uniform(0.45, 0.6))] if not high else \
            [(x + rng.normal(0, r * 0.25), y + rng.normal(0, r * 0.25), r * rng.uniform(0.15, 0.3))
             for _ in range(0 if rng.random() < 0.3 else int(rng.integers(2, 5)))]
        for lx, ly, lr in lumens:
            cv2.circle(c.e, (int(lx), int(ly)), int(lr), 0.03, -1, cv2.LINE_AA)
            if high and rng.random() < 0.5:  # dirty necrosis: nuclear debris in the lumen
                for _ in range(10):
                    d = rng.normal(0, lr * 0.35, 2)
                    cv2.circle(c.h, (int(lx + d[0]), int(ly + d[1])), max(1, int(1.5 * px)), p.nucleus * 0.8, -1)
        count = _nuclei_for(0.866 * spacing**2, float(np.mean(length)), elongation, px)
        inner = 0.62 if not high else 0.35
        for t in rng.uniform(0, 2 * np.pi, count):  # the rim: stratified, elongated nuclei
            depth = rng.uniform(inner, 0.95)
            nx, ny = x + r * depth * np.cos(t), y + r * depth * np.sin(t)
            c.nucleus(rng, nx, ny, rng.uniform(*length), elongation * rng.uniform(0.8, 1.2), np.degrees(t),
                      p.nucleus, nucleolus=high and rng.random() < 0.3)


def _squamous(c: Canvas, rng: np.random.Generator, region: np.ndarray, p: Palette, high: bool) -> None:
    """Nests of large polygonal cells with glassy pink cytoplasm, thick intercellular bridges and large keratin
    pearls; high grade: fewer pearls, larger and more pleomorphic nuclei."""
    px = c.px
    c.e[region] = p.cytoplasm * 1.15
    cell = (40 if high else 38) * px
    centres = _inside(_lattice(rng, c.shape, cell, 0.08), region)
    for x, y in centres:  # cell borders with their bridges: a mesh of pale bands with dark dots
        for k in range(6):
            a = np.pi / 3 * k + np.pi / 6
            ex, ey = x + cell * 0.58 * np.cos(a), y + cell * 0.58 * np.sin(a)
            fx, fy = x + cell * 0.58 * np.cos(a + np.pi / 3), y + cell * 0.58 * np.sin(a + np.pi / 3)
            cv2.line(c.e, (int(ex), int(ey)), (int(fx), int(fy)), p.cytoplasm * 0.35, max(1, int(3 * px)), cv2.LINE_AA)
            for u in (0.3, 0.7):
                cv2.circle(c.h, (int(ex + u * (fx - ex)), int(ey + u * (fy - ey))), max(1, int(1.2 * px)),
                           p.nucleus * 0.7, -1)
    pearls = np.zeros(c.shape, np.uint8)
    for x, y in c.scatter(rng, region, 60 if high else 180):
        r = rng.uniform(45, 75) * px
        for k, shade in enumerate((1.5, 0.7, 1.45, 0.75, 1.5)):  # thick concentric lamellae of keratin
            cv2.circle(c.e, (int(x), int(y)), max(1, int(r * (1 - k / 5))), p.cytoplasm * shade, -1, cv2.LINE_AA)
        cv2.circle(c.h, (int(x), int(y)), int(r), 0.0, -1, cv2.LINE_AA)
        cv2.circle(pearls, (int(x), int(y)), int(r), 1, -1)
    h, w = c.shape
    for x, y in centres:
        if pearls[int(min(max(y, 0), h - 1)), int(min(max(x, 0), w - 1))]:
            continue
        length = rng.uniform(16, 30) if high else rng.uniform(14, 18)
        c.nucleus(rng, x, y, length, rng.uniform(1.0, 1.6) if high else 1.15, rng.uniform(0, 180), p.nucleus,
                  nucleolus=high)


def _melanoma(c: Canvas, rng: np.random.Generator, region: np.ndarray, p: Palette, high: bool,
              pigment: bool) -> None:
    """A dense sheet of epithelioid cells with large round nuclei, each with a prominent (pink) nucleolus;
    high grade: larger, pleomorphic nuclei and mitoses; melanin in some cells when `pigment`."""
    px = c.px
    c.e[region] = p.cytoplasm * 0.9
    cell = (30 if high else 27) * px
    for x, y in _inside(_lattice(rng, c.shape, cell, 0.12), region):
        length = rng.uniform(17, 28) if high else rng.uniform(15, 18)
        c.nucleus(rng, x + rng.normal(0, px), y + rng.normal(0, px), length, rng.uniform(1.0, 1.35) if high else 1.05,
                  rng.uniform(0, 180), p.nucleus * 0.9, nucleolus=True)
        if pigment and rng.random() < 0.12:
            for _ in range(6):
                d = rng.normal(0, cell * 0.25, 2)
                cv2.circle(c.m, (int(x + d[0]), int(y + d[1])), max(1, int(rng.uniform(0.8, 1.8) * px)),
                           float(rng.uniform(0.4, 0.9)), -1)
    if high:
        for x, y in c.scatter(rng, region, 300):  # mitoses: dark irregular chromatin clumps
            for _ in range(6):
                d = rng.normal(0, 2.5 * px, 2)
                cv2.circle(c.h, (int(x + d[0]), int(y + d[1])), max(1, int(1.5 * px)), p.nucleus * 1.2, -1)


def _paint_lesion(c: Canvas, rng: np.random.Generator, region: np.ndarray, spec: LesionSpec, p: Palette) -> None:
    high = spec.grade == "high"
    if spec.lesion == "adenocarcinoma":
        _adenocarcinoma(c, rng, region, p, high)
    elif spec.lesion == "squamous cell carcinoma":
        _squamous(c, rng, region, p, high)
    else:
        _melanoma(c, rng, region, p, high, spec.pigment)


# -- where the lesion goes -------------------------------------------------------------------------------
def _edge_distance(tissue: np.ndarray) -> np.ndarray:
    """Distance in pixels from each tissue pixel to the edge of the section (the margin)."""
    padded = np.pad(tissue.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


LESION_GRID = 4  # the lesion outline is planned on a grid 4× coarser than level 0, then upsampled


def lesion_mask(rng: np.random.Generator, tissue: np.ndarray, spec: LesionSpec, mpp: float) -> np.ndarray:
    """Where the lesion is: `spec.foci` foci inside the tissue covering `spec.fraction` of it, with a ragged,
    infiltrative edge (the outline interleaves with the tissue around it over ~20 µm)."""
    h, w = tissue.shape
    small = cv2.resize(tissue.astype(np.uint8), (w // LESION_GRID, h // LESION_GRID),
                       interpolation=cv2.INTER_NEAREST).astype(bool)
    per_focus = max(1, int(round(spec.fraction * small.sum() / spec.foci)))
    radius = np.sqrt(per_focus / np.pi)
    edge = _edge_distance(small)
    field = np.full(small.shape, -np.inf, np.float32)
    taken = np.zeros_like(small)
    yy, xx = np.mgrid[0 : small.shape[0], 0 : small.shape[1]].astype(np.float32)
    coarse = _smooth_noise(rng, small.shape, max(4, int(radius / 2)))
    ragged = _smooth_noise(rng, small.shape, max(2, int(12 / mpp / LESION_GRID)))  # ~12 µm interdigitation
    for focus in range(spec.foci):
        if spec.margin_involved and focus == 0:  # centred just inside the edge, so it reaches the margin
            candidates = (edge > 0.3 * radius) & (edge < 0.6 * radius)
        else:  # well inside: a clear margin of at least one lesion radius
            candidates = edge > 2.2 * radius
        if focus:
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
        raw = (1.0 - np.sqrt((u / stretch) ** 2 + (v * stretch) ** 2) / radius + 0.5 * (coarse - 0.5)
               + 0.35 * (ragged - 0.5))
        inside = np.where(small & ~taken, raw, -np.inf).ravel()
        threshold = np.partition(inside, inside.size - per_focus)[inside.size - per_focus]
        field = np.maximum(field, raw - threshold)
        taken |= small & (raw >= threshold)
    return (cv2.resize(field.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0) & tissue


def match_moments(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`values` moved and scaled so that their mean and spread are `reference`'s (never below zero).

    An affine map keeps the drawing's shapes — a quantile map would have to cut flat regions in arbitrary
    order to reproduce another histogram — while the first two moments, which colour statistics read, match.
    """
    if not values.size or not reference.size:
        return values
    spread = values.std()
    scaled = (values - values.mean()) * (reference.std() / spread if spread > 1e-6 else 0.0) + reference.mean()
    return np.clip(scaled, 0.0, None).astype(values.dtype)


# -- the slide ----------------------------------------------------------------------------------------------
def render_lesion_image(spec: LesionSpec, size: tuple[int, int] = (3072, 3072), mpp: float = 0.5, seed: int = 0,
                        coverage: float = 0.6, look: ScannerLook | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB image H×W×3 uint8, tissue mask H×W bool, lesion mask H×W bool) of one synthetic slide.

    `look` is the slide's staining and scanning (default: drawn from `seed`).
    """
    width, height = size
    rng = np.random.default_rng(seed)
    look = look or ScannerLook.draw(rng)
    tissue = _tissue_shape(rng, (height, width), coverage)
    palette = PALETTES[spec.organ]
    canvas = Canvas((height, width), mpp)
    NORMAL[spec.organ](canvas, rng, tissue, palette)
    _chromatin(canvas, rng)
    lesion = np.zeros_like(tissue)
    window = None
    if spec.lesion is not None:
        lesion = lesion_mask(rng, tissue, spec, mpp)
        ys, xs = np.nonzero(lesion)
        pad = int(60 / mpp)  # the ring of normal tissue the lesion's stain and colour are matched to
        window = (slice(max(0, ys.min() - pad), min(height, ys.max() + pad + 1)),
                  slice(max(0, xs.min() - pad), min(width, xs.max() + pad + 1)))
        box = lesion[window]
        around = tissue[window] & ~box
        if not around.any():
            around = tissue & ~lesion
        drawn = Canvas(box.shape, mpp)
        _paint_lesion(drawn, rng, np.ones_like(box), spec, palette)
        _chromatin(drawn, rng)
        for name in ("h", "e"):  # the organ's stain levels: its palette, whatever the lesion's architecture
            target, reference = getattr(drawn, name)[box], getattr(canvas, name)[window][around]
            getattr(canvas, name)[window][box] = match_moments(target, reference)
        canvas.m[window][box] = drawn.m[box]
    intensity = _transmitted(canvas, tissue, look)
    if look.blur_px > 0.35:  # the scanner's optics
        intensity = cv2.GaussianBlur(intensity, (0, 0), look.blur_px)
    if window is not None:  # the six colour numbers (mean, spread per channel) of the tissue around it
        region = intensity[window]
        for channel in range(3):
            values = region[..., channel]
            values[box] = np.clip(match_moments(values[box], values[around]), 0, look.glass)
    intensity += rng.standard_normal((height, width, 1), dtype=np.float32) * 2.5  # sensor noise
    return np.clip(intensity, 0, 255).astype(np.uint8), tissue, lesion


def _chromatin(c: Canvas, rng: np.random.Generator) -> None:
    """Fine chromatin and cytoplasm texture (~2 µm): real stain is never flat."""
    grain = max(2, int(2 * c.px))
    c.h *= (0.8 + 0.4 * _smooth_noise(rng, c.shape, grain)).astype(np.float32)
    c.e *= (0.95 + 0.1 * _smooth_noise(rng, c.shape, grain)).astype(np.float32)


def _transmitted(c: Canvas, tissue: np.ndarray, look: ScannerLook) -> np.ndarray:
    """Beer–Lambert: the light through the section (H×W×3 float32), with the slide's stains and uneven thickness."""
    thickness = (0.85 + 0.3 * _smooth_noise(np.random.default_rng(c.shape), c.shape, int(300 * c.px)))
    h = c.h * (look.h_strength * thickness.astype(np.float32))
    e = c.e * (look.e_strength * thickness.astype(np.float32))
    od = h[..., None] * look.h_od + e[..., None] * look.e_od + c.m[..., None] * M_OD
    od[~tissue] = 0.0
    return look.glass * np.exp(-od)


def downsample_mask(mask: np.ndarray, factor: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """A boolean mask shrunk by `factor` into uint8 lesion fractions (255: all lesion, 0: none, >0 if any)."""
    h, w = mask.shape
    padded = np.pad(mask, ((0, -h % factor), (0, -w % factor))).astype(np.float32)
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).mean(axis=(1, 3))
    return np.where(blocks > 0, np.maximum(1, np.rint(blocks * 255)), 0).astype(np.uint8)


def make_lesion_slide(path: str | Path, spec: LesionSpec, size: tuple[int, int] = (3072, 3072), mpp: float = 0.5,
                      seed: int = 0, coverage: float = 0.6, stain_variation: float = 1.0) -> tuple[Path, np.ndarray]:
    """Write a pyramidal TIFF of `spec` (at the slide's own JPEG quality); returns its path and the lesion mask
    at 1/MASK_DOWNSAMPLE of level 0."""
    look = ScannerLook.draw(np.random.default_rng([seed, 1]), stain_variation)
    image, _, lesion = render_lesion_image(spec, size, mpp, seed, coverage, look)
    return write_pyramidal_tiff(path, image, mpp, quality=look.jpeg_quality), downsample_mask(lesion)


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
