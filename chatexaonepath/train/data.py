"""Training data: LLaVA-format records + slide features → token ids, labels and feature bags.

Records (`{"id", "image", "conversations"}`, a JSON list or JSONL) are checked up front, so a
malformed one fails before any training with one sentence naming it. `image` is a slide id looked
up in the features folder, or a path to `.h5`/`.pt`/SlideChat `.csv` features — or a list of them, a
case of 1–8 slides (one `<image>` for the whole list, as SlideChat ships it, or one per slide), whose
features must all be made the same way. Conversations are tokenised by the same `PromptBuilder` that
chat uses at inference, with each slide of a case labelled as chat labels it (conversation.label_case),
so labels cover exactly the assistant replies. The validation split is by slide: all questions about
one slide, and every case that shares a slide with them, land on the same side.
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

from ..chat.conversation import IGNORE_INDEX, IMAGE_TOKEN, MAX_CASE_SLIDES, PromptBuilder, label_case, turns_from_llava
from ..chat.provenance import PROVENANCE_KEYS, describe, file_provenance
from ..errors import ChatEXAONEPathError
from ..vision_tower.features import FEATURE_SUFFIXES, read_features

logger = logging.getLogger(__name__)

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
    """One validated conversation about one slide, or about a case of several."""

    record_id: str
    features_paths: tuple[Path, ...]  # resolved features files, one per slide; a file's identity is its slide's
    conversations: list[dict]
    source: str  # "file.json #12", for error messages
    slide_names: tuple[str, ...] = ()  # how the labels of a case name its slides (the names `image` gives)

    @property
    def features_path(self) -> Path:
        """The (first) slide's features: the one slide of a single-slide record."""
        return self.features_paths[0]


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
    images = record_images(record, name)
    try:
        turns = turns_from_llava(record.get("conversations"))
    except ChatEXAONEPathError as e:
        raise DataError(f"Record {name}: {e}") from e
    if turns[-1].role != "assistant":
        raise DataError(f"Record {name} ends with a human message; it must end with the reply to learn.")
    counts = [turn.content.count(image_token) for turn in turns]
    if sum(counts) == 0:
        raise DataError(f"Record {name} has no {image_token} placeholder; put it in the first human message.")
    if sum(counts) > 1 and len(images) == 1:
        raise DataError(f"Record {name} has {sum(counts)} {image_token} placeholders; a conversation is about "
                        "exactly one slide, so keep one.")
    if sum(counts) not in (1, len(images)):
        raise DataError(f"Record {name} has {sum(counts)} {image_token} placeholders for a case of {len(images)} "
                        f"slides; use one per slide, or one for the whole case.")
    if any(c and turn.role != "user" for c, turn in zip(counts, turns)):
        raise DataError(f"Record {name} has {image_token} in a reply; it belongs in a human message.")
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and not turn.content.strip():
            raise DataError(f"Record {name} has an empty reply (message {i}); remove the record or fill the reply.")
    return str(record.get("id", where))


def record_images(record: dict, name: str) -> list[str]:
    """The slides a record's `image` names: one string, or a list of 1–8 (a case); else one sentence naming it."""
    image = record.get("image")
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(i, str) and i.strip() for i in images):
        raise DataError(f"Record {name} has no 'image' (a slide id or a features path, or a list of them for a case); "
                        "every sample needs a slide.")
    if len(images) > MAX_CASE_SLIDES:
        raise DataError(f"Record {name} lists {len(images)} slides; a case has at most {MAX_CASE_SLIDES}.")
    return [i.strip() for i in images]


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
            images = record_images(raw, where)
            resolved = [resolve_features(image, folder, Path(path).parent) for image in images]
            if any(r is None for r in resolved):
                missing.append(record_id)
                continue
            if len(resolved) > 1:
                features_provenance([Record(record_id, tuple(resolved), [], where)],
                                    what=f"The slides of case {record_id!r} ({where})")
            records.append(Record(record_id, tuple(resolved), raw["conversations"], where,
                                  tuple(Path(i).name for i in images)))
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
def slide_groups(records: list[Record]) -> dict[str, str]:
    """Each slide → its group: slides that share a case are one group (so they land on one side of a split)."""
    parent: dict[str, str] = {}

    def root(slide: str) -> str:
        while parent.setdefault(slide, slide) != slide:
            parent[slide] = parent[parent[slide]]
            slide = parent[slide]
        return slide

    for record in records:
        first = root(str(record.features_paths[0]))
        for path in record.features_paths[1:]:
            other = root(str(path))
            if other != first:
                parent[max(first, other)] = min(first, other)
                first = min(first, other)
    return {slide: root(slide) for slide in parent}


