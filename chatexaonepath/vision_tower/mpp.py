"""A slide's level-0 µm/px from its metadata: OpenSlide's standard keys, Aperio's, TIFF resolution tags, a PNG/JPEG DPI.

Values outside `MPP_RANGE` count as missing: a screen DPI, a unit mix-up or a crafted tag.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .images import PlainImage

logger = logging.getLogger(__name__)

# Plausible level-0 µm/px for microscopy: from beyond 80× (0.1) down to a 1× overview (10). Outside
# it the number is a screen DPI, a unit mix-up or a crafted tag (50 µm/px would turn a small image
# into a hundred thousand upsampled patches).
MPP_RANGE = (0.05, 10.0)


def metadata_mpp(handle, path: Path) -> float | None:
    """µm/px from the slide's properties (OpenSlide's standard keys, then TIFF resolution tags)."""
    import openslide

    props = handle.properties
    values = [props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)]
    mpps = floats(values)
    if not mpps:
        mpps = floats([props.get("aperio.MPP")])
    if not mpps:
        mpps = _tiff_resolution_mpp(props)
    if not mpps and isinstance(handle, PlainImage):
        mpps = _image_dpi_mpp(handle)
    mpps = [m for m in mpps if math.isfinite(m) and MPP_RANGE[0] <= m <= MPP_RANGE[1]]
    if not mpps:
        return None
    if len(mpps) == 2 and abs(mpps[0] - mpps[1]) > 0.1 * max(mpps):
        logger.warning("%s has anisotropic pixels (%.4g × %.4g µm); using their mean.", path, *mpps)
    return float(sum(mpps) / len(mpps))


def floats(values: list[object]) -> list[float]:
    """The values that parse as numbers; scanners sometimes write junk into these fields."""
    numbers = []
    for value in values:
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            continue
    return numbers


def _tiff_resolution_mpp(props) -> list[float]:
    unit = props.get("tiff.ResolutionUnit", "").lower()
    per_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    res = floats([props.get("tiff.XResolution")])
    if per_um is None or not res or res[0] <= 0:
        return []
    return [per_um / res[0]]


def _image_dpi_mpp(image: PlainImage) -> list[float]:
    # PNG/JPEG carry a DPI; most writers put a screen default there (72 → 353 µm/px), which
    # MPP_RANGE rejects, so only a DPI that was clearly set for microscopy is used.
    dpi = image.info.get("dpi")
    if not dpi or not dpi[0]:
        return []
    return [25400.0 / float(dpi[0])]
