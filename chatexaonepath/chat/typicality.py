"""Is this slide like the slides the model was trained on? A typicality score from its patch features.

A model answers about any slide it is shown, including slides nothing in its training resembled (another
organ, another stain, a photograph); its answers there are unreliable and the user should be told. Every
checkpoint `train` writes carries `typicality.json` and `typicality.safetensors`: a bank of its training
patches and slide means (in the tower's standardised feature units, `feature_mean`/`feature_std`) and a
threshold per measure. Three measures per slide, each a root-mean-square distance per feature dimension:

- `patch_distance`: the median over the slide's patches of each patch's distance to its nearest training
  patch;
- `patch_tail`: the 90th percentile of the same (a slide partly unlike the training slides);
- `slide_distance`: the distance of the slide's mean patch to the nearest training slide's mean.

Thresholds come from leaving each calibration slide out in turn (its distances to the other slides'
patches and means): the largest value any calibration slide reached, times a margin. A slide scores
above 1 when one measure is further out than every left-out calibration slide by the margin. Nearest
neighbours rather than distances to the overall mean: a cohort holds several organs and stains, and a
slide of one of them is typical when it is like *some* training slides, not like their average (measured
with a tiny encoder: distance-to-mean flagged a held-out slide of an unusual stain while missing another
painter's tissue; nearest neighbours did neither).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

TYPICALITY_FILE = "typicality.json"
BANK_FILE = "typicality.safetensors"
MEASURES = ("patch_distance", "patch_tail", "slide_distance")
MARGIN = 1.25  # over the furthest left-out calibration slide
MAX_BANK_PATCHES = 8192  # patches kept for the nearest-neighbour search: 12 MB at 768-d in fp16
UNTYPICAL_MESSAGE = ("This slide is unlike the slides this model was trained on; its answers are unreliable "
                     "for it.")


def standardise(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, D) features in the tower's units: per dimension, minus the training mean, over the training std."""
    return (features.float() - mean.float()) / std.float().clamp_min(1e-6)


def _nearest(queries: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor | None = None,
             owner: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) distance of each query to its nearest bank row, per √dimension; bank rows of `owner == exclude`
    are skipped (leave-one-slide-out)."""
    distances = torch.cdist(queries, bank)  # (N, B)
    if exclude is not None:
        distances[:, owner == exclude] = float("inf")
    return distances.min(1).values / math.sqrt(queries.shape[1])


def measures_against(z: torch.Tensor, patches: torch.Tensor, means: torch.Tensor, *, leave_out: int | None = None,
                     patch_owner: torch.Tensor | None = None) -> dict[str, float]:
    """The three measures of one slide's standardised (N, D) patches against a bank (see the module)."""
    per_patch = _nearest(z, patches, None if leave_out is None else torch.tensor(leave_out), patch_owner)
    slide_owner = torch.arange(means.shape[0])
    slide = _nearest(z.mean(0, keepdim=True), means, None if leave_out is None else torch.tensor(leave_out),
                     slide_owner)
    return {"patch_distance": float(per_patch.median()), "patch_tail": float(torch.quantile(per_patch, 0.9)),
            "slide_distance": float(slide[0])}


@dataclass
class Typicality:
    """A checkpoint's bank of training patches and slide means, its thresholds, and the score of a slide."""

    thresholds: dict[str, float]
    patches: torch.Tensor  # (B, D) standardised training patches (a seeded sample)
    means: torch.Tensor  # (S, D) standardised mean patch of each calibration slide
    calibration: dict = field(default_factory=dict)  # how the thresholds were set: slides, maxima, margin

    def score(self, measures: dict[str, float]) -> float:
        """The largest measure over its threshold: above 1, the slide is unlike every calibration slide."""
        return max(measures[k] / self.thresholds[k] for k in MEASURES)

    def assess(self, features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> "SlideTypicality":
        """The typicality of one slide's (N, D) patch features."""
        if features.shape[-1] != self.patches.shape[-1]:  # another encoder's features: unlike by construction
            return SlideTypicality(math.inf, {k: math.inf for k in MEASURES})
        measures = measures_against(standardise(features, mean, std), self.patches.float(), self.means.float())
        return SlideTypicality(self.score(measures), measures)

    @classmethod
    def calibrate(cls, bags: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor, *, margin: float = MARGIN,
                  max_patches: int = MAX_BANK_PATCHES, seed: int = 0) -> "Typicality":
        """Thresholds from in-distribution slides' (N_i, D) features, each measured with itself left out."""
        if len(bags) < 2:
            raise ValueError("typicality needs at least two calibration slides (each is measured against the others)")
        z = [standardise(b, mean, std) for b in bags]
        generator = torch.Generator().manual_seed(seed)
        per_slide = max(1, max_patches // len(z))
        kept = [b[torch.randperm(b.shape[0], generator=generator)[:per_slide]] for b in z]
        patches = torch.cat(kept)
        owner = torch.cat([torch.full((k.shape[0],), i) for i, k in enumerate(kept)])
        means = torch.stack([b.mean(0) for b in z])
        left_out = [measures_against(b, patches, means, leave_out=i, patch_owner=owner) for i, b in enumerate(z)]
        maxima = {k: max(m[k] for m in left_out) for k in MEASURES}
        return cls({k: max(v, 1e-6) * margin for k, v in maxima.items()}, patches.half(), means.half(),
                   {"slides": len(z), "bank_patches": int(patches.shape[0]), "maxima": maxima, "margin": margin})

    def save(self, directory: str | Path) -> Path:
        """typicality.safetensors (the bank), then typicality.json (thresholds): the JSON says it is complete."""
        from safetensors.torch import save_file

        from ..fileio import atomic_write_json, atomic_write_with

        directory = Path(directory)
        tensors = {"patches": self.patches.contiguous(), "means": self.means.contiguous()}
        atomic_write_with(directory / BANK_FILE, lambda tmp: save_file(tensors, str(tmp)))
        return atomic_write_json(directory / TYPICALITY_FILE,
                                 {"thresholds": self.thresholds, "calibration": self.calibration})

    @classmethod
    def load(cls, directory: str | Path) -> "Typicality | None":
        """The checkpoint's typicality, or None for a checkpoint trained before it existed."""
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / TYPICALITY_FILE
        if not path.is_file():
            return None
        if not (directory / BANK_FILE).is_file():  # the bank is written first: the JSON alone is a damaged copy
            raise ValueError(f"{path.name} has no {BANK_FILE} beside it; copy the whole checkpoint folder")
        data = json.loads(path.read_text())
        thresholds = {k: float(data["thresholds"][k]) for k in MEASURES}
        if not all(math.isfinite(v) and v > 0 for v in thresholds.values()):
            raise ValueError(f"{path.name} has thresholds that are not positive numbers")
        bank = load_file(str(directory / BANK_FILE))
        return cls(thresholds, bank["patches"], bank["means"], data.get("calibration", {}))


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
