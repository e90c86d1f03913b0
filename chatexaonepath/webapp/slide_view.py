"""What the page shows of a loaded slide: a thumbnail with the tissue outline, the heatmap, the top patches.

The summary says what the slide is (its size in mm, its resolution, the patches the model read) in a
reader's words, never where its features came from: "from the cache" would tell a user that somebody
else had loaded the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..vision_tower.heatmap import AttendedPatch, heatmap_layer, top_attended_patches
from ..vision_tower.slide import Slide
from ..vision_tower.tissue import TissueConfig
from . import wording

VIEW_SIDE = 1024  # long side of the slide view in pixels
HEAT_SCALES = ("weight", "rank")  # the viewer's colour scales (heatmap.attention_to_unit), the first by default


@dataclass
class SlideView:
    """What the page shows of a loaded slide: thumbnail with tissue outline, heatmaps, top patches."""

    name: str
    summary: str
    outline: np.ndarray  # (H, W, 3) uint8 thumbnail with the tissue outline
    heat: np.ndarray  # (H, W, 3) uint8, every patch fully tinted by its weight on the default scale
    covered: np.ndarray  # (H, W) bool, pixels inside a patch
    patches: list[AttendedPatch] = field(default_factory=list)
    mpp: float = 0.0  # level-0 µm per pixel
    patch_side: int = 0  # level-0 pixels
    heat_by: dict[str, np.ndarray] = field(default_factory=dict)  # scale → its (H, W, 3) tint; `heat` is the first
    unlike: str | None = None  # the typicality warning when the slide is unlike the model's training slides

    def compose(self, show_heatmap: bool = True, opacity: float = 0.3, scale: str = HEAT_SCALES[0]) -> np.ndarray:
        """The thumbnail, with the heatmap (on `scale`) blended over the patches when `show_heatmap`."""
        if not show_heatmap or opacity <= 0:
            return self.outline
        heat = self.heat_by.get(scale, self.heat)
        opacity = min(float(opacity), 1.0)
        blended = (self.outline * (1.0 - opacity) + heat * opacity).round().astype(np.uint8)
        return np.where(self.covered[..., None], blended, self.outline)

    def gallery(self) -> list[tuple]:
        """The most-attended patches with short captions: rank, share of the attention, centre in µm."""
        half = self.patch_side / 2
        return [(p.image, f"#{p.rank} · {wording.share(p.attention)} · "
                          f"{wording.position(p.coord[0] + half, p.coord[1] + half, self.mpp)}")
                for p in self.patches]


def render_view(slide: Slide, loaded, tissue: TissueConfig, top_patches: int) -> SlideView:
    """The view of `loaded` (a `chat.session.LoadedSlide`) drawn from the open `slide`."""
    features = loaded.features
    side0 = int(features.attrs.get("patch_size_level0") or 0) or None
    coords, attention = features.coords, loaded.attention
    plain, downsample = slide.read_at_downsample(max(1.0, max(slide.dimensions) / VIEW_SIDE))
    heat, covered = {}, None
    for scale in HEAT_SCALES:
        heat[scale], covered = heatmap_layer(plain.shape[:2], downsample, coords, attention,
                                             patch_size_level0=side0, scale=scale)
    outline = _outlined(slide, features, plain, downsample, tissue)
    patches = top_attended_patches(slide, coords, attention, k=min(top_patches, len(features)),
                                   patch_size_level0=side0, size=side0 or 256)
    return SlideView(slide.slide_id, summary(slide, features), outline, heat[HEAT_SCALES[0]], covered, patches,
                     float(slide.mpp), side0 or 0, heat, getattr(loaded, "typicality_warning", None))


def summary(slide: Slide, features) -> str:
    """One sentence on the slide: "tumor — 1.02 × 1.02 mm at 0.25 µm/px (about 40×, TIFF); the model read 40
    tissue patches of 128 µm."."""
    width, height = slide.dimensions
    mpp = float(slide.mpp)
    vendor = wording.vendor_name(slide.vendor)
    patch_um = float(features.attrs.get("patch_size", 0)) * float(features.attrs.get("target_mpp", 0))
    patches = f"{len(features):,} tissue patch{'es' if len(features) != 1 else ''}"
    if patch_um > 0:
        patches += f" of {wording.length(patch_um)}"
    return (f"{slide.slide_id} — {width * mpp / 1000:.2f} × {height * mpp / 1000:.2f} mm at {mpp:.3g} µm/px "
            f"(about {10 / mpp:.0f}×{f', {vendor}' if vendor else ''}); the model read {patches}.")


def _outlined(slide: Slide, features, plain: np.ndarray, downsample: float, tissue: TissueConfig) -> np.ndarray:
    """The thumbnail with the tissue outline: the extractor's own, else segmented again."""
    import cv2

    thumbnail = features.path.parent / "thumbnails" / f"{slide.slide_id}.png" if features.path else None
    if thumbnail is not None and thumbnail.exists():
        image = cv2.imread(str(thumbnail), cv2.IMREAD_COLOR)
        if image is not None:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            if image.shape[:2] != plain.shape[:2]:
                image = cv2.resize(image, (plain.shape[1], plain.shape[0]), interpolation=cv2.INTER_AREA)
            return image
    from ..vision_tower.tissue import draw_tissue_outline, segment_tissue

    return draw_tissue_outline(plain, segment_tissue(slide, tissue), downsample)