def split_by_slide(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, validation): a seeded choice of whole slides (with the cases they share), so no slide is on both sides."""
    groups = slide_groups(records)
    slides = sorted(set(groups.values()))
    if val_fraction <= 0:
        return records, []
    if len(slides) < 2:
        logger.warning("Only one slide (or case) in the data: training without a validation split.")
        return records, []
    count = min(len(slides) - 1, max(1, round(val_fraction * len(slides))))
    val_slides = set(random.Random(seed).sample(slides, count))
    train = [r for r in records if groups[str(r.features_path)] not in val_slides]
    val = [r for r in records if groups[str(r.features_path)] in val_slides]
    return train, val


def slide_paths(records: list[Record]) -> list[Path]:
    """Every slide's features file the records use, each once, sorted."""
    return sorted({path for r in records for path in r.features_paths})


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
    for path in slide_paths(records):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def features_provenance(records: list[Record], what: str = "The training features") -> dict:
    """How the features of `records` were made (chat/provenance.py): one way for all, else a DataError naming two.

    The checkpoint records it, so chat and evaluation can refuse features made differently; a model trained
    on a mix of encoders or stain settings would have no one kind of features to be served. Every slide of a
    case counts (`what` names them in the error).
    """
    first_path, first = None, None
    for path in slide_paths(records):
        provenance = file_provenance(path)
        if first is None:
            first_path, first = path, provenance
            continue
        differing = [key for key in PROVENANCE_KEYS if provenance.get(key) != first.get(key)]
        if differing:
            raise DataError(f"{what} were not all made the same way: {first_path.name} has "
                            f"{describe(first, differing)} but {path.name} has {describe(provenance, differing)}; "
                            "extract every slide with the same encoder and settings.")
    return first or {}


# -- the torch dataset --------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One tokenised record."""

    input_ids: list[int]
    labels: list[int]
    features_paths: tuple[Path, ...]


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
            turns = turns_from_llava(record.conversations)
            names = list(record.slide_names) or [p.name for p in record.features_paths]
            built = self.builder.build(label_case(turns, names, self.builder.image_token))
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
        return Sample(ids, labels, record.features_paths)

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
        """Ids, labels and `slide_features`: the slide's bag (N, D), or for a case the list of its slides' bags."""
        sample = self.samples[index]
        bags = []
        for slide, path in enumerate(sample.features_paths):
            bag = self._bag(path)  # (N, D)
            if self.max_patches is not None and bag.shape[0] > self.max_patches:
                rng = np.random.default_rng([self.seed, self.epoch, index, slide] if slide else
                                            [self.seed, self.epoch, index])
                keep = np.sort(rng.choice(bag.shape[0], self.max_patches, replace=False))
                bag = bag[torch.from_numpy(keep)]
            bags.append(bag)
        return {"input_ids": sample.input_ids, "labels": sample.labels,
                "slide_features": bags[0] if len(bags) == 1 else bags}

    def lengths(self) -> list[int]:
        """Token count of every sample."""
        return [len(s.input_ids) for s in self.samples]


@dataclass
class SlideCollator:
    """Right-pads text (labels with IGNORE_INDEX) and stacks feature bags with a patch mask.

    The bags of every slide of every sample are stacked in order; when a sample is a case, `slides_per_sample`
    says how many of them are its.
    """

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
        per_sample = [item["slide_features"] if isinstance(item["slide_features"], (list, tuple))
                      else [item["slide_features"]] for item in items]
        bags = [bag for sample in per_sample for bag in sample]
        patches = max(bag.shape[0] for bag in bags)
        dim = bags[0].shape[1]
        features = torch.zeros((len(bags), patches, dim), dtype=torch.float32)  # (S, N_max, D)
        mask = torch.zeros((len(bags), patches), dtype=torch.bool)  # (S, N_max)
        for i, bag in enumerate(bags):
            features[i, :bag.shape[0]] = bag.float()
            mask[i, :bag.shape[0]] = True
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "slide_features": features, "slide_mask": mask}
        if len(bags) != len(items):  # some sample is a case of several slides
            batch["slides_per_sample"] = torch.tensor([len(sample) for sample in per_sample])
        return batch


def features_dim(records: list[Record]) -> int:
    """The feature width of the bags (read from the first record's first slide)."""
    return int(read_features(records[0].features_path).features.shape[1])


def feature_statistics(records: list[Record], *, max_slides: int = 256, max_patches: int = 4096,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the training patches, from a seeded sample of slides and patches.

    The sample bounds the start-up cost on large cohorts (reading every bag could take hours).
    """
    paths = slide_paths(records)
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
        "train_slides": len(slide_paths(train)), "val_slides": len(slide_paths(val)),
        "val_slide_files": sorted({p.name for p in slide_paths(val)}),
        "case_records": sum(len(r.features_paths) > 1 for r in train + val),
        "skipped_missing": len(loaded.missing), "skipped_missing_ids": loaded.missing[:100],
        "data_sha256": combined_sha256(files.values()),
    }


def combined_sha256(file_hashes: Iterable[str]) -> str:
    """One hash for a set of data files, whatever their order or paths (a run's `data_sha256`)."""
    return hashlib.sha256("".join(sorted(file_hashes)).encode()).hexdigest()


def data_files_sha256(paths: Iterable[str | Path]) -> str:
    """The `data_sha256` a run on these data files records: what resuming and retraining compare."""
    return combined_sha256(file_sha256(p) for p in paths)
