"""H&E pictures that look like a real scan's edge, for the tissue segmentation's tests (no internet, no real slide).

What the synthetic slides of `chatexaonepath.synthetic` lack and a real Aperio slide has at its edge: eosin
stroma so pale that its saturation is a fifth of the dense tissue's, fat (empty vacuoles whose thin
membranes are the only stain), a glass background that is not pure white (a tint, noise, dust), out of
focus blur and JPEG compression. `edge_of_a_real_slide` paints those side by side with their truth masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GLASS = (238, 239, 242)  # an Aperio background: a light grey with a faint blue tint
DENSE_STROMA = (231, 160, 196)
PALE_STROMA = (238, 218, 229)  # HSV saturation ≈ 21/255: what Otsu puts with the glass
HAEMATOXYLIN = (78, 58, 140)
MEMBRANE = (222, 168, 200)


@dataclass
class PaintedEdge:
    """A painted slide edge: the RGB image and where each kind of tissue is (bool masks, same size)."""

    image: np.ndarray
    dense: np.ndarray
    pale: np.ndarray
    fat: np.ndarray

    @property
    def tissue(self) -> np.ndarray:
        return self.dense | self.pale | self.fat


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std noise with features about `sigma` pixels wide (texture of fibres and stain);
    made at a coarser grid and enlarged, since a wide blur of a full-size image takes seconds."""
    step = max(1.0, sigma / 2)
    small = (max(2, round(shape[0] / step)), max(2, round(shape[1] / step)))
    noise = cv2.GaussianBlur(rng.standard_normal(small).astype(np.float32), (0, 0), sigma / step)
    noise = cv2.resize(noise, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return noise / (noise.std() + 1e-6)


def _blob(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float], wobble: float,
          rng: np.random.Generator) -> np.ndarray:
    """An irregular ellipse: the outline of a tissue fragment."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    distance = ((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
    return distance + wobble * _smooth_noise(shape, min(radii) / 6, rng) < 1.0


def _nuclei(image: np.ndarray, where: np.ndarray, per_mm2: float, mpp: float, rng: np.random.Generator) -> None:
    """Dark purple nuclei 5–9 µm across, scattered over `where`."""
    ys, xs = np.nonzero(where)
    if not len(ys):
        return
    area_mm2 = len(ys) * (mpp / 1000) ** 2
    for k in rng.choice(len(ys), size=int(per_mm2 * area_mm2), replace=True):
        radius = rng.uniform(2.5, 4.5) / mpp
        axes = (max(1, int(radius)), max(1, int(radius * rng.uniform(0.6, 1.0))))
        cv2.ellipse(image, (int(xs[k]), int(ys[k])), axes, rng.uniform(0, 180), 0, 360, HAEMATOXYLIN, -1)


def _fat(shape: tuple[int, int], where: np.ndarray, mpp: float, rng: np.random.Generator) -> np.ndarray:
    """The membranes of adipocytes about 70 µm across filling `where`: a Voronoi tessellation of a jittered grid,
    closed along the lobule's own edge."""
    height, width = shape
    spacing = 70 / mpp
    subdiv = cv2.Subdiv2D((0, 0, width, height))
    for y in np.arange(spacing / 2, height, spacing):
        for x in np.arange(spacing / 2, width, spacing):
            jx, jy = x + rng.uniform(-0.35, 0.35) * spacing, y + rng.uniform(-0.35, 0.35) * spacing
            if 0 <= jx < width and 0 <= jy < height and where[int(jy), int(jx)]:
                subdiv.insert((float(jx), float(jy)))
    membranes = np.zeros(shape, np.uint8)
    facets, _ = subdiv.getVoronoiFacetList([])
    thickness = max(1, round(2.5 / mpp))  # 2.5 µm membranes
    for facet in facets:
        cv2.polylines(membranes, [np.round(facet).astype(np.int32)], True, 1, thickness)
    contours, _ = cv2.findContours(where.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(membranes, contours, -1, 1, thickness)
    return membranes.astype(bool) & where


def edge_of_a_real_slide(size: tuple[int, int] = (3072, 2048), mpp: float = 0.5, seed: int = 0,
                         glass: tuple[int, int, int] = GLASS) -> PaintedEdge:
    """A tissue fragment on `glass`: dense cellular stroma in the middle, a band of very pale eosin stroma on
    its left edge, a lobule of fat on its right edge, dust on the glass; blurred like optics."""
    rng = np.random.default_rng(seed)
    width, height = size
    shape = (height, width)
    image = np.empty((height, width, 3), np.float32)
    image[:] = glass
    image += np.linspace(-2, 2, width, dtype=np.float32)[None, :, None]  # uneven illumination
    fragment = _blob(shape, (width * 0.5, height * 0.5), (width * 0.36, height * 0.38), 0.08, rng)
    columns = np.arange(width)[None, :]
    pale = fragment & (columns < width * 0.30)  # a strip of stroma along the left edge
    fat = fragment & (columns > width * 0.68)  # fat along the right edge
    dense = fragment & ~pale & ~fat
    fibres = _smooth_noise(shape, 3 / mpp, rng)[..., None]  # collagen texture, a few µm wide
    image[dense] = np.asarray(DENSE_STROMA, np.float32) + 8 * fibres[dense]
    image[pale] = np.asarray(PALE_STROMA, np.float32) + 3 * fibres[pale]
    image[fat & _fat(shape, fat, mpp, rng)] = MEMBRANE
    image = np.clip(image, 0, 255).astype(np.uint8)
    _nuclei(image, dense, 3000, mpp, rng)
    _nuclei(image, pale, 150, mpp, rng)
    for _ in range(25):  # dust and debris on the glass: dark specks a few µm wide
        x, y = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        if not fragment[y, x]:
            cv2.circle(image, (x, y), max(1, round(rng.uniform(1, 4) / mpp)), (90, 90, 95), -1)
    image = cv2.GaussianBlur(image, (0, 0), 0.6)  # optics
    image = np.clip(image.astype(np.float32) + rng.normal(0, 1.5, image.shape), 0, 255).astype(np.uint8)
    return PaintedEdge(image, dense, pale, fat)


def save_jpeg(image: np.ndarray, path: Path, quality: int = 80) -> Path:
    """Save as a JPEG of a scanner's quality (its 8×8 blocks and chroma subsampling are part of real texture)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.write_bytes(data.tobytes())
    return path
