"""Checkpoints record how their training features were made; training refuses a mix, phase 2 refuses other kinds."""

from __future__ import annotations

import numpy as np
import pytest

from chatexaonepath.chat.provenance import FeatureMismatchError
from chatexaonepath.train.data import DataError
from chatexaonepath.train.phases import train_phase
from tests.train.conftest import DIM, phase_configs, record, write_json


def write_bag(path, **attrs):
    from chatexaonepath.vision_tower.features import write_features

    features = np.random.default_rng(0).normal(size=(8, DIM)).astype(np.float32)
    write_features(path, features, np.zeros((8, 2), np.int64), attrs)


def captions(tmp_path, slides):
    return write_json(tmp_path / "captions.json",
                      [record(f"{s}-cap", s, "<image>\nDescribe this slide.", "Some tissue.") for s in slides])


def test_training_on_features_made_two_ways_is_refused_naming_both(tmp_path, tiny_llm):
    made = dict(encoder="exaonepath", encoder_weights_sha256="ab" * 32, patch_size=256, target_mpp=0.5)
    write_bag(tmp_path / "features" / "s0.h5", **made, stain_norm="none")
    write_bag(tmp_path / "features" / "s1.h5", **made, stain_norm="macenko")
    write_bag(tmp_path / "features" / "s2.h5", **made, stain_norm="none")
    config, data = phase_configs(1, tmp_path / "p1", captions(tmp_path, ["s0", "s1", "s2"]), tmp_path / "features",
                                 llm=str(tiny_llm), val_fraction=0.0)
    with pytest.raises(DataError, match=r"s0\.h5 has stain_norm=none but s1\.h5 has stain_norm=macenko"):
        train_phase(config, data)
    assert not (tmp_path / "p1" / "config.json").exists()


def test_phase2_refuses_features_unlike_phase_1s(tmp_path, phase1_out):
    for slide in ("t0", "t1"):
        write_bag(tmp_path / "features" / f"{slide}.h5", encoder="other-encoder")
    data = write_json(tmp_path / "qa.json", [record(f"{s}-q", s, "<image>\nWhat is it?", "Alpha.") for s in ("t0", "t1")])
    config, data_config = phase_configs(2, tmp_path / "p2", data, tmp_path / "features", init=str(phase1_out),
                                        val_fraction=0.0)
    with pytest.raises(FeatureMismatchError, match="encoder=fake, but the phase-2 features have encoder=other-encoder"):
        train_phase(config, data_config)
