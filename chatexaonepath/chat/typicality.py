"""Is this slide like the slides the model was trained on? A typicality score from its patch features.

A model answers about any slide it is shown, including slides nothing in its training resembled (another
organ, another stain, a photograph); its answers there are unreliable and the user should be told. Every
checkpoint `train` writes carries `typicality.json`: how far, in its training features' own units, a
slide's patches and its mean patch lie from the training patches, with a threshold calibrated on the
training and validation slides. Three numbers per slide, each in standard deviations of the training
patches (`feature_mean`/`feature_std`, the tower's own standardisation):

- `patch_distance`: the median over the slide's patches of each patch's root-mean-square z-score;
- `patch_tail`: the 90th percentile of the same (a slide partly unlike the training slides);
- `slide_distance`: the root-mean-square z-score of the slide's mean patch.

The score is the largest of the three, each divided by its threshold (the largest value any calibration
slide reached, times a margin): a slide scores above 1 when one of them is further out than every
calibration slide by the margin. Distances, not a density model: they need no more slides than a small
cohort has, and they say which way a slide is unusual.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

TYPICALITY_FILE = "typicality.json"
MEASURES = ("patch_distance", "patch_tail", "slide_distance")
MARGIN = 1.25  # over the furthest calibration slide: held-out slides of the same kind stay under it
UNTYPICAL_MESSAGE = ("This slide is unlike the slides this model was trained on; its answers are unreliable "
                     "for it.")


def slide_measures(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict[str, float]:
    """The three distances of one slide's (N, D) patch features from the training patches (see the module)."""
    z = (features.float() - mean.float()) / std.float().clamp_min(1e-6)  # (N, D)
    per_patch = z.pow(2).mean(1).sqrt()  # (N,)
    slide = z.mean(0).pow(2).mean().sqrt()
    return {"patch_distance": float(per_patch.median()), "patch_tail": float(torch.quantile(per_patch, 0.9)),
            "slide_distance": float(slide)}


@dataclass
class Typicality:
    """Thresholds calibrated on a checkpoint's training and validation slides, and the score of a slide."""

    thresholds: dict[str, float]
    calibration: dict = field(default_factory=dict)  # how the thresholds were set: slides, maxima, margin

    def score(self, measures: dict[str, float]) -> float:
        """The largest measure over its threshold: above 1, the slide is unlike every calibration slide."""
        return max(measures[k] / self.thresholds[k] for k in MEASURES)

    def assess(self, features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> "SlideTypicality":
        """The typicality of one slide's patch features."""
        measures = slide_measures(features, mean, std)
        return SlideTypicality(self.score(measures), measures)

    @classmethod
    def calibrate(cls, slides: list[dict[str, float]], margin: float = MARGIN) -> "Typicality":
        """Thresholds from the measures of in-distribution slides (their maxima times `margin`)."""
        if not slides:
            raise ValueError("typicality needs at least one calibration slide")
        maxima = {k: max(s[k] for s in slides) for k in MEASURES}
        return cls({k: v * margin for k, v in maxima.items()},
                   {"slides": len(slides), "maxima": maxima, "margin": margin})

    def save(self, directory: str | Path) -> Path:
        from ..fileio import atomic_write_json

        return atomic_write_json(Path(directory) / TYPICALITY_FILE, asdict(self))

    @classmethod
    def load(cls, directory: str | Path) -> "Typicality | None":
        """The checkpoint's typicality thresholds, or None for a checkpoint trained before they existed."""
        path = Path(directory) / TYPICALITY_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        thresholds = {k: float(data["thresholds"][k]) for k in MEASURES}
        if not all(math.isfinite(v) and v > 0 for v in thresholds.values()):
            raise ValueError(f"{path.name} has thresholds that are not positive numbers")
        return cls(thresholds, data.get("calibration", {}))


@dataclass
class SlideTypicality:
    """How typical one slide is: its score (≤ 1: like the training slides) and the measures behind it."""

    score: float
    measures: dict[str, float]

    @property
    def typical(self) -> bool:
        return self.score <= 1.0

    @property
    def warning(self) -> str | None:
        """The one sentence users see when the slide is unlike the training slides, else None."""
        return None if self.typical else UNTYPICAL_MESSAGE
