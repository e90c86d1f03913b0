"""The features file: `<slide_id>.h5`, CLAM/TRIDENT-compatible, written atomically.

Layout (docs/formats.md): dataset `features` (N×D float16), dataset `coords` (N×2 int64, level-0
top-left x, y), and attributes describing how they were made. A file that exists is complete.
`read_features` also reads the `.pt` tensors that WSI-Bench ships and SlideChat's `.csv` feature files
(`read_slidechat_csv`: per-patch CONCH features, their provenance recorded as `external: slidechat-csv`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FeaturesError
from ..fileio import atomic_write_with

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Attributes that must match for an existing file to be reused instead of re-extracted.
SETTINGS_ATTRS = (
    "encoder", "encoder_weights_sha256", "stain_norm", "stain_target_sha256", "patch_size", "target_mpp", "level0_mpp",
    "min_tissue", "tissue_config", "precision", "decoder", "slide_fingerprint", "version",
)
# What a file written before an attribute existed was made with (every file before `decoder` used OpenSlide,
# every one before `stain_target_sha256` the default Macenko reference or none).
SETTINGS_DEFAULTS = {"decoder": "openslide", "stain_target_sha256": "none"}
# The feature files `read_features` reads (a record's `image` naming one is a path, not a slide id): training and
# evaluation resolve the same names, so SlideChat's `.csv` data both trains and is evaluated.
FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".csv")


@dataclass
class SlideFeatures:
    """A bag of patch features: features (N, D), level-0 coords (N, 2) when known, and attrs."""

    features: torch.Tensor  # (N, D), stored dtype (float16 for our files)
    coords: torch.Tensor | None  # (N, 2) int64 level-0 top-left (x, y); None when the file has none
    attrs: dict = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return self.features.shape[0]


def write_features(path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: dict) -> Path:
    """Write a features file atomically (fileio.atomic_write_with): a temp file in the same folder, then a rename."""
    import h5py

    path = Path(path)
    if features.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise ValueError(f"features {features.shape} and coords {coords.shape} do not describe one bag")

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.astype(np.float16))
            f.create_dataset("coords", data=coords.astype(np.int64))
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
            f.attrs["version"] = FORMAT_VERSION

    # 0600: features describe a patient's slide, readable by this user only
    atomic_write_with(path, write, mode=0o600)
    return path


def read_attrs(path: str | Path) -> dict:
    """The attributes of a features file, without loading its arrays."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise FeaturesError(f"{path} is not a readable HDF5 features file: {e}.") from e


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def read_features(path: str | Path) -> SlideFeatures:
    """Read a `.h5` features file (ours, CLAM or TRIDENT) or a `.pt` tensor / dict of tensors."""
    path = Path(path)
    if not path.exists():
        raise FeaturesError(f"Features file not found: {path}.")
    if path.suffix == ".pt":
        return _read_pt(path)
    if path.suffix.lower() == ".csv":
        return read_slidechat_csv(path)
    if path.suffix not in (".h5", ".hdf5"):
        raise FeaturesError(f"{path} is neither a .h5, a .pt nor a SlideChat .csv features file.")
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise FeaturesError(f"{path} has no 'features' dataset (found: {', '.join(f.keys()) or 'nothing'}).")
            features = np.asarray(f["features"][:])
            coords = np.asarray(f["coords"][:]) if "coords" in f else None
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise FeaturesError(f"{path} is not a readable HDF5 file: {e}.") from e
    if features.ndim == 3 and features.shape[0] == 1:  # TRIDENT/CLAM sometimes keep a batch axis
        features = features[0]
    if coords is not None and coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    return _validated(path, torch.from_numpy(features), None if coords is None else torch.from_numpy(coords), attrs)


def _read_pt(path: Path) -> SlideFeatures:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise FeaturesError(f"{path} is not a readable torch features file: {e}.") from e
    coords = None
    if isinstance(obj, dict):
        key = next((k for k in ("features", "feats", "feature", "embeddings") if k in obj), None)
        if key is None:
            raise FeaturesError(f"{path} holds a dict without a features tensor (keys: {', '.join(map(str, obj))}).")
        coords = obj.get("coords")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise FeaturesError(f"{path} holds a {type(obj).__name__}, not a features tensor.")
    if obj.ndim == 3 and obj.shape[0] == 1:
        obj = obj[0]
    if isinstance(coords, np.ndarray):
        coords = torch.from_numpy(coords)
    return _validated(path, obj, coords, {})


