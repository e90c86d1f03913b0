"""Questions about part of a slide, and the evidence an answer rests on.

A `Region` is a rectangle in level-0 pixels. The patches "in" it are those whose centre lies inside
it, so two regions that tile the slide never share a patch; a region smaller than one patch (drawn
while zoomed in to the cells) takes the patches it overlaps instead. The tower then runs on exactly
those patches' cached features: nothing is read from the slide again.

`Evidence` is one of the few patches that weighed most in an answer: the top pooling weights of the
forward pass that made the visual tokens the answer was generated from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ChatEXAONEPathError
from .conversation import Turn

EVIDENCE_COUNT = 3  # chips under an answer: a few places, not a second heatmap
_REGION = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")
# Level-0 pixels: far past any slide (the largest are ~10^6 px a side), and small enough that a region's sums
# fit numpy's int64. Bounding the digits before int() also keeps Python's 4,300-digit limit from raising.
MAX_REGION_VALUE = 2**31 - 1
_MAX_DIGITS = len(str(MAX_REGION_VALUE))
_CASE_SLIDE = re.compile(r"\s*([0-9]{1,3})\s*")
# Not echoing the value: str() of an int past 4,300 digits raises.
_TOO_LARGE = (f"A region's x, y, width and height are level-0 pixels of at most {MAX_REGION_VALUE:,}; one of them is "
              "larger.")


class EmptyRegionError(ChatEXAONEPathError):
    """A region holds no tissue patches, so there is nothing for the model to look at."""


@dataclass(frozen=True)
class Region:
    """A rectangle in level-0 pixels: top-left (x, y), width and height."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if max(abs(self.x), abs(self.y), self.width, self.height) > MAX_REGION_VALUE:
            raise ChatEXAONEPathError(_TOO_LARGE)
        if self.width < 1 or self.height < 1:
            raise ChatEXAONEPathError(f"A region needs a width and height of at least 1 pixel, got "
                                      f"{self.width}×{self.height}.")

    @classmethod
    def parse(cls, text: str) -> "Region":
        """`"x,y,w,h"` (level-0 pixels, whole numbers) → a Region; anything else is one clear sentence."""
        match = _REGION.match(text or "")
        if match is None:
            raise ChatEXAONEPathError(f"A region is four whole numbers x,y,w,h in level-0 pixels (e.g. "
                                      f"--region 4096,2048,1024,1024), got {str(text)[:60]!r}.")
        if any(len(value.lstrip("-")) > _MAX_DIGITS for value in match.groups()):
            raise ChatEXAONEPathError(_TOO_LARGE)
        return cls(*(int(value) for value in match.groups()))

    @classmethod
    def of(cls, value: "Region | tuple[int, int, int, int] | list[int] | str") -> "Region":
        """A Region from a Region, an (x, y, w, h) sequence or an "x,y,w,h" string."""
        if isinstance(value, Region):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        try:
            x, y, width, height = (int(v) for v in value)
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(float("inf"))
            raise ChatEXAONEPathError(f"A region is (x, y, width, height) in level-0 pixels, got "
                                      f"{_shown(value)}.") from e
        return cls(x, y, width, height)

    def clipped(self, width: int, height: int) -> "Region | None":
        """This region inside a `width`×`height` slide; None when it lies wholly outside."""
        x0, y0 = max(self.x, 0), max(self.y, 0)
        x1, y1 = min(self.x + self.width, width), min(self.y + self.height, height)
        return Region(x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.width, self.height

    def __str__(self) -> str:
        return f"{self.x},{self.y},{self.width},{self.height}"

    def describe(self) -> str:
        """For people: "x 4,096, y 2,048, 1,024 × 1,024 px (level 0)"."""
        return f"x {self.x:,}, y {self.y:,}, {self.width:,} × {self.height:,} px (level 0)"


def _shown(value: object) -> str:
    """The start of a value's repr for a message; a repr that itself fails (a 5,000-digit int) is its type."""
    try:
        return repr(value)[:60]
    except ValueError:
        return f"a {type(value).__name__} too large to show"


def patch_side_of(features) -> int:
    """Side of a slide's patches in level-0 pixels: recorded in the features file, else the grid's step."""
    side = int(features.attrs.get("patch_size_level0") or 0)
    if side:
        return side
    coords = np.asarray(features.coords).reshape(-1, 2)
    steps = np.concatenate([np.diff(np.unique(coords[:, 0])), np.diff(np.unique(coords[:, 1]))])
    steps = steps[steps > 0]
    return int(steps.min()) if len(steps) else 256


def patches_in_region(coords: np.ndarray | torch.Tensor, patch_side: int, region: Region) -> np.ndarray:
    """Indices (ascending) of the patches whose centre lies in `region`; if none, those it overlaps."""
    coords = coords.cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
    coords = coords.astype(np.int64).reshape(-1, 2)
    x0, y0, x1, y1 = region.x, region.y, region.x + region.width, region.y + region.height
    centre = coords * 2 + patch_side  # twice the centre, so odd sides stay exact in integers
    inside = (centre[:, 0] >= 2 * x0) & (centre[:, 0] < 2 * x1) & (centre[:, 1] >= 2 * y0) & (centre[:, 1] < 2 * y1)
    if not inside.any():
        inside = ((coords[:, 0] < x1) & (coords[:, 0] + patch_side > x0) &
                  (coords[:, 1] < y1) & (coords[:, 1] + patch_side > y0))
    return np.flatnonzero(inside)


@dataclass(frozen=True)
class Evidence:
    """One patch that weighed most in an answer: its level-0 square, its weight and rank among the answer's patches."""

    rank: int  # 1 = the heaviest
    index: int  # into the slide's patches (the features file's rows)
    x: int
    y: int
    size: int  # side of the patch in level-0 pixels
    weight: float  # its pooling weight in the forward pass behind the answer
    slide: int = 0  # which slide of the case it is on (0-based; 0 for a single slide)

    @property
    def region(self) -> Region:
        return Region(self.x, self.y, self.size, self.size)


def top_evidence(weights: torch.Tensor | np.ndarray, coords: torch.Tensor | np.ndarray, patch_side: int,
                 indices: np.ndarray | None = None, k: int = EVIDENCE_COUNT) -> tuple[Evidence, ...]:
    """The `k` patches with the largest `weights`, heaviest first.

    `weights` and `coords` describe the patches the tokens were made from; `indices` maps them back to
    the slide's patches (None: they are the slide's patches).
    """
    weights = weights.detach().float().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    coords = coords.cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
    weights = weights.reshape(-1)
    if len(weights) != len(coords):
        raise ValueError(f"{len(weights)} weights for {len(coords)} patches")
    order = np.argsort(-weights, kind="stable")[:k]
    return tuple(Evidence(rank, int(i if indices is None else indices[i]), int(coords[i][0]), int(coords[i][1]),
                          int(patch_side), float(weights[i])) for rank, i in enumerate(order, start=1))


def case_evidence(scopes: list["QuestionScope"], k: int = EVIDENCE_COUNT) -> tuple[Evidence, ...]:
    """The `k` heaviest patches over every slide of a case (each slide's weights sum to 1), each naming its slide."""
    found = [replace(e, slide=i) for i, scope in enumerate(scopes) for e in scope.evidence]
    found.sort(key=lambda e: -e.weight)
    return tuple(replace(e, rank=rank) for rank, e in enumerate(found[:k], start=1))


def parse_case_region(text: str, slides: int = 1) -> tuple[int, Region]:
    """`"x,y,w,h"` (the first slide) or `"N:x,y,w,h"` (slide N of the case, from 1) → (0-based slide index, Region)."""
    slide, _, rest = str(text or "").partition(":")
    if not rest:
        return 0, Region.parse(slide)
    number = _CASE_SLIDE.fullmatch(slide)  # not str.isdigit(): it takes "²", which int() refuses
    if number is None or not 1 <= int(number.group(1)) <= slides:
        raise ChatEXAONEPathError(f"A region names its slide by number from 1 to {slides} before a colon (e.g. "
                                  f"--region 2:4096,2048,1024,1024), got {str(text)[:60]!r}.")
    return int(slide) - 1, Region.parse(rest)


@dataclass
class QuestionScope:
    """What one question is about: the whole slide, or a region and the indices of its patches."""

    region: Region | None  # clipped to the slide; None: the whole slide
    indices: np.ndarray | None  # rows of the slide's features; None: all of them
    coords: torch.Tensor  # (n, 2) level-0 top-left of the patches in scope
    patch_side: int
    visual_tokens: torch.Tensor | None = None  # (1, K, d_llm), set by `run_tower`
    weights: torch.Tensor | None = None  # (n,) the pooling weights those tokens were made with
    clam_attention: torch.Tensor | None = None  # (n,) CLAM's softmax(a) over the same patches

    @property
    def evidence(self) -> tuple[Evidence, ...]:
        """The patches that weighed most in the tokens of this scope, heaviest first."""
        return top_evidence(self.weights, self.coords, self.patch_side, self.indices)


def question_scope(loaded, region: "Region | tuple | str | None") -> QuestionScope:
    """The scope of a question about `loaded` (a `LoadedSlide`): checked here, before any generation starts.

    Raises `EmptyRegionError` for a region outside the slide or without tissue patches.
    """
    attrs = loaded.features.attrs
    coords = loaded.features.coords
    side = patch_side_of(loaded.features)
    if region is None:
        return QuestionScope(None, None, coords, side, loaded.visual_tokens, loaded.attention,
                             getattr(loaded, "clam_attention", None))
    region = Region.of(region)
    width, height = int(attrs.get("level0_width") or 0), int(attrs.get("level0_height") or 0)
    inside = region.clipped(width, height) if width and height else region
    if inside is None:
        raise EmptyRegionError(f"The region {region} lies outside the slide ({width:,} × {height:,} px at level 0); "
                               "draw it over the slide.")
    indices = patches_in_region(coords, side, inside)
    if not len(indices):
        raise EmptyRegionError(f"The region {inside.describe()} holds no tissue patches, so the model has nothing to "
                               "look at there; draw it over tissue (inside the outline) or ask about the whole slide.")
    return QuestionScope(inside, indices, coords[torch.as_tensor(indices)], side)


@torch.no_grad()
def run_tower(scope: QuestionScope, loaded, model) -> QuestionScope:
    """Fill in a region's visual tokens and weights: the tower on that region's cached features only."""
    if scope.visual_tokens is None:
        features = loaded.features.features[torch.as_tensor(scope.indices)].float()
        tower = model.get_slide_tokens([features])
        scope.visual_tokens = tower.visual_tokens
        scope.weights = tower.pooling_weights[0].float().cpu()
        scope.clam_attention = tower.clam_attention[0].float().cpu()
    return scope


@dataclass
class SlideTurn(Turn):
    """A message that also says what it was about: a region, or (None) the whole slide; answers carry their evidence."""

    region: Region | None = None
    evidence: tuple[Evidence, ...] = ()
    slide: int = 0  # the slide of the case a region belongs to (0-based)
