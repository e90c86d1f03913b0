import pytest

from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor


@pytest.fixture
def extractor(tiny_encoder):
    """A FeatureExtractor on the tiny ViT, in-process loading, small batches."""
    return FeatureExtractor(ExtractConfig(encoder=tiny_encoder.name, batch_size=4, num_workers=0), tiny_encoder)
