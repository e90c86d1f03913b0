"""Fixtures for training tests: a tiny random LLaMA, small feature bags per slide, LLaVA data files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.chat.conftest import make_tiny_llm

DIM = 16  # feature width of the fake bags


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llama-train"))


def write_bags(folder: Path, slides: dict[str, int], seed: int = 0, patches: tuple[int, int] = (6, 14)) -> Path:
    """`<slide>.h5` bags whose mean depends on the slide's class index."""
    from chatexaonepath.vision_tower.features import write_features

    rng = np.random.default_rng(seed)
    for slide, label in slides.items():
        n = int(rng.integers(*patches))
        features = rng.normal(size=(n, DIM)).astype(np.float32) + 3.0 * np.eye(DIM, dtype=np.float32)[label]
        write_features(folder / f"{slide}.h5", features, np.zeros((n, 2), np.int64), {"encoder": "fake"})
    return folder


def record(record_id: str, image: str, *turns: str) -> dict:
    """A LLaVA record from alternating human/gpt texts."""
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(turns)]}


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """8 slides of 2 classes, captions (one per slide) and QA (two per slide, one multi-turn); read-only."""
    tmp_path = tmp_path_factory.mktemp("train-data")
    slides = {f"s{i}": i % 2 for i in range(8)}
    write_bags(tmp_path / "features", slides)
    names = ["alpha", "beta"]
    captions = [record(f"{s}-cap", s, "<image>\nDescribe this slide.", f"Class {names[c]} tissue.")
                for s, c in slides.items()]
    qa = []
    for s, c in slides.items():
        qa.append(record(f"{s}-q0", s, "<image>\nWhat is it?", f"{names[c].title()}."))
        qa.append(record(f"{s}-q1", s, "What is it?\n<image>", f"{names[c].title()}.", "Sure?", "Yes."))
    write_json(tmp_path / "captions.json", captions)
    write_json(tmp_path / "instruct.json", qa)
    return tmp_path


def phase_configs(phase: int, out: Path, data_file: Path, features: Path, **overrides):
    """Small, fast PhaseConfig and DataConfig for the tiny LLM."""
    from chatexaonepath.train.data import DataConfig
    from chatexaonepath.train.phases import PhaseConfig

    data_keys = {"val_fraction", "max_patches", "skip_missing", "val_data", "seed"}
    data = DataConfig(data=[str(data_file)], features_dir=str(features),
                      **{"val_fraction": 0.25, **{k: v for k, v in overrides.items() if k in data_keys}})
    settings = dict(phase=phase, out=str(out), batch_size=2, gradient_accumulation=1, epochs=1, report_to="none",
                    lora_r=4, lora_alpha=8, logging_steps=1, precision="fp32")
    settings.update({k: v for k, v in overrides.items() if k not in data_keys})
    return PhaseConfig(**settings), data


@pytest.fixture(scope="session")
def phase1_out(tmp_path_factory, dataset_dir, tiny_llm) -> Path:
    """A finished phase 1 on the tiny LLM (two epochs)."""
    from chatexaonepath.train.phases import train_phase

    out = tmp_path_factory.mktemp("runs") / "p1"
    train_phase(*phase_configs(1, out, dataset_dir / "captions.json", dataset_dir / "features", llm=str(tiny_llm),
                               epochs=2))
    return out
