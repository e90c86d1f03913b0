"""Slides unlike the lesion cohort, to test whether a model says so (chat/typicality.py).

Three kinds, none drawn by the cohort's painter:

- `ihc`: a cohort slide restained as immunohistochemistry — its haematoxylin kept, its eosin turned into
  DAB's brown (colour deconvolution on the standard H&E and DAB vectors of Ruifrok & Johnston);
- `other generator`: slides of the project's older tissue painter (synthetic/slides.py), another drawing
  of H&E-like tissue;
- `photograph`: photographs that Python packages ship (matplotlib's, scikit-learn's, Gradio's), scaled up
  to slide size and written as a slide at 0.5 µm/px, as a user who uploads the wrong file would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from .slides import make_synthetic_slide, tissue_classes, write_pyramidal_tiff

logger = logging.getLogger(__name__)

# Optical-density vectors (R, G, B) of haematoxylin, eosin and DAB: Ruifrok & Johnston (2001).
HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
DAB = np.array([0.27, 0.57, 0.78])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def restain_as_ihc(image: np.ndarray) -> np.ndarray:
    """An H&E image (H, W, 3 uint8) as haematoxylin and DAB: the eosin's share of each pixel becomes brown."""
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)  # (H, W, 3)
    stains = np.stack([_unit(HAEMATOXYLIN), _unit(EOSIN)], 1)  # (3, 2)
    amounts = np.clip(od.reshape(-1, 3) @ np.linalg.pinv(stains).T, 0.0, None)  # (H·W, 2)
    restained = amounts @ np.stack([_unit(HAEMATOXYLIN), _unit(DAB)], 0)  # (H·W, 3)
    return np.clip(256.0 * np.exp(-restained) - 1.0, 0, 255).reshape(image.shape).astype(np.uint8)


def packaged_photographs() -> list[Path]:
    """JPEG photographs shipped inside installed packages (none of them tissue); empty when none is installed."""
    import importlib.util

    wanted = {"matplotlib": ["mpl-data/sample_data/grace_hopper.jpg"],
              "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
              "gradio": ["media_assets/images/cheetah1.jpg", "media_assets/images/tower.jpg"]}
    found = []
    for package, names in wanted.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        found += [root / name for name in names if (root / name).is_file()]
    return found


def photograph_slide(path: str | Path, photograph: str | Path, side: int = 2048, mpp: float = 0.5) -> Path:
    """A photograph scaled so its longer side is `side` pixels, written as a pyramidal TIFF at `mpp` µm/px."""
    image = cv2.cvtColor(cv2.imread(str(photograph), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    scale = side / max(image.shape[:2])
    image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                       interpolation=cv2.INTER_CUBIC)
    return write_pyramidal_tiff(path, image, mpp)


def ihc_slide(path: str | Path, source: str | Path) -> Path:
    """A cohort slide restained as IHC (`restain_as_ihc`), at its own µm/px."""
    import tifffile

    from ..vision_tower.slide import open_slide

    with open_slide(source) as slide:
        mpp = float(slide.mpp)
    image = tifffile.imread(str(source), level=0)[..., :3]
    return write_pyramidal_tiff(path, restain_as_ihc(image), mpp)


def make_unlike_slides(out: str | Path, cohort_slides: list[Path], *, per_kind: int = 6, size: int = 2048,
                       seed: int = 0) -> dict[str, list[Path]]:
    """Write up to `per_kind` slides of each kind into `out/<kind>/`: kind → their paths."""
    out = Path(out)
    made: dict[str, list[Path]] = {"ihc": [], "other generator": [], "photograph": []}
    for source in cohort_slides[:per_kind]:
        made["ihc"].append(ihc_slide(out / "ihc" / f"ihc-{source.stem}.tiff", source))
    classes = tissue_classes()
    for i in range(per_kind):
        tissue = classes[i % len(classes)]
        made["other generator"].append(make_synthetic_slide(out / "other" / f"other-{i:02d}-{tissue}.tiff", tissue,
                                                            (size, size), 0.5, seed + i))
    for i, photo in enumerate(packaged_photographs()[:per_kind]):
        made["photograph"].append(photograph_slide(out / "photo" / f"photo-{i:02d}-{photo.stem}.tiff", photo, size))
    logger.info("Slides unlike the cohort: %s", {k: len(v) for k, v in made.items()})
    return made
