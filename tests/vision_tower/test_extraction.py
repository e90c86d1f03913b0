import json

import numpy as np
import pytest
import torch

from chatexaonepath.vision_tower.batch import extract_slides
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.vision_tower.features import read_features
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.vision_tower.tissue import segment_tissue

CONTRACT_ATTRS = {"patch_size", "patch_size_level0", "target_mpp", "level0_mpp", "level0_width", "level0_height",
                  "encoder", "encoder_weights_sha256", "stain_norm", "slide_fingerprint", "version", "precision",
                  "decoder"}




def test_extraction_roundtrip_matches_the_contract(slides, tmp_path, extractor):
    summary = extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    assert summary.count("extracted") == 1 and not summary.failed
    bag = read_features(tmp_path / "tumor.h5")
    assert bag.features.shape[1] == 64 and bag.coords.shape == (len(bag), 2)
    assert CONTRACT_ATTRS <= set(bag.attrs)
    assert bag.attrs["patch_size"] == 256 and bag.attrs["patch_size_level0"] == 512
    assert bag.attrs["level0_mpp"] == pytest.approx(0.25) and bag.attrs["level0_width"] == 2048
    with open_slide(slides["tumor"]) as slide:
        tissue = segment_tissue(slide)
    step = round(512 / tissue.downsample)  # patch footprint in mask pixels
    for x, y in (bag.coords.numpy() / tissue.downsample).round().astype(int):
        assert tissue.mask[y : y + step, x : x + step].mean() >= 0.25  # every patch is in tissue
    assert (tmp_path / "thumbnails" / "tumor.png").stat().st_size > 0
    saved = json.loads((tmp_path / "extract_config.json").read_text())
    assert saved["resolved"]["precision"] == bag.attrs["precision"]


def test_features_equal_direct_encoding(slides, tmp_path, extractor):
    """The pipeline's features are the encoder applied to the patches it says it read."""
    import torch

    from chatexaonepath.vision_tower.extraction import patch_reader

    extract_slides([slides["stroma"]], tmp_path, extractor.config, extractor=extractor)
    bag = read_features(tmp_path / "stroma.h5")
    with open_slide(slides["stroma"]) as slide:
        _, grid = extractor.prepare(slide)
        reader = patch_reader(slide, grid, bag.attrs["decoder"])
        patches = torch.from_numpy(np.stack([reader.read_patch(x, y) for x, y in bag.coords[:3].tolist()]))
    direct = extractor.encode(patches)
    np.testing.assert_allclose(bag.features[:3].float().numpy(), direct.numpy(), atol=2e-2, rtol=2e-2)


def test_worker_processes_give_the_same_features(slides, tmp_path, tiny_encoder):
    config = ExtractConfig(encoder=tiny_encoder.name, batch_size=3, num_workers=2)
    extract_slides([slides["tumor"]], tmp_path / "w", config, extractor=FeatureExtractor(config, tiny_encoder))
    config0 = ExtractConfig(encoder=tiny_encoder.name, batch_size=5, num_workers=0)
    extract_slides([slides["tumor"]], tmp_path / "s", config0, extractor=FeatureExtractor(config0, tiny_encoder))
    a, b = read_features(tmp_path / "w" / "tumor.h5"), read_features(tmp_path / "s" / "tumor.h5")
    assert a.attrs["decoder"] == b.attrs["decoder"] == "dct"  # the tile reader pickles into the workers
    assert a.coords.tolist() == b.coords.tolist()
    np.testing.assert_allclose(a.features.float().numpy(), b.features.float().numpy(), atol=1e-2)


def test_mpp_override_extracts_a_slide_without_metadata(slides, tmp_path, tiny_encoder):
    config = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, mpp=0.25)
    summary = extract_slides([slides["no_mpp"]], tmp_path, config, extractor=FeatureExtractor(config, tiny_encoder))
    assert summary.count("extracted") == 1
    assert read_features(tmp_path / "no_mpp.h5").attrs["mpp_source"] == "override"


def test_macenko_changes_features_and_precision_is_recorded(slides, tmp_path, tiny_encoder):
    outputs = {}
    for stain in ("none", "macenko"):
        config = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, stain_norm=stain, precision="fp32")
        extract_slides([slides["tumor"]], tmp_path / stain, config, extractor=FeatureExtractor(config, tiny_encoder))
        outputs[stain] = read_features(tmp_path / stain / "tumor.h5")
    attrs = outputs["macenko"].attrs
    assert attrs["stain_norm"] == "macenko" and attrs["precision"] == "fp32"
    assert not np.allclose(outputs["none"].features.float().numpy(), outputs["macenko"].features.float().numpy(), atol=1e-2)


def test_bad_settings_are_one_sentence_errors():
    from chatexaonepath.errors import ChatEXAONEPathError

    for bad in [dict(min_tissue=25), dict(patch_size=8), dict(target_mpp=0), dict(num_workers=-1), dict(mpp=300.0),
                dict(stain_norm="reinhard"), dict(precision="int4"), dict(batch_size=0)]:
        with pytest.raises(ChatEXAONEPathError):
            ExtractConfig(encoder="random-vit-b16", **bad)
    with pytest.raises(ChatEXAONEPathError, match="not a device"):
        FeatureExtractor(ExtractConfig(encoder="random-vit-b16", device="foo"))


def test_with_a_checkpoint_batches_are_encoded_in_slices_that_call_it(slides, tiny_encoder, monkeypatch):
    """A load that can be cancelled encodes in slices of about CHECKPOINT_SECONDS, each one after a checkpoint,
    with the same features as whole batches."""
    from chatexaonepath.vision_tower import extraction
    from chatexaonepath.vision_tower.slide import open_slide

    extractor = FeatureExtractor(ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=8), tiny_encoder)
    with open_slide(slides["tumor"]) as slide:
        _, grid = extractor.prepare(slide)
        whole = torch.cat([f for _, f in extractor.iter_features(slide, grid)])
        monkeypatch.setattr(extraction, "CHECKPOINT_SECONDS", 1e-9)  # every slice a single patch
        calls = []
        slide.checkpoint = lambda: calls.append(1)
        sliced = torch.cat([f for _, f in extractor.iter_features(slide, grid)])
    assert len(calls) == 1 + (len(grid) - 8) and sliced.shape == whole.shape  # one whole slice, then one each
    torch.testing.assert_close(sliced, whole, atol=1e-4, rtol=1e-4)
