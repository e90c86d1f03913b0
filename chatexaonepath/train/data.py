"""Training data: LLaVA-format records + slide features → token ids, labels and feature bags.

Records (`{"id", "image", "conversations"}`, a JSON list or JSONL) are checked up front, so a
malformed one fails before any training with one sentence naming it. `image` is a slide id looked
up in the features folder, or a path to `.h5`/`.pt` features. Conversations are tokenised by the
same `PromptBuilder` that chat uses at inference, so labels cover exactly the assistant replies.
The validation split is by slide: all questions about one slide land on the same side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..chat.conversation import IGNORE_INDEX, IMAGE_TOKEN, PromptBuilder, turns_from_llava
from ..chat.provenance import PROVENANCE_KEYS, describe, file_provenance
from ..errors import ChatEXAONEPathError
from ..vision_tower.features import read_features

logger = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt")
# Slide-file suffixes some datasets leave on `image` ("TCGA-…-01Z-00-DX1.svs"): the features are named by stem.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".dcm", ".png", ".jpg")


class DataError(ChatEXAONEPathError):
    """Training data is unreadable, malformed, or refers to features that are not there."""


@dataclass
class DataConfig:
    """Where the data is and how it is split and sampled; saved with every checkpoint."""

    data: list[str] = field(default_factory=list)  # LLaVA JSON / JSONL files
    features_dir: str | None = None  # where slide ids are looked up (`<id>.h5` or `<id>.pt`)
    val_data: list[str] = field(default_factory=list)  # explicit validation files (then no split)
    val_fraction: float = 0.05  # of slides, not of records
    max_patches: int | None = None  # random subsample of larger bags during training only
    max_length: int | None = None  # tokens; longer samples are cut at the end (never through the image)
    skip_missing: bool = False  # drop records whose features are missing (counted) instead of failing
    seed: int = 0

    def __post_init__(self) -> None:
        self.data = [str(p) for p in self.data]
        self.val_data = [str(p) for p in self.val_data]
        if not self.data:
            raise DataError("No training data given; pass --data FILE (LLaVA JSON or JSONL).")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")
        if self.max_patches is not None and self.max_patches < 1:
            raise DataError(f"--max-patches must be at least 1, got {self.max_patches}.")


@dataclass
class Record:
    """One validated conversation about one slide."""

    record_id: str
    features_path: Path  # resolved features file; its identity is the slide's identity
    conversations: list[dict]
    source: str  # "file.json #12", for error messages


# -- reading and checking records -----------------------------------------------------------------------
def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs from a JSON list or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file not found: {path}.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path.name} line {line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no} is not valid JSON: {e.msg}.") from e
        return records
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}).") from e
    return [(f"{path.name} #{i}", record) for i, record in enumerate(loaded)]


def check_record(record: object, where: str, image_token: str = IMAGE_TOKEN) -> str:
    """Raise DataError naming the record unless it has exactly one image placeholder and non-empty replies.

    Returns the record's id (or its position when it has none).
    """
    if not isinstance(record, dict):
        raise DataError(f"Record {where} is not a JSON object with id, image and conversations.")
    name = f"{record['id']!r} ({where})" if "id" in record else where
    if not isinstance(record.get("image"), str) or not record["image"].strip():
        raise DataError(f"Record {name} has no 'image' (a slide id or a features path); every sample needs a slide.")
    try:
        turns = turns_from_llava(record.get("conversations"))
    except ChatEXAONEPathError as e:
        raise DataError(f"Record {name}: {e}") from e
    if turns[-1].role != "assistant":
        raise DataError(f"Record {name} ends with a human message; it must end with the reply to learn.")
    counts = [turn.content.count(image_token) for turn in turns]
    if sum(counts) == 0:
        raise DataError(f"Record {name} has no {image_token} placeholder; put it in the first human message.")
    if sum(counts) > 1:
        raise DataError(f"Record {name} has {sum(counts)} {image_token} placeholders; a conversation is about "
                        "exactly one slide, so keep one.")
    if any(c and turn.role != "user" for c, turn in zip(counts, turns)):
        raise DataError(f"Record {name} has {image_token} in a reply; it belongs in a human message.")
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and not turn.content.strip():
            raise DataError(f"Record {name} has an empty reply (message {i}); remove the record or fill the reply.")
    return str(record.get("id", where))


def resolve_features(image: str, features_dir: Path | None, data_dir: Path) -> Path | None:
    """The features file a record's `image` names, or None when it is not there."""
    candidates: list[Path] = []
    image_path = Path(image)
    if image_path.suffix.lower() in FEATURE_SUFFIXES:
        candidates += [image_path] if image_path.is_absolute() else \
            [p / image_path for p in (features_dir, data_dir) if p is not None]
    elif features_dir is not None:
        stem = image_path.name
        if image_path.suffix.lower() in SLIDE_SUFFIXES:
            stem = image_path.stem
        candidates += [features_dir / f"{stem}{suffix}" for suffix in (".h5", ".pt")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return None


@dataclass
class LoadedRecords:
    """Validated records, and those dropped because their features are missing."""

    records: list[Record]
    missing: list[str]  # record ids whose features were not found (only with skip_missing)


def load_records(paths: list[str], features_dir: str | None, *, skip_missing: bool = False,
                 image_token: str = IMAGE_TOKEN) -> LoadedRecords:
    """Read, check and resolve every record of `paths`; missing features fail (or are skipped, counted)."""
    folder = Path(features_dir) if features_dir else None
    if folder is not None and not folder.is_dir():
        raise DataError(f"Features folder not found: {folder}.")
    records, missing = [], []
    for path in paths:
        for where, raw in read_records(path):
            record_id = check_record(raw, where, image_token)
            resolved = resolve_features(raw["image"].strip(), folder, Path(path).parent)
            if resolved is None:
                missing.append(record_id)
                continue
            records.append(Record(record_id, resolved, raw["conversations"], where))
    if missing and not skip_missing:
        hint = "" if folder else " (no --features folder was given)"
        raise DataError(f"Features are missing for {len(missing)} record(s), first: {', '.join(missing[:5])}{hint}; "
                        "extract them with `chatexaonepath slide extract`, or pass --skip-missing to leave them out.")
    if missing:
        logger.warning("Skipped %d record(s) whose features are missing (first: %s)", len(missing),
                       ", ".join(missing[:5]))
    if not records:
        raise DataError(f"No usable records in {', '.join(map(str, paths))}.")
    return LoadedRecords(records, missing)


# -- the split ------------------------------------------------------------------------------------------
def split_by_slide(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, validation): a seeded choice of whole slides, so no slide is on both sides."""
    slides = sorted({str(r.features_path) for r in records})
    if val_fraction <= 0:
        return records, []
    if len(slides) < 2:
        logger.warning("Only one slide in the data: training without a validation split.")
        return records, []
    count = min(len(slides) - 1, max(1, round(val_fraction * len(slides))))
    val_slides = set(random.Random(seed).sample(slides, count))
    train = [r for r in records if str(r.features_path) not in val_slides]
    val = [r for r in records if str(r.features_path) in val_slides]
    return train, val


# -- fingerprints saved with each checkpoint ------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def features_fingerprint(records: list[Record]) -> str:
    """A cheap digest of the feature files used: names and sizes (hashing terabytes of bags would cost hours)."""
    digest = hashlib.sha256()
    for path in sorted({r.features_path for r in records}):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def features_provenance(records: list[Record]) -> dict:
    """How the features of `records` were made (chat/provenance.py): one way for all, else a DataError naming two.

    The checkpoint records it, so chat and evaluation can refuse features made differently; a model trained
    on a mix of encoders or stain settings would have no one kind of features to be served.
    """
    first_path, first = None, None
    for path in sorted({r.features_path for r in records}):
        provenance = file_provenance(path)
        if first is None:
            first_path, first = path, provenance
            continue
        differing = [key for key in PROVENANCE_KEYS if provenance[key] != first[key]]
        if differing:
            raise DataError(f"The training features were not all made the same way: {first_path.name} has "
                            f"{describe(first, differing)} but {path.name} has {describe(provenance, differing)}; "
                            "extract every slide with the same encoder and settings.")
    return first or {}


# -- the torch dataset --------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One tokenised record."""

    input_ids: list[int]
    labels: list[int]
    features_path: Path


class SlideConversationDataset(torch.utils.data.Dataset):
    """Tokenised conversations with their slides' feature bags (read lazily, a few kept in memory)."""

    def __init__(self, records: list[Record], builder: PromptBuilder, *, max_length: int | None = None,
                 max_patches: int | None = None, seed: int = 0, cache_size: int = 256) -> None:
        self.builder, self.max_patches, self.seed = builder, max_patches, seed
        self.epoch = 0
        self.truncated = 0
        self.samples = [self._tokenise(r, max_length) for r in records]
        self._cache: OrderedDict[Path, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def _tokenise(self, record: Record, max_length: int | None) -> Sample:
        try:
            built = self.builder.build(turns_from_llava(record.conversations))
        except ChatEXAONEPathError as e:
            raise DataError(f"Record {record.record_id!r} ({record.source}): {e}") from e
        ids, labels = built.input_ids, built.labels
        if max_length is not None and len(ids) > max_length:
            image_end = max(i for i, t in enumerate(ids) if t == self.builder.image_token_id) + 1
            if image_end > max_length or all(x == IGNORE_INDEX for x in labels[:max_length]):
                raise DataError(f"Record {record.record_id!r} ({record.source}) needs {len(ids)} tokens and has no "
                                f"reply within --max-length {max_length}; raise --max-length or shorten it.")
            ids, labels = ids[:max_length], labels[:max_length]
            self.truncated += 1
        return Sample(ids, labels, record.features_path)

    def set_epoch(self, epoch: int) -> None:
        """Patch subsampling depends on (seed, epoch, index), so a resumed run draws the same patches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _bag(self, path: Path) -> torch.Tensor:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        bag = read_features(path).features
        self._cache[path] = bag
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return bag

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        bag = self._bag(sample.features_path)  # (N, D)
        if self.max_patches is not None and bag.shape[0] > self.max_patches:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            keep = np.sort(rng.choice(bag.shape[0], self.max_patches, replace=False))
            bag = bag[torch.from_numpy(keep)]
        return {"input_ids": sample.input_ids, "labels": sample.labels, "slide_features": bag}

    def lengths(self) -> list[int]:
        """Token count of every sample."""
        return [len(s.input_ids) for s in self.samples]


@dataclass
class SlideCollator:
    """Right-pads text (labels with IGNORE_INDEX) and stacks feature bags with a patch mask."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[i, :n] = torch.tensor(item["input_ids"])
            labels[i, :n] = torch.tensor(item["labels"])
            attention_mask[i, :n] = 1
        patches = max(item["slide_features"].shape[0] for item in items)
        dim = items[0]["slide_features"].shape[1]
        features = torch.zeros((len(items), patches, dim), dtype=torch.float32)  # (B, N_max, D)
        mask = torch.zeros((len(items), patches), dtype=torch.bool)  # (B, N_max)
        for i, item in enumerate(items):
            n = item["slide_features"].shape[0]
            features[i, :n] = item["slide_features"].float()
            mask[i, :n] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "slide_features": features, "slide_mask": mask}


def features_dim(records: list[Record]) -> int:
    """The feature width of the bags (read from the first record's file)."""
    return int(read_features(records[0].features_path).features.shape[1])


def feature_statistics(records: list[Record], *, max_slides: int = 256, max_patches: int = 4096,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the training patches, from a seeded sample of slides and patches.

    The sample bounds the start-up cost on large cohorts (reading every bag could take hours).
    """
    paths = sorted({r.features_path for r in records})
    if len(paths) > max_slides:
        paths = sorted(random.Random(seed).sample(paths, max_slides))
    total = total_sq = None
    count = 0
    for i, path in enumerate(paths):
        bag = read_features(path).features
        if bag.shape[0] > max_patches:
            keep = np.random.default_rng([seed, i]).choice(bag.shape[0], max_patches, replace=False)
            bag = bag[torch.from_numpy(np.sort(keep))]
        bag = bag.double()
        total = bag.sum(0) if total is None else total + bag.sum(0)
        total_sq = (bag * bag).sum(0) if total_sq is None else total_sq + (bag * bag).sum(0)
        count += bag.shape[0]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def data_summary(config: DataConfig, train: list[Record], val: list[Record], loaded: LoadedRecords) -> dict:
    """What went into a run: file hashes, feature fingerprint, split sizes (saved in training_args.json)."""
    files = {str(Path(p).resolve()): file_sha256(p) for p in [*config.data, *config.val_data]}
    return {
        "config": asdict(config), "files_sha256": files,
        "features_fingerprint": features_fingerprint(train + val),
        "train_records": len(train), "val_records": len(val),
        "train_slides": len({r.features_path for r in train}), "val_slides": len({r.features_path for r in val}),
        "val_slide_files": sorted({r.features_path.name for r in val}),
        "skipped_missing": len(loaded.missing), "skipped_missing_ids": loaded.missing[:100],
        "data_sha256": combined_sha256(files.values()),
    }


def combined_sha256(file_hashes: Iterable[str]) -> str:
    """One hash for a set of data files, whatever their order or paths (a run's `data_sha256`)."""
    return hashlib.sha256("".join(sorted(file_hashes)).encode()).hexdigest()


def data_files_sha256(paths: Iterable[str | Path]) -> str:
    """The `data_sha256` a run on these data files records: what resuming and retraining compare."""
    return combined_sha256(file_sha256(p) for p in paths)
