"""Patients, not files: who a slide belongs to, splits that never put one patient on two sides, and
the record of a checkpoint's training patients that evaluation checks test patients against.

A patient is, first that applies: the TCGA barcode's first 12 characters (`TCGA-XX-XXXX`) when the
slide id looks like TCGA's; else the `--patient-map` CSV's entry for the slide; else the slide
itself (a slide with no known patient is its own patient — the cautious default for splitting would
be the opposite, but nothing else can be known). Two slides of one TCGA patient share one report,
so a split by slide file would put the same report on both sides.

It sits at the package root because training (the splits, the record) and evaluation (the check)
both need it and evaluation may not import training.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
import secrets
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

from .errors import ChatEXAONEPathError

T = TypeVar("T")

TCGA_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:$|[-._])", re.IGNORECASE)
# Suffixes a slide id may carry in data files: slide formats and feature files.
_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm", ".png",
             ".jpg", ".jpeg", ".h5", ".hdf5", ".pt", ".csv"}
SLIDE_COLUMNS = ("slide_id", "slide", "image", "filename", "slide_name")
PATIENT_COLUMNS = ("patient_id", "patient", "case_id", "case", "case_submitter_id")
HASH_SCHEME = "sha256-salted"


class PatientMapError(ChatEXAONEPathError):
    """A patient map or a recorded set of training patients is missing or malformed."""


def slide_key(slide: str | Path) -> str:
    """A slide's id as maps and barcodes see it: the file name without its slide or features suffix.

    `TCGA-LUSC/TCGA-21-1083-01Z-00-DX1.8288ca92.pt` → `TCGA-21-1083-01Z-00-DX1.8288ca92`.
    """
    name = Path(str(slide).strip()).name
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in _SUFFIXES else name


def patient_id(slide_id: str | Path, patient_map: Mapping[str, str] | None = None) -> str:
    """The patient a slide belongs to: TCGA barcode (12 chars), else the map's entry, else the slide id."""
    key = slide_key(slide_id)
    match = TCGA_BARCODE.match(key)
    if match:
        return match.group(1).upper()
    if patient_map:
        for candidate in (key, str(slide_id).strip(), Path(str(slide_id)).name):
            if candidate in patient_map:
                return patient_map[candidate]
    return key


