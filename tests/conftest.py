"""Shared fixtures: small synthetic slides and a tiny ViT encoder, all built in temp dirs (offline)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Converted models live in the user cache; a test session without one gets its own, reused across runs.
os.environ.setdefault("CHATEXAONEPATH_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "test"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Synthetic slides and broken files, made once per test session."""
    from PIL import Image

    from chatexaonepath.synthetic.slides import make_synthetic_slide, render_synthetic_image

    root = tmp_path_factory.mktemp("slides")
    paths = {
        "tumor": make_synthetic_slide(root / "tumor.tiff", "tumor", (2048, 2048), mpp=0.25, seed=1),
        "stroma": make_synthetic_slide(root / "stroma.tiff", "stroma", (2048, 2048), mpp=0.25, seed=2),
        "normal_20x": make_synthetic_slide(root / "normal_20x.tiff", "normal", (1536, 1536), mpp=0.5, seed=3),
        "no_mpp": make_synthetic_slide(root / "no_mpp.tiff", "tumor", (2048, 2048), mpp=0.25, seed=4, write_mpp=False),
        "blank": make_synthetic_slide(root / "blank.tiff", "tumor", (1024, 1024), mpp=0.25, seed=5, blank=True),
    }
    png = root / "plain.png"
    Image.fromarray(render_synthetic_image("stroma", (1024, 1024), mpp=0.5, seed=6)).save(png)
    paths["png"] = png
    data = paths["tumor"].read_bytes()
    truncated = root / "truncated.svs"
    truncated.write_bytes(data[: len(data) // 3])
    paths["truncated"] = truncated
    fake = root / "notes.svs"
    fake.write_text("Patient: anonymous\nDiagnosis: this is a text file renamed to .svs\n" * 50)
    paths["text_as_svs"] = fake
    return paths


@pytest.fixture(scope="session")
def tiny_vit_config():
    """A 2-layer, 64-wide ViT/16: the same code path as ViT-B/16, fast on a CPU."""
    from chatexaonepath.vision_tower.encoder import vit_b16_config

    return vit_b16_config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_vit_config):
    """A seeded tiny PatchEncoder for extraction tests."""
    import torch

    from chatexaonepath.vision_tower.encoder import PatchEncoder, ViTClassTokenEncoder, _state_sha256

    torch.manual_seed(0)
    model = ViTClassTokenEncoder(tiny_vit_config).eval().requires_grad_(False)
    return PatchEncoder("tiny-vit-test", model, 64, _state_sha256(model), "random(seed=0)")


@pytest.fixture
def he_like_image():
    """An H&E-like RGB uint8 image for quick checks."""
    from chatexaonepath.synthetic.slides import render_synthetic_image

    def make(seed: int = 0, tissue: str = "tumor", size: int = 256) -> np.ndarray:
        return render_synthetic_image(tissue, (size, size), mpp=0.5, seed=seed, coverage=0.9)

    return make
