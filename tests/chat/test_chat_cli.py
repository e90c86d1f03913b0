"""`chatexaonepath chat` with a checkpoint: extraction defaults from its feature provenance, and the heatmap it writes."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from chatexaonepath.chat.provenance import FeatureMismatchError

pytestmark = pytest.mark.slow  # a real (random) ViT-B/16 extracts the slide: ~50 s for the module on 2 cores


@pytest.fixture(scope="module")
def random_vit():
    from chatexaonepath.vision_tower.encoder import build_encoder

    return build_encoder("random-vit-b16")


@pytest.fixture(autouse=True)
def one_random_vit(random_vit, monkeypatch):
    """Build the random ViT-B/16 once (its weights are seeded, so every build is the same)."""
    import chatexaonepath.vision_tower.encoder as encoder_module

    real = encoder_module.build_encoder
    monkeypatch.setattr(encoder_module, "build_encoder",
                        lambda name, weights=None, seed=0: random_vit if (name, weights, seed) ==
                        ("random-vit-b16", None, 0) else real(name, weights, seed))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_llm_dir, random_vit):
    """A 'trained' checkpoint on random-ViT-B/16 features: non-zero queries, its feature provenance recorded."""
    from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
    from chatexaonepath.chat.provenance import extractor_provenance
    from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor

    config = ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm_dir), num_visual_tokens=2,
                                  aggregator={"in_dim": 768, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0},
                                  projector={"num_heads": 4}, prompt_style="llama2", tower_trained=True)
    torch.manual_seed(0)
    model = ChatEXAONEPathForCausalLM.build(config, dtype="fp32")
    torch.nn.init.normal_(model.tower.projector.queries, std=10.0)
    extractor = FeatureExtractor(ExtractConfig(encoder="random-vit-b16"), random_vit)
    model.config.feature_provenance = extractor_provenance(extractor)
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


def run_chat(*args):
    from chatexaonepath.cli import app

    return CliRunner().invoke(app, ["chat", *map(str, args)])


def test_chat_extracts_like_the_training_features_and_draws_the_pooling_weights(checkpoint, slides, tmp_path,
                                                                                 monkeypatch):
    """No --encoder: the checkpoint's random-vit-b16 is used (EXAONEPath's weights would be a mismatch)."""
    import chatexaonepath.vision_tower.heatmap as heatmap_module
    from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
    from chatexaonepath.vision_tower.features import read_features

    monkeypatch.setenv("CHATEXAONEPATH_CACHE", str(tmp_path / "cache"))
    drawn = []
    real = heatmap_module.render_heatmap

    def recording(slide, coords, weights, **kwargs):
        drawn.append(torch.as_tensor(weights).clone())
        return real(slide, coords, weights, **kwargs)

    monkeypatch.setattr(heatmap_module, "render_heatmap", recording)
    result = run_chat(slides["tumor"], "--model", checkpoint, "--question", "Hi", "--max-new-tokens", "2",
                      "--heatmap", tmp_path / "pooling.png", "--clam-heatmap", tmp_path / "clam.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pooling.png").is_file() and (tmp_path / "clam.png").is_file()
    features = read_features(next((tmp_path / "cache" / "features").rglob("tumor.h5")))
    assert features.attrs["encoder"] == "random-vit-b16"
    model = ChatEXAONEPathForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        tower = model.get_slide_tokens([features.features.float()])
    pooling, clam = drawn
    torch.testing.assert_close(pooling, tower.pooling_weights[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(clam, tower.clam_attention[0])
    assert (pooling - clam).abs().max() > 1e-3  # two different maps, far beyond float noise


def test_chat_refuses_features_made_otherwise_unless_allowed(checkpoint, slides, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATEXAONEPATH_CACHE", str(tmp_path / "cache"))
    result = run_chat(slides["tumor"], "--model", checkpoint, "--question", "Hi", "--stain-norm", "macenko")
    assert isinstance(result.exception, FeatureMismatchError)
    message = str(result.exception)
    assert "trained on features with stain_norm=none" in message and "stain_norm=macenko" in message
    assert message.endswith(".") and ". " not in message and "--allow-feature-mismatch" in message  # one sentence
    allowed = run_chat(slides["tumor"], "--model", checkpoint, "--question", "Hi", "--max-new-tokens", "1",
                       "--stain-norm", "macenko", "--allow-feature-mismatch")
    assert allowed.exit_code == 0, allowed.output
    assert "Warning" in allowed.output and "stain_norm=macenko" in allowed.output
