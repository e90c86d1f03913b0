"""Tiny engines for the app tests: a 2-layer LLaMA, a 2-layer ViT, caches and work folders in tmp."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import pytest
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.webapp.engine import AppConfig, AppEngine
from tests.chat.conftest import make_tiny_llm


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """An untrained ChatEXAONEPath around a tiny random LLaMA (64-d tower input, like the tiny ViT)."""
    llm_dir = make_tiny_llm(tmp_path_factory.mktemp("webapp-llm"))
    config = ChatEXAONEPathConfig(llm_name_or_path=str(llm_dir), num_visual_tokens=2,
                                  aggregator={"in_dim": 64, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0},
                                  projector={"num_heads": 4}, prompt_style="llama2")
    torch.manual_seed(0)
    return ChatEXAONEPathForCausalLM.build(config)


@pytest.fixture
def make_engine(tiny_chat_model, tiny_encoder, tmp_path):
    """Build AppEngines on the tiny models; every engine made is closed after the test."""
    engines = []

    def make(**overrides) -> AppEngine:
        settings = dict(max_new_tokens=12, example_size=2048) | overrides
        extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=4)
        index = len(engines)
        engine = AppEngine(tiny_chat_model, FeatureExtractor(extract, tiny_encoder),
                           AppConfig(features_dir=str(tmp_path / "features"), **settings),
                           example_path=tmp_path / "example.tiff", work_dir=tmp_path / f"work{index}")
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def gradio_upload(root, source, name=None):
    """A copy of `source` where Gradio would leave an upload (the session takes it from there)."""
    folder = root / "gradio" / os.urandom(4).hex()
    folder.mkdir(parents=True)
    return shutil.copy(source, folder / (name or source.name))


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@contextmanager
def served(engine: AppEngine, auth=None):
    """The app for `engine` on 127.0.0.1 at a free port, yielding its URL; closed after, GRADIO_TEMP_DIR restored."""
    from chatexaonepath.webapp.cli import launch_app

    saved_temp = os.environ.get("GRADIO_TEMP_DIR")  # launch_app points it at the engine's work folder
    demo, url = launch_app(engine, host="127.0.0.1", port=None, quiet=True, auth=auth)
    try:
        yield url
    finally:
        demo.close()
        engine.close()
        if saved_temp is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved_temp


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (its own browser download needs the internet)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
