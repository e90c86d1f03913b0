"""Fixtures for the evaluation tests: the criteria, and a tiny checkpoint with features and a test set."""

import json

import numpy as np
import pytest
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.eval.criteria import load_criteria
from chatexaonepath.vision_tower.features import write_features


@pytest.fixture
def criteria():
    """The shipped seven criteria."""
    return load_criteria()


FEATURE_DIM = 32


def make_checkpoint(llm_dir, out):
    """A tiny untrained ChatEXAONEPath checkpoint (random tower around a 2-layer LLaMA)."""
    config = ChatEXAONEPathConfig(llm_name_or_path=str(llm_dir), num_visual_tokens=2, prompt_style="llama2",
                                  aggregator={"in_dim": FEATURE_DIM, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0},
                                  projector={"num_heads": 4})
    torch.manual_seed(0)
    ChatEXAONEPathForCausalLM.build(config, dtype="fp32").save_pretrained(out)
    return out


def make_features(folder, slide_id, patches, seed):
    rng = np.random.default_rng(seed)
    coords = np.stack([np.arange(patches) * 512, np.zeros(patches)], 1)
    return write_features(folder / f"{slide_id}.h5", rng.normal(size=(patches, FEATURE_DIM)).astype(np.float32),
                          coords, {"encoder": "test"})


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A checkpoint, three slides' features (one as a .pt path) and a LLaVA test set with reports."""
    from tests.chat.conftest import make_tiny_llm

    root = tmp_path_factory.mktemp("eval-run")
    make_checkpoint(make_tiny_llm(root / "llm"), root / "ckpt")
    features = root / "features"
    make_features(features, "S1", 12, 1)
    make_features(features, "S2", 7, 2)
    torch.save({"features": torch.randn(5, FEATURE_DIM)}, root / "S3.pt")
    (root / "reports").mkdir()
    (root / "reports" / "S1.txt").write_text("FINAL DIAGNOSIS: Colon, resection: adenocarcinoma, moderately differentiated.")
    data = [
        {"id": "rec1", "image": "S1", "organ": "colon",
         "conversations": [{"from": "human", "value": "<image>\nWhat is the diagnosis?", "category": "diagnosis"},
                           {"from": "gpt", "value": "Adenocarcinoma."},
                           {"from": "human", "value": "What is the grade?", "category": "grade"},
                           {"from": "gpt", "value": "Moderately differentiated."}]},
        {"id": "rec2", "image": "S2.svs", "category": "organ", "report": "Liver, biopsy: hepatocellular carcinoma.",
         "conversations": [{"from": "human", "value": "Which organ is this?"}, {"from": "gpt", "value": "Liver."}]},
        {"id": "rec3", "image": str(root / "S3.pt"),
         "conversations": [{"from": "human", "value": "<image>\nIs there carcinoma?"},
                           {"from": "gpt", "value": "Yes, squamous cell carcinoma."}]},
    ]
    (root / "test.json").write_text(json.dumps(data))
    return root
