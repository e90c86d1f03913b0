"""`chatexaonepath chat a b c`: one case in the terminal; `--region N:x,y,w,h` names its slide (fast: fake features)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.vision_tower.features import SlideFeatures


@pytest.fixture
def fake_chat(tiny_llm_dir, monkeypatch):
    """The chat command with a tiny model and features made up per slide (no encoder runs)."""
    import chatexaonepath.chat.provenance as provenance
    import chatexaonepath.chat.session as session_module
    from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
    from chatexaonepath.vision_tower.extraction import ExtractConfig

    config = ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm_dir), num_visual_tokens=2,
                                  aggregator={"in_dim": 16, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0},
                                  projector={"num_heads": 4}, prompt_style="llama2")
    torch.manual_seed(0)
    model = ChatEXAONEPathForCausalLM.build(config, dtype="fp32")
    monkeypatch.setattr(session_module, "load_chat_model", lambda checkpoint, llm: model)
    monkeypatch.setattr(provenance, "serving_extractor",
                        lambda *a, **k: (SimpleNamespace(config=ExtractConfig(encoder="fake")), None))
    loads = []

    def load_slide(self, opened, mpp=None, progress=None, *, add=False):
        rng = np.random.default_rng(len(loads))
        coords = np.stack(np.meshgrid(np.arange(8) * 256, np.arange(8) * 256), -1).reshape(-1, 2)
        features = SlideFeatures(torch.from_numpy(rng.normal(size=(64, 16)).astype(np.float32)),
                                 torch.from_numpy(coords), {"patch_size_level0": 256, "level0_width": 2048,
                                                            "level0_height": 2048})
        loads.append((opened.path.name, add))
        return self.use_features(features, opened.path, add=add)

    monkeypatch.setattr(session_module.ChatSession, "load_slide", load_slide)
    return loads


def run_chat(*args):
    from chatexaonepath.cli import app

    return CliRunner().invoke(app, ["chat", *map(str, args)])


def test_several_slides_are_one_case_and_a_region_names_its_slide(fake_chat, slides):
    result = run_chat(slides["tumor"], slides["stroma"], slides["normal_20x"], "--question", "Which slide?",
                      "--max-new-tokens", "2", "--region", "2:0,0,1024,2048")
    assert result.exit_code == 0, result.output
    assert fake_chat == [("tumor.tiff", False), ("stroma.tiff", True), ("normal_20x.tiff", True)]
    assert "Slide 2 stroma.tiff: 64 patches" in result.output
    assert "about region 0,0,1024,2048 (32 patches) of slide 2" in result.output and "#1 slide 2 (" in result.output
    whole = run_chat(slides["tumor"], slides["stroma"], "--question", "Which slide?", "--max-new-tokens", "2")
    assert whole.exit_code == 0, whole.output
    assert "about the whole case (2 slides)" in whole.output


def test_one_slide_keeps_the_single_slide_form(fake_chat, slides):
    result = run_chat(slides["tumor"], "--question", "What is it?", "--max-new-tokens", "2",
                      "--region", "0,0,1024,2048")
    assert result.exit_code == 0, result.output
    assert "tumor.tiff: 64 patches" in result.output and "Slide 1" not in result.output
    assert "about region 0,0,1024,2048 (32 patches);" in result.output and "slide 1 (" not in result.output


def test_a_region_naming_no_slide_of_the_case_fails_before_the_model_loads(fake_chat, slides):
    result = run_chat(slides["tumor"], slides["stroma"], "--question", "Hi?", "--region", "3:0,0,10,10")
    assert isinstance(result.exception, ChatEXAONEPathError) and "from 1 to 2" in str(result.exception)
    assert fake_chat == []
    nine = run_chat(*[slides["tumor"]] * 9, "--question", "Hi?")
    assert isinstance(nine.exception, ChatEXAONEPathError) and "at most 8 slides" in str(nine.exception)
