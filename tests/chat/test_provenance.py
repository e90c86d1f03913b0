"""Feature provenance: chat and eval are served only features made like the checkpoint's training features."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.chat.provenance import (
    FeatureMismatchError, check_features, extractor_provenance, provenance_of, serving_extractor,
)
from chatexaonepath.chat.session import ChatSession
from chatexaonepath.errors import EncoderError
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor

EXAONEPATH = {"encoder": "exaonepath", "encoder_weights_sha256": "1f" * 32, "stain_norm": "none",
              "stain_target_sha256": "none", "patch_size": 256, "target_mpp": 0.5}


@pytest.fixture
def tiny_registered(tiny_encoder, monkeypatch):
    """The tiny test encoder under its name in the registry, so defaults can name it."""
    import chatexaonepath.vision_tower.encoder as encoder_module

    monkeypatch.setitem(encoder_module._ENCODERS, tiny_encoder.name, lambda weights=None, seed=0: tiny_encoder)
    return tiny_encoder


def test_matching_features_pass_and_others_are_refused_naming_both_sides():
    assert check_features(EXAONEPATH, dict(EXAONEPATH), "x.h5 has") is None
    assert check_features(None, {"encoder": "random-vit-b16"}, "x.h5 has") is None  # nothing recorded: unchecked
    random = {**EXAONEPATH, "encoder": "random-vit-b16", "encoder_weights_sha256": "9a" * 32}
    with pytest.raises(FeatureMismatchError) as refused:
        check_features(EXAONEPATH, random, "tumor.h5's features have")
    message = str(refused.value)
    assert "encoder=exaonepath, encoder_weights_sha256=1f1f1f1f1f1f…" in message
    assert "tumor.h5's features have encoder=random-vit-b16, encoder_weights_sha256=9a9a9a9a9a9a…" in message
    assert "stain_norm" not in message and message.endswith(".") and ". " not in message  # one sentence
    warning = check_features(EXAONEPATH, random, "tumor.h5's features have", allow=True)
    assert "encoder=random-vit-b16" in warning and "--allow-feature-mismatch" in warning


def test_files_written_before_stain_targets_count_as_without_one():
    old = provenance_of({"encoder": "exaonepath", "stain_norm": "macenko", "patch_size": np.int64(256),
                         "target_mpp": np.float64(0.5)})
    assert old["stain_target_sha256"] == "none" and old["patch_size"] == 256 and old["target_mpp"] == 0.5
    assert provenance_of({})["stain_target_sha256"] is None  # a .pt bag says nothing


@pytest.fixture
def model(tiny_llm_dir):
    config = ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm_dir), num_visual_tokens=1,
                                  aggregator={"in_dim": 64, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0},
                                  projector={"num_heads": 4}, prompt_style="llama2")
    torch.manual_seed(0)
    return ChatEXAONEPathForCausalLM.build(config, dtype="fp32")


def test_a_session_refuses_cached_features_unlike_the_training_ones(model, tiny_encoder, slides, tmp_path):
    """A model trained on EXAONEPath features is not silently served the tiny encoder's."""
    model.config.feature_provenance = EXAONEPATH
    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0)
    session = ChatSession(model, extract, features_dir=tmp_path, extractor=FeatureExtractor(extract, tiny_encoder))
    with pytest.raises(FeatureMismatchError, match="encoder=exaonepath.*tumor.tiff's features have encoder=tiny-vit"):
        session.load_slide(slides["tumor"])
    assert session.slide is None
    session.allow_feature_mismatch = True
    loaded = session.load_slide(slides["tumor"])
    assert "encoder=tiny-vit-test" in loaded.feature_warning
    model.config.feature_provenance = extractor_provenance(session.extractor)  # trained on exactly these
    assert session.load_slide(slides["tumor"]).feature_warning is None


def test_serving_extractor_takes_its_defaults_from_the_checkpoint(tiny_registered, tmp_path):
    from PIL import Image

    from chatexaonepath.synthetic.slides import stained_patch

    Image.fromarray(stained_patch(3)).save(tmp_path / "target.png")
    trained = FeatureExtractor(ExtractConfig(encoder=tiny_registered.name, stain_norm="macenko", patch_size=224,
                                             target_mpp=1.0, stain_target=str(tmp_path / "target.png")),
                               tiny_registered)
    config = SimpleNamespace(feature_provenance=extractor_provenance(trained))
    extractor, warning = serving_extractor(config, num_workers=0)
    assert warning is None and extractor.encoder is tiny_registered
    chosen = extractor.config
    assert (chosen.stain_norm, chosen.patch_size, chosen.target_mpp) == ("macenko", 224, 1.0)
    assert chosen.stain_target == str(tmp_path / "target.png")
    torch.testing.assert_close(extractor.normalizer.he_ref, trained.normalizer.he_ref)
    with pytest.raises(FeatureMismatchError, match="stain_norm=macenko.*this extraction uses stain_norm=none"):
        serving_extractor(config, stain_norm="none")
    _, warning = serving_extractor(config, stain_norm="none", allow_feature_mismatch=True)
    assert "stain_norm=none" in warning
    (tmp_path / "target.png").rename(tmp_path / "moved.png")  # the target is not where the features were made
    with pytest.raises(FeatureMismatchError, match="target image .*pass it with --stain-target"):
        serving_extractor(config)
    extractor, warning = serving_extractor(config, stain_target=str(tmp_path / "moved.png"))
    assert warning is None


