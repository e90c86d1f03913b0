"""The vision tower: slide → tissue → patches → [Macenko] → patch encoder → features.

Import submodules directly (e.g. `from chatexaonepath.vision_tower.slide import open_slide`);
the names below are re-exported lazily so importing the package stays cheap.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "open_slide": "slide", "Slide": "slide", "segment_tissue": "tissue", "TissueConfig": "tissue",
    "patch_grid": "patching", "PatchGrid": "patching", "MacenkoNormalizer": "stain",
    "build_encoder": "encoder", "register_encoder": "encoder", "available_encoders": "encoder",
    "read_features": "features", "write_features": "features", "extract_slides": "batch",
    "ExtractConfig": "extraction", "FeatureExtractor": "extraction",
    "GatedAttentionAggregator": "aggregator", "AggregatorConfig": "aggregator", "AttentionPoolProjector": "projector",
    "ProjectorConfig": "projector", "render_heatmap": "heatmap", "top_attended_patches": "heatmap",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