SLIDECHAT_CSV = "slidechat-csv"
# What a SlideChat .csv says about how it was made: nothing but its format, so it is recorded as external.
SLIDECHAT_ATTRS = {"encoder": f"external: {SLIDECHAT_CSV}", "feature_format": SLIDECHAT_CSV}
_GRID_NAME = re.compile(r"(\d+)_(\d+)(?:\.[A-Za-z]+)?$")


def read_slidechat_csv(path: str | Path) -> SlideFeatures:
    """A SlideChat (DSMIL-style) features `.csv`: a header `0,1,…,D-1` of feature columns, one patch per row.

    Extra columns may follow: a patch path whose file name is its grid position `col_row.jpeg` (`img_path`, as
    SlideChat's extraction writes) gives the coords in grid units (`coords_unit: grid`); numeric `x`,`y` columns
    give level-0 pixels. Anything else malformed raises one sentence naming the file and the row.
    """
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise FeaturesError(f"{path} is not a readable CSV features file: {e}.") from e
    if len(rows) < 2:
        raise FeaturesError(f"{path} has no patches: a SlideChat features CSV is a header row and one row per patch.")
    header = [name.strip() for name in rows[0]]
    width = 0
    while width < len(header) and header[width] == str(width):
        width += 1
    if width == 0:
        raise FeaturesError(f"{path} does not start with the feature columns 0,1,2,… that SlideChat's features CSVs "
                            f"have (its header starts {','.join(header[:3])[:60]!r}).")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise FeaturesError(f"{path} line {number} has {len(row)} fields where the header has {len(header)}.")
    try:
        features = np.asarray([row[:width] for row in rows[1:]], dtype=np.float32)  # (N, D)
    except ValueError:
        bad = next(n for n, row in enumerate(rows[1:], start=2) if not _numeric(row[:width]))
        raise FeaturesError(f"{path} line {bad} has a feature value that is not a number.") from None
    coords, attrs = _csv_coords(path, header, rows[1:]), dict(SLIDECHAT_ATTRS)
    if coords is not None and header.count("x") == 0:
        attrs["coords_unit"] = "grid"
    return _validated(path, torch.from_numpy(features), None if coords is None else torch.from_numpy(coords), attrs)


def _numeric(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def _csv_coords(path: Path, header: list[str], rows: list[list[str]]) -> np.ndarray | None:
    """(N, 2) coords from `x`,`y` columns or from patch names `col_row.jpeg`; None when the file has neither."""
    if "x" in header and "y" in header:
        x, y = header.index("x"), header.index("y")
        try:
            return np.asarray([[float(row[x]), float(row[y])] for row in rows]).astype(np.int64)
        except ValueError:
            raise FeaturesError(f"{path} has an x or y value that is not a number.") from None
    column = next((header.index(n) for n in ("img_path", "path", "filename", "patch") if n in header), None)
    if column is None:
        return None
    found = [_GRID_NAME.search(Path(row[column].strip()).name) for row in rows]
    if not all(found):
        bad = next(n for n, match in enumerate(found, start=2) if match is None)
        raise FeaturesError(f"{path} line {bad}: the patch name in {header[column]!r} is not 'col_row.jpeg', so its "
                            "position is unknown.")
    return np.asarray([[int(m.group(1)), int(m.group(2))] for m in found], dtype=np.int64)


def _validated(path: Path, features: torch.Tensor, coords: torch.Tensor | None, attrs: dict) -> SlideFeatures:
    if features.ndim != 2 or features.shape[0] == 0:
        raise FeaturesError(f"{path} has features of shape {tuple(features.shape)}; expected (patches, dim) with patches > 0.")
    if coords is not None and tuple(coords.shape) != (features.shape[0], 2):
        raise FeaturesError(f"{path} has {features.shape[0]} features but coords of shape {tuple(coords.shape)}.")
    if not torch.isfinite(features.float()).all():
        raise FeaturesError(f"{path} contains NaN or infinite features.")
    return SlideFeatures(features, None if coords is None else coords.long(), attrs, path)


def settings_match(path: Path, expected: dict) -> bool:
    """True when `path` exists, is readable and was made with exactly the `expected` settings."""
    if not path.exists():
        return False
    try:
        attrs = read_attrs(path)
    except FeaturesError:
        logger.warning("%s is unreadable; it will be extracted again.", path)
        return False
    differing = [k for k in SETTINGS_ATTRS
                 if k in expected and str(attrs.get(k, SETTINGS_DEFAULTS.get(k))) != str(expected[k])]
    if differing:
        logger.warning("%s was made with other settings (%s); it will be extracted again.", path, ", ".join(differing))
    return not differing