def test_a_checkpoint_trained_on_exaonepath_says_so_when_its_weights_are_missing(monkeypatch):
    import chatexaonepath.vision_tower.encoder as encoder_module

    def missing(weights=None, seed=0):
        raise EncoderError("EXAONEPath weights are not in the Hugging Face cache")

    monkeypatch.setitem(encoder_module._ENCODERS, "exaonepath", missing)
    with pytest.raises(EncoderError, match="trained on exaonepath features, but that encoder cannot be loaded"):
        serving_extractor(SimpleNamespace(feature_provenance=EXAONEPATH))


def test_eval_refuses_test_features_unlike_the_training_ones(tmp_path):
    from chatexaonepath.eval.answers import GenerateConfig, check_test_features
    from chatexaonepath.eval.data import TestItem
    from chatexaonepath.vision_tower.features import write_features

    bag = np.zeros((3, 8), np.float32)
    write_features(tmp_path / "a.h5", bag, np.zeros((3, 2), np.int64), EXAONEPATH)
    write_features(tmp_path / "b.h5", bag, np.zeros((3, 2), np.int64), {**EXAONEPATH, "stain_norm": "macenko"})
    items = [TestItem(s, s, s, tmp_path / f"{s}.h5", [], "q", "r", "report", None, "reference") for s in ("a", "b")]
    config = GenerateConfig(model="m", data="d")
    assert check_test_features(items[:1], config, EXAONEPATH) == []
    with pytest.raises(FeatureMismatchError, match="stain_norm=none, but the test features b.h5 have stain_norm=macenko"):
        check_test_features(items, config, EXAONEPATH)
    with pytest.raises(FeatureMismatchError, match="--stain-norm asks for stain_norm=macenko"):
        check_test_features(items[1:], GenerateConfig(model="m", data="d", stain_norm="macenko"), EXAONEPATH)
    allowed = GenerateConfig(model="m", data="d", allow_feature_mismatch=True)
    assert len(check_test_features(items, allowed, EXAONEPATH)) == 1


def test_the_app_refuses_a_mismatch_or_shows_it_in_its_banner(model, tiny_registered, tmp_path):
    from chatexaonepath.webapp.engine import AppConfig, AppEngine

    trained = FeatureExtractor(ExtractConfig(encoder=tiny_registered.name), tiny_registered)
    model.config.feature_provenance = extractor_provenance(trained)
    model.config.tower_trained = True
    checkpoint = model.save_pretrained(tmp_path / "ckpt")
    settings = dict(model=str(checkpoint), example=False, stain_norm="macenko")
    with pytest.raises(FeatureMismatchError, match="stain_norm=none, but this extraction uses stain_norm=macenko"):
        AppEngine.load(AppConfig(**settings))
    engine = AppEngine.load(AppConfig(**settings, allow_feature_mismatch=True))
    try:
        assert engine.extractor.encoder is tiny_registered  # the checkpoint's encoder, by default
        banner = engine.card.banner()
        assert "features unlike the model's training features" in banner and "stain_norm=macenko" in banner
        session = engine.session("tab")
        assert session.chat.allow_feature_mismatch
    finally:
        engine.close()


def test_a_model_is_served_features_of_the_precision_it_learned_from(tiny_registered):
    """bf16 and fp32 features differ enough to move a small tower: serving follows the checkpoint's precision."""
    trained = FeatureExtractor(ExtractConfig(encoder=tiny_registered.name, precision="bf16"), tiny_registered)
    config = SimpleNamespace(feature_provenance=extractor_provenance(trained))
    assert config.feature_provenance["precision"] == "bf16"
    extractor, warning = serving_extractor(config, num_workers=0)
    assert warning is None and extractor.precision == "bf16"
    with pytest.raises(FeatureMismatchError, match="precision=bf16.*this extraction uses precision=fp32"):
        serving_extractor(config, precision="fp32")
    old = SimpleNamespace(feature_provenance={k: v for k, v in config.feature_provenance.items() if k != "precision"})
    assert serving_extractor(old, precision="fp32")[1] is None  # checkpoints that did not record it: unchecked
