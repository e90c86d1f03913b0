"""Synthetic H&E-like whole-slide images: pyramidal tiled TIFFs that OpenSlide opens with µm/px.

Tests, demos and benchmarks use these instead of committed slides. Each tissue class has its own
colour and texture so that later stages (features, training) have something to tell apart.
Drawing is done with OpenCV primitives on a full level-0 array: simple, fast and deterministic
for the sizes used here (up to ~16k² pixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..fileio import atomic_write_with

logger = logging.getLogger(__name__)

# Colours in RGB. Eosin is pink, haematoxylin dark blue-purple, background the bright glass.
BACKGROUND_RGB = (242, 240, 244)


@dataclass(frozen=True)
class TissueStyle:
    """How one tissue class looks: stroma colour and the nuclei drawn on it."""

    stroma_rgb: tuple[int, int, int]
    nucleus_rgb: tuple[int, int, int]
    nuclei_per_mm2: float
    nucleus_um: tuple[float, float]  # (min, max) long-axis diameter
    elongation: float  # ratio of long to short axis
    texture: str  # "fibrous", "glandular", "adipose", "granular", "solid"


TISSUE_STYLES: dict[str, TissueStyle] = {
    "tumor": TissueStyle((205, 120, 175), (70, 30, 120), 5500, (9.0, 16.0), 1.3, "solid"),
    "stroma": TissueStyle((238, 150, 185), (95, 45, 130), 900, (8.0, 13.0), 3.0, "fibrous"),
    "normal": TissueStyle((232, 165, 200), (85, 45, 140), 2200, (6.0, 9.0), 1.2, "glandular"),
    "necrosis": TissueStyle((225, 175, 200), (120, 70, 150), 2500, (2.0, 5.0), 1.1, "granular"),
    "lymphoid": TissueStyle((215, 140, 190), (50, 25, 105), 9000, (6.0, 7.5), 1.05, "solid"),
    "adipose": TissueStyle((240, 185, 210), (100, 55, 140), 300, (6.0, 9.0), 2.0, "adipose"),
}


def tissue_classes() -> list[str]:
    """The tissue classes `make_synthetic_slide` can draw."""
    return sorted(TISSUE_STYLES)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Value noise in [0, 1]: random values on a coarse grid, blurred and upsampled to `shape`."""
    h, w = shape
    coarse = rng.random((max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    coarse = cv2.GaussianBlur(coarse, (0, 0), 1.0)
    fine = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(fine.min()), float(fine.max())
    return (fine - lo) / max(hi - lo, 1e-6)


def _tissue_shape(rng: np.random.Generator, shape: tuple[int, int], coverage: float) -> np.ndarray:
    """A blobby tissue mask with a glass margin all around, covering about `coverage` of the slide."""
    h, w = shape
    small = (max(32, h // 32), max(32, w // 32))
    yy, xx = np.mgrid[0 : small[0], 0 : small[1]].astype(np.float32)
    # An ellipse keeps glass at the borders; noise makes the outline irregular like a real section.
    ellipse = ((yy / small[0] - 0.5) / 0.42) ** 2 + ((xx / small[1] - 0.5) / 0.42) ** 2
    field = (1.0 - ellipse) + 0.6 * (_smooth_noise(rng, small, 6) - 0.5)
    threshold = np.quantile(field, 1.0 - coverage)
    # Threshold after upsampling the smooth field, so the outline is smooth rather than blocky.
    return cv2.resize(field - threshold, (w, h), interpolation=cv2.INTER_LINEAR) > 0


def _draw_texture(
    canvas: np.ndarray, rng: np.random.Generator, style: TissueStyle, tissue: np.ndarray, mpp: float
) -> None:
    """Draw the class-specific structures (fibres, glands, fat cells, nuclei) onto `canvas` in place."""
    h, w = tissue.shape
    area_mm2 = tissue.sum() * (mpp / 1000.0) ** 2
    px = 1.0 / mpp  # pixels per micrometre
    if style.texture == "fibrous":
        for _ in range(int(area_mm2 * 400)):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            length, angle = rng.uniform(40, 160) * px, rng.uniform(-0.4, 0.4)
            dx, dy = int(length * np.cos(angle)), int(length * np.sin(angle))
            shade = tuple(int(c * rng.uniform(0.88, 0.97)) for c in style.stroma_rgb)
            cv2.line(canvas, (x, y), (x + dx, y + dy), shade, max(1, int(2 * px)), cv2.LINE_AA)
    elif style.texture in ("glandular", "adipose"):
        count = int(area_mm2 * (60 if style.texture == "glandular" else 500))
        radius_um = (40, 90) if style.texture == "glandular" else (20, 45)
        for _ in range(count):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.uniform(*radius_um) * px)
            if style.texture == "glandular":
                cv2.circle(canvas, (x, y), r, style.nucleus_rgb, max(2, int(6 * px)), cv2.LINE_AA)
                cv2.circle(canvas, (x, y), max(1, r - int(7 * px)), (246, 232, 240), -1, cv2.LINE_AA)
            else:
                cv2.circle(canvas, (x, y), r, (250, 246, 248), -1, cv2.LINE_AA)
                cv2.circle(canvas, (x, y), r, style.stroma_rgb, max(1, int(1.5 * px)), cv2.LINE_AA)
    n_nuclei = int(area_mm2 * style.nuclei_per_mm2)
    xs = rng.integers(0, w, n_nuclei)
    ys = rng.integers(0, h, n_nuclei)
    sizes = rng.uniform(*style.nucleus_um, n_nuclei) * px / 2
    angles = rng.uniform(0, 180, n_nuclei)
    shades = rng.uniform(0.75, 1.15, n_nuclei)
    for x, y, s, a, k in zip(xs, ys, sizes, angles, shades):
        colour = tuple(int(min(255, c * k)) for c in style.nucleus_rgb)
        axes = (max(1, int(s)), max(1, int(s / style.elongation)))
        cv2.ellipse(canvas, (int(x), int(y)), axes, float(a), 0, 360, colour, -1, cv2.LINE_AA)


def render_synthetic_image(
    tissue: str = "tumor", size: tuple[int, int] = (4096, 4096), mpp: float = 0.25,
    seed: int = 0, coverage: float = 0.55, blank: bool = False,
) -> np.ndarray:
    """Render a level-0 RGB uint8 image (height × width × 3) of one tissue class on glass."""
    if tissue not in TISSUE_STYLES:
        raise ValueError(f"unknown tissue class {tissue!r}; choose one of {', '.join(tissue_classes())}")
    width, height = size
    rng = np.random.default_rng(seed)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND_RGB
    if not blank:
        style = TISSUE_STYLES[tissue]
        mask = _tissue_shape(rng, (height, width), coverage)
        stroma = np.empty_like(canvas)
        stroma[:] = style.stroma_rgb
        # Mid-frequency shading so that the eosin is not flat.
        shade = 0.9 + 0.15 * _smooth_noise(rng, (height, width), max(8, int(60 / mpp)))
        stroma = np.clip(stroma * shade[..., None], 0, 255).astype(np.uint8)
        _draw_texture(stroma, rng, style, mask, mpp)
        canvas[mask] = stroma[mask]
    noise = rng.normal(0, 3.0, (height, width, 1)).astype(np.float32)
    return np.clip(canvas.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def write_pyramidal_tiff(
    path: str | Path, image: np.ndarray, mpp: float, *, tile: int = 256,
    downsample: int = 4, min_level_size: int = 512, compression: str = "jpeg", quality: int = 90,
) -> Path:
    """Write `image` as a tiled pyramidal TIFF with µm/px in its resolution tags.

    `downsample` is the factor between successive levels (4 like Aperio scanners, so a 0.25 µm/px
    slide has no 0.5 µm/px level and patches are read at level 0 and resized, as on real slides).
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = [image]
    while min(levels[-1].shape[:2]) // downsample >= min_level_size:
        prev = levels[-1]
        size = (prev.shape[1] // downsample, prev.shape[0] // downsample)
        levels.append(cv2.resize(prev, size, interpolation=cv2.INTER_AREA))
    pixels_per_cm = 1e4 / mpp
    options = dict(tile=(tile, tile), photometric="rgb", compression=compression)
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
            for i, level in enumerate(levels):
                scale = downsample**i
                tif.write(
                    level, resolution=(pixels_per_cm / scale, pixels_per_cm / scale),
                    resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1, **options,
                )

    return atomic_write_with(path, write)  # two processes may paint the same file


def make_synthetic_slide(
    path: str | Path, tissue: str = "tumor", size: tuple[int, int] = (4096, 4096), mpp: float = 0.25,
    seed: int = 0, *, coverage: float = 0.55, blank: bool = False, downsample: int = 4,
    write_mpp: bool = True, aperio: bool = False, repeat: tuple[int, int] = (1, 1),
) -> Path:
    """Render a synthetic slide of one tissue class and write it as a pyramidal TIFF.

    `write_mpp=False` omits the resolution tags, giving a slide without µm/px (for the error path).
    `aperio=True` writes an Aperio-like SVS instead (`write_aperio_svs`; `repeat` tiles the
    rendered `size` into a larger slide there).
    """
    image = render_synthetic_image(tissue, size, mpp, seed, coverage, blank)
    if aperio:
        return write_aperio_svs(path, image, mpp, downsample=downsample, repeat=repeat)
    if repeat != (1, 1):
        raise ValueError("repeat is only supported with aperio=True")
    if write_mpp:
        return write_pyramidal_tiff(path, image, mpp, downsample=downsample)
    return _write_without_resolution(Path(path), image)


def write_aperio_svs(
    path: str | Path, image: np.ndarray, mpp: float, *, tile: int = 256, downsample: int = 4,
    min_level_size: int = 512, quality: int = 70, repeat: tuple[int, int] = (1, 1),
) -> Path:
    """Write `image` as an Aperio-like SVS pyramid that OpenSlide opens with its Aperio driver.

    Like Aperio scanners: JPEG tiles in RGB colour space (no YCbCr conversion, 4:4:4), the
    quantisation and Huffman tables stored once in the JPEGTables tag, abbreviated tile streams
    without any colour-space marker (a reader must go by the Photometric tag), and an
    `Aperio …|AppMag = …|MPP = …` description. `repeat=(rx, ry)` lays the image out rx × ry times,
    encoding each distinct tile once: a large 40× slide in seconds, for benchmarks.
    """
    path, (rx, ry) = Path(path), repeat
    block = image
    if rx < 1 or ry < 1 or (repeat != (1, 1) and (block.shape[0] % tile or block.shape[1] % tile)):
        raise ValueError(f"repeat {repeat} needs positive counts and an image whose sides are multiples of {tile}")
    path.parent.mkdir(parents=True, exist_ok=True)
    width0, height0 = block.shape[1] * rx, block.shape[0] * ry
    magnification = 40 if mpp < 0.375 else 20
    description = (f"Aperio Image Library v12.0.15 \r\n{width0}x{height0} [0,0 {width0}x{height0}] ({tile}x{tile}) "
                   f"JPEG/RGB Q={quality}|AppMag = {magnification}|MPP = {mpp:.4f}|Filename = synthetic")

    def write(tmp: Path) -> None:
        _write_aperio_levels(tmp, block, rx, ry, tile, downsample, min_level_size, quality, mpp, description)

    return atomic_write_with(path, write)  # two processes may paint the same file


def _write_aperio_levels(tmp: Path, block: np.ndarray, rx: int, ry: int, tile: int, downsample: int,
                         min_level_size: int, quality: int, mpp: float, description: str) -> None:
    import tifffile

    tables: bytes | None = None
    with tifffile.TiffWriter(tmp, bigtiff=block.nbytes * rx * ry > 2**31) as tif:
        for level in range(64):
            if level and min(block.shape[:2]) * min(rx, ry) // downsample < min_level_size:
                break
            if level:
                size = (block.shape[1] // downsample, block.shape[0] // downsample)
                block = cv2.resize(block, size, interpolation=cv2.INTER_AREA)
            if block.shape[0] % tile or block.shape[1] % tile:  # a small level: lay it out whole
                block, rx, ry = np.tile(block, (ry, rx, 1)), 1, 1
            tiles, level_tables = _abbreviated_jpeg_tiles(block, tile, quality)
            if tables is not None and level_tables != tables:
                raise RuntimeError("JPEG tables differ between levels; the encoder changed its defaults")
            tables = level_tables
            shape = (block.shape[0] * ry, block.shape[1] * rx, 3)
            across, down = -(-block.shape[1] // tile), -(-block.shape[0] // tile)
            order = (tiles[(ty % down) * across + tx % across]
                     for ty in range(down * ry) for tx in range(across * rx))
            tif.write(order, shape=shape, dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="jpeg", compressionargs={"outcolorspace": "RGB"}, jpegtables=tables,
                      subfiletype=0 if level == 0 else 1, description=description if level == 0 else None,
                      metadata=None, resolution=(1e4 / mpp / downsample**level,) * 2, resolutionunit="CENTIMETER")


def _abbreviated_jpeg_tiles(image: np.ndarray, tile: int, quality: int) -> tuple[list[bytes], bytes]:
    """Encode `image` tile by tile; return the abbreviated tile streams and the shared tables stream.

    Standard Huffman tables and one quality give every tile the same tables, so they are stored
    once (SOI DQT DHT EOI) and each tile keeps only SOF, SOS and its scan, as Aperio writes them.
    """
    import imagecodecs

    height, width = image.shape[:2]
    padded = np.pad(image, ((0, -height % tile), (0, -width % tile), (0, 0)), mode="edge")
    streams, tables = [], None
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            encoded = imagecodecs.jpeg8_encode(padded[top : top + tile, left : left + tile], level=quality,
                                               colorspace="RGB", outcolorspace="RGB", subsampling="444",
                                               optimize=False)
            tile_tables, abbreviated = _split_jpeg_tables(bytes(encoded))
            if tables is not None and tile_tables != tables:
                raise RuntimeError("JPEG tables differ between tiles; cannot share one JPEGTables tag")
            tables = tile_tables
            streams.append(abbreviated)
    return streams, tables


def _split_jpeg_tables(stream: bytes) -> tuple[bytes, bytes]:
    """A full JPEG → (SOI DQT DHT EOI tables, SOI SOF SOS-and-scan tile) with neutral component ids.

    APPn markers (JFIF, Adobe) are dropped and the 'R','G','B' component ids libjpeg writes for RGB
    JPEGs become 1, 2, 3, so nothing inside the stream says it is RGB — as in Aperio files.
    """
    tables, frame, position = [], [], 2
    while True:
        marker = stream[position + 1]
        length = int.from_bytes(stream[position + 2 : position + 4], "big")
        segment = bytearray(stream[position : position + 2 + length])
        if marker in (0xDB, 0xC4):  # DQT, DHT
            tables.append(bytes(segment))
        elif marker == 0xC0:  # SOF0: 3 bytes per component after 10 bytes of header
            for i in range(segment[9]):
                segment[10 + 3 * i] = i + 1
            frame.append(bytes(segment))
        elif marker == 0xDA:  # SOS: 2 bytes per component after 5 bytes of header; the scan follows
            for i in range(segment[4]):
                segment[5 + 2 * i] = i + 1
            return (b"\xff\xd8" + b"".join(tables) + b"\xff\xd9",
                    b"\xff\xd8" + b"".join(frame) + bytes(segment) + stream[position + 2 + length :])
        position += 2 + length


def _write_without_resolution(path: Path, image: np.ndarray) -> Path:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=None, resolutionunit="NONE")
    return path


# Optical-density directions (Beer–Lambert) of haematoxylin (purple) and eosin (pink).
H_OD = np.array([0.65, 0.70, 0.29])
E_OD = np.array([0.07, 0.99, 0.11])


def stained_patch(
    seed: int, size: int = 256, h: float = 1.0, e: float = 1.0, white: float = 0.15,
) -> np.ndarray:
    """An H&E patch mixed in optical-density space with known stain strengths `h` and `e`.

    Unlike `render_synthetic_image` (drawn in RGB), its stains follow the Beer–Lambert model the
    Macenko method assumes, so stain-normalisation tests and benchmarks have a ground truth.
    `white` is the glass fraction.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c_e = e * (0.5 + 0.25 * np.sin(xx / rng.uniform(8, 20)) * np.cos(yy / rng.uniform(8, 20)))
    c_h = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(10, 25) * (size / 128) ** 2)):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(3, 9)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        c_h = np.maximum(c_h, h * rng.uniform(0.6, 1.2) * blob * (blob > 0.2))
    glass = np.hypot(yy - rng.uniform(0, size), xx - rng.uniform(0, size)) < size * np.sqrt(white / np.pi)
    c_e[glass] = 0.0
    c_h[glass] = 0.0
    od = c_h[..., None] * H_OD + c_e[..., None] * E_OD
    image = 240.0 * np.exp(-od) + rng.normal(0, 3, (size, size, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