def load_patient_map(path: str | Path) -> dict[str, str]:
    """slide id → patient id from a CSV with a header (`slide_id,patient_id`; common aliases accepted).

    A missing file, missing columns, an empty cell or one slide mapped to two patients raises
    PatientMapError naming the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise PatientMapError(f"Patient map not found: {path}.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise PatientMapError(f"{path} is not a readable CSV ({e}).") from e
    if not rows:
        raise PatientMapError(f"{path} is empty; it needs a header row with slide_id and patient_id.")
    header = [h.strip().lower() for h in rows[0]]
    slide_col = next((header.index(c) for c in SLIDE_COLUMNS if c in header), None)
    patient_col = next((header.index(c) for c in PATIENT_COLUMNS if c in header), None)
    if slide_col is None or patient_col is None:
        raise PatientMapError(f"{path} row 1 (the header) must name a slide column ({', '.join(SLIDE_COLUMNS)}) and a "
                              f"patient column ({', '.join(PATIENT_COLUMNS)}); it has {', '.join(header) or 'nothing'}.")
    mapping: dict[str, str] = {}
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(slide_col, patient_col):
            raise PatientMapError(f"{path} row {number} has {len(row)} column(s); the header has {len(header)}.")
        slide, patient = slide_key(row[slide_col]) if row[slide_col].strip() else "", row[patient_col].strip()
        if not slide or not patient:
            raise PatientMapError(f"{path} row {number} has an empty slide or patient cell.")
        if mapping.get(slide, patient) != patient:
            raise PatientMapError(f"{path} row {number} maps slide {slide!r} to patient {patient!r}, but an earlier "
                                  f"row maps it to {mapping[slide]!r}.")
        mapping[slide] = patient
    if not mapping:
        raise PatientMapError(f"{path} has a header but no rows.")
    return mapping


def patients_of(slide_ids: Iterable[str | Path], patient_map: Mapping[str, str] | None = None) -> set[str]:
    """The distinct patients of some slides."""
    return {patient_id(s, patient_map) for s in slide_ids}


def split_by_patient(items: Sequence[T], fractions: float | Sequence[float], seed: int = 0, *,
                     slide_of: Callable[[T], str | Path] = str,
                     patient_map: Mapping[str, str] | None = None) -> list[list[T]]:
    """Items split into groups by whole patients (a seeded choice), so no patient is in two groups.

    `fractions` as a float f gives [rest, held] with about f of the patients held out (at least one
    patient, never all of them, when there are two or more); as a list, one group per fraction,
    by share of patients. Items keep their order within each group.
    """
    shares = [1.0 - fractions, fractions] if isinstance(fractions, (int, float)) else list(fractions)
    if len(shares) < 2 or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"fractions must be one held-out share in [0, 1) or two or more non-negative shares, got {fractions!r}")
    patients = sorted(patients_of((slide_of(i) for i in items), patient_map))
    random.Random(seed).shuffle(patients)
    counts = _group_sizes(len(patients), [s / sum(shares) for s in shares])
    group_of, start = {}, 0
    for group, count in enumerate(counts):
        group_of.update({p: group for p in patients[start:start + count]})
        start += count
    groups: list[list[T]] = [[] for _ in shares]
    for item in items:
        groups[group_of[patient_id(slide_of(item), patient_map)]].append(item)
    return groups


def _group_sizes(n: int, shares: list[float]) -> list[int]:
    """Patients per group: rounded shares; a group asked for a positive share gets one patient while
    there are enough, and the first group (training) never ends up empty."""
    sizes = [int(round(s * n)) for s in shares]
    for i, share in enumerate(shares):
        if share > 0 and sizes[i] == 0 and n >= sum(1 for s in shares if s > 0):
            sizes[i] = 1
    while sum(sizes) > n:  # take from the largest other group, keeping group 0 non-empty
        order = sorted(range(len(sizes)), key=lambda i: (-(sizes[i] - (1 if i == 0 else 0)), i))
        sizes[order[0]] -= 1
    sizes[0] += n - sum(sizes)
    return sizes


# --- the record a checkpoint keeps of its training patients ---------------------------------------------
def hash_patient(patient: str, salt: str) -> str:
    """sha256 hex of `<salt>:<patient id>`: what a checkpoint records instead of the id itself."""
    return hashlib.sha256(f"{salt}:{patient}".encode("utf-8")).hexdigest()


def record_train_patients(patients: Iterable[str], *, hashed: bool = True, salt: str | None = None) -> list[str] | dict:
    """The `train_patients` value for training_args.json (docs/formats.md).

    Hashed (default): `{"scheme": "sha256-salted", "salt": <hex>, "hashes": [sorted hex digests]}`;
    plain: a sorted list of patient ids. The salt is random per checkpoint unless given.
    """
    ids = sorted(set(patients))
    if not hashed:
        return ids
    salt = salt or secrets.token_hex(16)
    return {"scheme": HASH_SCHEME, "salt": salt, "hashes": sorted(hash_patient(p, salt) for p in ids)}


def seen_in_training(test_patients: Iterable[str], recorded: object, where: str = "training_args.json") -> list[str]:
    """The test patients a checkpoint's `train_patients` record holds (sorted); a malformed record raises."""
    test_patients = sorted(set(test_patients))
    if isinstance(recorded, list) and all(isinstance(p, str) for p in recorded):
        known = set(recorded)
        return [p for p in test_patients if p in known]
    if isinstance(recorded, dict):
        scheme, salt, hashes = recorded.get("scheme"), recorded.get("salt"), recorded.get("hashes")
        if scheme != HASH_SCHEME or not isinstance(salt, str) or not salt or not isinstance(hashes, list):
            raise PatientMapError(f"{where}: train_patients must be a list of patient ids or "
                                  f'{{"scheme": "{HASH_SCHEME}", "salt": "...", "hashes": [...]}}; got scheme '
                                  f"{scheme!r}.")
        known = set(hashes)
        return [p for p in test_patients if hash_patient(p, salt) in known]
    raise PatientMapError(f"{where}: train_patients must be a list of patient ids or a salted-hash record, "
                          f"not {type(recorded).__name__}.")
