"""What the page shows of a loaded slide: a thumbnail with the tissue outline, the heatmap, the top patches.

The summary says what the slide is and how it was cut into patches, never where its features came
from: "from the cache" would tell a user that somebody else had loaded the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..vision_tower.heatmap import AttendedPatch, render_heatmap, top_attended_patches
from ..vision_tower.slide import Slide
from ..vision_tower.tissue import TissueConfig

VIEW_SIDE = 1024  # long side of the slide view in pixels


@dataclass
class SlideView:
    """What the page shows of a loaded slide: thumbnail with tissue outline, heatmap, top patches."""

    name: str
    summary: str
    outline: np.ndarray  # (H, W, 3) uint8 thumbnail with the tissue outline
    heat: np.ndarray  # (H, W, 3) uint8 thumbnail with every patch fully tinted by its attention
    covered: np.ndarray  # (H, W) bool, pixels inside a patch
    patches: list[AttendedPatch] = field(default_factory=list)

    def compose(self, show_heatmap: bool = True, opacity: float = 0.5) -> np.ndarray:
        """The thumbnail, with the attention heatmap blended over the patches when `show_heatmap`."""
        if not show_heatmap or opacity <= 0:
            return self.outline
        opacity = min(float(opacity), 1.0)
        blended = (self.outline * (1.0 - opacity) + self.heat * opacity).round().astype(np.uint8)
        return np.where(self.covered[..., None], blended, self.outline)


def render_view(slide: Slide, loaded, tissue: TissueConfig, top_patches: int) -> SlideView:
    """The view of `loaded` (a `chat.session.LoadedSlide`) drawn from the open `slide`."""
    features = loaded.features
    side0 = int(features.attrs.get("patch_size_level0") or 0) or None
    coords, attention = features.coords, loaded.attention
    heat = np.asarray(render_heatmap(slide, coords, attention, patch_size_level0=side0, opacity=1.0,
                                     max_side=VIEW_SIDE))
    plain, downsample = slide.read_at_downsample(max(1.0, max(slide.dimensions) / VIEW_SIDE))
    outline = _outlined(slide, features, plain, downsample, tissue)
    patches = top_attended_patches(slide, coords, attention, k=min(top_patches, len(features)),
                                   patch_size_level0=side0, size=side0 or 256)
    width, height = slide.dimensions
    summary = (f"{slide.slide_id} — {width:,}×{height:,} px at {slide.mpp:.3g} µm/px "
               f"({slide.vendor}); {len(features)} patches of {features.attrs.get('patch_size', '?')} px at "
               f"{features.attrs.get('target_mpp', '?')} µm/px.")
    return SlideView(slide.slide_id, summary, outline, heat, (heat != plain).any(axis=-1), patches)


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
