"""A checkpoint knows how unlike its training slides a slide is, and the session says so in one sentence."""

import json

import numpy as np
import pytest
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
from chatexaonepath.chat.session import ChatSession
from chatexaonepath.chat.typicality import TYPICALITY_FILE, UNTYPICAL_MESSAGE, Typicality
from chatexaonepath.vision_tower.extraction import ExtractConfig
from chatexaonepath.vision_tower.features import SlideFeatures, read_features

from .conftest import DIM


def bag(rng: np.random.Generator, label: int, n: int = 10, shift: float = 0.0, scale: float = 1.0) -> SlideFeatures:
    """A bag from the training slides' generator (conftest.write_bags), optionally shifted or spread."""
    x = rng.normal(size=(n, DIM)).astype(np.float32) * scale + 3.0 * np.eye(DIM, dtype=np.float32)[label] + shift
    return SlideFeatures(torch.from_numpy(x), torch.zeros((n, 2), dtype=torch.int64), {"encoder": "fake"})


def test_training_writes_thresholds_calibrated_on_its_own_slides(phase1_out, dataset_dir):
    saved = json.loads((phase1_out / TYPICALITY_FILE).read_text())
    assert saved["calibration"]["slides"] == 8 and (phase1_out / "typicality.safetensors").is_file()  # train and val slides
    model = ChatEXAONEPathForCausalLM.from_pretrained(phase1_out)
    assert model.typicality is not None
    mean, std = model.tower.feature_mean.cpu(), model.tower.feature_std.cpu()
    for path in sorted((dataset_dir / "features").glob("*.h5")):  # every calibration slide is typical
        assert model.typicality.assess(read_features(path).features, mean, std).typical


@pytest.mark.parametrize("kind", ["shifted", "spread", "partly"])
def test_new_slides_of_the_same_kind_pass_and_unlike_ones_are_flagged(phase1_out, kind):
    model = ChatEXAONEPathForCausalLM.from_pretrained(phase1_out)
    mean, std = model.tower.feature_mean.cpu(), model.tower.feature_std.cpu()
    rng = np.random.default_rng(123)
    like = [bag(rng, label) for label in (0, 1, 0, 1)]
    assert all(model.typicality.assess(b.features, mean, std).typical for b in like)
    if kind == "shifted":  # another stain or scanner: every patch moves
        odd = bag(rng, 0, shift=4.0)
    elif kind == "spread":  # another tissue type: patches scatter far wider
        odd = bag(rng, 1, scale=4.0)
    else:  # a third of the slide is nothing like the training patches
        x = bag(rng, 0, n=30).features
        x[:10] += 12.0
        odd = SlideFeatures(x, None, {"encoder": "fake"})
    result = model.typicality.assess(odd.features, mean, std)
    assert not result.typical and result.score > 1 and result.warning == UNTYPICAL_MESSAGE


def test_the_session_carries_the_warning_and_old_checkpoints_say_nothing(phase1_out, tmp_path):
    model = ChatEXAONEPathForCausalLM.from_pretrained(phase1_out)
    session = ChatSession(model, ExtractConfig(encoder="fake", num_workers=0), features_dir=tmp_path / "cache",
                          allow_feature_mismatch=True)
    rng = np.random.default_rng(5)
    assert session.use_features(bag(rng, 0), "ok.h5").typicality_warning is None
    flagged = session.use_features(bag(rng, 0, shift=6.0), "odd.h5")
    assert flagged.typicality_warning == UNTYPICAL_MESSAGE and "odd.h5" not in flagged.typicality_warning
    model.typicality = None  # what a checkpoint trained before typicality.json existed loads as
    assert session.use_features(bag(rng, 0, shift=6.0), "odd.h5").typicality_warning is None


def test_a_damaged_file_is_refused_in_one_sentence(tmp_path):
    (tmp_path / TYPICALITY_FILE).write_text(json.dumps({"thresholds": {"patch_distance": 0, "patch_tail": 1,
                                                                        "slide_distance": 1}}))
    with pytest.raises(ValueError, match="no typicality.safetensors beside it"):  # half a copied checkpoint
        Typicality.load(tmp_path)
    from safetensors.torch import save_file

    save_file({"patches": torch.zeros(2, 3), "means": torch.zeros(1, 3)}, str(tmp_path / "typicality.safetensors"))
    with pytest.raises(ValueError, match="not positive numbers"):
        Typicality.load(tmp_path)
    assert Typicality.load(tmp_path / "absent") is None


def test_every_slide_of_a_case_calibrates(tmp_path):
    """A case's second and third slides are training slides too: a threshold set on first slides alone flags them."""
    from types import SimpleNamespace

    from chatexaonepath.train.phases import calibrate_typicality
    from chatexaonepath.vision_tower.features import write_features

    rng = np.random.default_rng(0)
    paths = []
    for i, shift in enumerate((0.0, 0.0, 3.0)):  # the case's last slide sits further out than the others
        x = rng.normal(size=(12, DIM)).astype(np.float32) + shift
        paths.append(write_features(tmp_path / f"s{i}.h5", x, np.zeros((12, 2), np.int64), {"encoder": "fake"}))
    model = SimpleNamespace(tower=SimpleNamespace(feature_mean=torch.zeros(DIM), feature_std=torch.ones(DIM)))
    case = SimpleNamespace(features_path=paths[0], features_paths=tuple(paths))
    typicality = calibrate_typicality(model, [case])
    assert typicality.calibration["slides"] == 3 and typicality.means.shape == (3, DIM)
    assert typicality.assess(read_features(paths[2]).features, torch.zeros(DIM), torch.ones(DIM)).typical
