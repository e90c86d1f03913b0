"""The DCT decoder: raw JPEG tiles decoded at a reduced scale agree with OpenSlide's full decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatexaonepath.errors import ChatEXAONEPathError, SlideError
from chatexaonepath.vision_tower.batch import extract_slides
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.vision_tower.features import read_attrs, settings_match, write_features
from chatexaonepath.vision_tower.jpeg_tiles import JpegTilePatchReader, choose_decoder, tiled_jpeg_level
from chatexaonepath.vision_tower.patching import patch_grid, read_patch
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.synthetic.slides import make_synthetic_slide
from chatexaonepath.vision_tower.tissue import segment_tissue


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """40× slides in both layouts, a real-world 0.2525 µm/px scan, and a pyramid without coarse levels."""
    root = tmp_path_factory.mktemp("scans")
    return {
        "aperio": make_synthetic_slide(root / "aperio.svs", "tumor", (2048, 2048), mpp=0.25, seed=21, aperio=True),
        "generic": make_synthetic_slide(root / "generic.tiff", "stroma", (2048, 2048), mpp=0.25, seed=22),
        "aperio_0.2525": make_synthetic_slide(root / "odd.svs", "lymphoid", (2048, 2048), mpp=0.2525, seed=23,
                                              aperio=True),
        "flat": make_synthetic_slide(root / "flat.tiff", "normal", (2048, 2048), mpp=0.25, seed=24, downsample=1000),
        "20x": make_synthetic_slide(root / "20x.svs", "tumor", (1024, 1024), mpp=0.5, seed=25, aperio=True),
    }


def both_decoders(path, target_mpp=0.5):
    """(OpenSlide patches, DCT patches, the DCT reader) for every patch of the slide's grid."""
    with open_slide(path) as slide:
        grid = patch_grid(slide, segment_tissue(slide), 256, target_mpp, 0.25)
        reader = JpegTilePatchReader(slide, grid)
        reference = np.stack([read_patch(slide, grid, x, y) for x, y in grid.coords])
        decoded = np.stack([reader.read_patch(x, y) for x, y in grid.coords])
    return reference, decoded, reader


@pytest.mark.parametrize("name, target_mpp, scale", [("aperio", 0.5, 2), ("generic", 0.5, 2), ("aperio_0.2525", 0.5, 2),
                                                     ("flat", 1.0, 4), ("generic", 0.8, 2)])
def test_dct_patches_match_openslide_within_3_levels(scans, name, target_mpp, scale):
    reference, decoded, reader = both_decoders(scans[name], target_mpp)
    assert reader.scale == scale and decoded.shape == reference.shape
    per_patch = np.abs(reference.astype(np.int16) - decoded.astype(np.int16)).mean(axis=(1, 2, 3))
    assert per_patch.max() <= 3.0, per_patch.max()


def test_aperio_tiles_are_rgb_jpeg_without_markers(scans):
    """Aperio streams carry no colour marker: decoded as YCbCr they would be green-shifted nonsense."""
    with open_slide(scans["aperio"]) as slide, open_slide(scans["generic"]) as generic:
        assert slide.vendor == "aperio" and generic.vendor == "generic-tiff"
        aperio_level, generic_level = tiled_jpeg_level(slide, 0), tiled_jpeg_level(generic, 0)
    assert aperio_level.tables and aperio_level.rgb_components
    assert not generic_level.rgb_components  # tifffile writes YCbCr, and says so
    reference, decoded, _ = both_decoders(scans["aperio"])
    channel_means = decoded.reshape(-1, 3).mean(axis=0) - reference.reshape(-1, 3).mean(axis=0)
    assert np.abs(channel_means).max() < 1.0


def test_features_agree_with_the_real_preprocessing(scans):
    """Cosine ≥ 0.995 between features of DCT and OpenSlide patches, through ViT-B/16's own preprocessing."""
    from chatexaonepath.vision_tower.encoder import build_encoder

    encoder = build_encoder("random-vit-b16", seed=0)
    for name in ("aperio", "generic"):
        reference, decoded, _ = both_decoders(scans[name])
        pick = np.linspace(0, len(reference) - 1, 4).astype(int)
        with torch.inference_mode():
            a = encoder.model(encoder.preprocess(torch.from_numpy(reference[pick])))
            b = encoder.model(encoder.preprocess(torch.from_numpy(decoded[pick])))
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
        assert cosine.min() >= 0.995, (name, cosine)


def test_auto_takes_dct_only_where_it_applies(scans, slides):
    with open_slide(scans["aperio"]) as slide:
        assert choose_decoder(slide, 256, 0.5) == "dct"
        assert choose_decoder(slide, 256, 0.5, "openslide") == "openslide"
        assert choose_decoder(slide, 256, 1.0) == "openslide"  # level 1 is already 1 µm/px: nothing to shrink
        assert choose_decoder(slide, 256, 1.0, "dct") == "dct"  # forced: tile path at full scale
        with pytest.raises(ChatEXAONEPathError, match="--decoder"):
            choose_decoder(slide, 256, 0.5, "turbo")
    with open_slide(scans["20x"]) as slide:
        assert choose_decoder(slide, 256, 0.5) == "openslide"  # a 20× scan read at 1:1
    with open_slide(slides["png"], mpp=0.25) as slide:
        assert choose_decoder(slide, 256, 0.5) == "openslide"
        with pytest.raises(SlideError, match="--decoder auto or openslide"):
            choose_decoder(slide, 256, 0.5, "dct")


def _zeroed_header(tile: bytes) -> bytes:
    return b"\x00" * 32 + tile[32:]


def _huge_frame(tile: bytes) -> bytes:
    """The frame header claims 60000² px: a decompression bomb inside a 256² tile."""
    start = tile.index(b"\xff\xc0") + 5
    return tile[:start] + (60000).to_bytes(2, "big") * 2 + tile[start + 4 :]


@pytest.mark.parametrize("damage", [_zeroed_header, _huge_frame])
def test_a_corrupt_or_crafted_tile_is_a_slide_error(scans, tmp_path, damage):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(scans["aperio"].read_bytes())
    with open_slide(broken) as slide:
        grid = patch_grid(slide, segment_tissue(slide), 256, 0.5, 0.25)
        layout = tiled_jpeg_level(slide, 0)
        x, y = grid.coords[0]
        index = (y // layout.tile_height) * layout.tiles_across + x // layout.tile_width
        offset, count = int(layout.offsets[index]), int(layout.bytecounts[index])
        with open(broken, "r+b") as f:
            f.seek(offset)
            tile = f.read(count)
            f.seek(offset)
            f.write(damage(tile))
        with pytest.raises(SlideError, match="JPEG tile"):
            JpegTilePatchReader(slide, grid).read_patch(x, y)


def test_decoder_is_recorded_and_is_a_setting(scans, tmp_path, tiny_encoder):
    def run(decoder):
        config = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, decoder=decoder)
        return extract_slides([scans["aperio"]], tmp_path, config, extractor=FeatureExtractor(config, tiny_encoder))

    assert run("auto").count("extracted") == 1 and read_attrs(tmp_path / "aperio.h5")["decoder"] == "dct"
    assert run("dct").count("skipped") == 1  # auto chose dct: same setting
    assert run("openslide").count("extracted") == 1 and read_attrs(tmp_path / "aperio.h5")["decoder"] == "openslide"
    with pytest.raises(ChatEXAONEPathError, match="--decoder"):
        ExtractConfig(decoder="fast")


def test_files_from_before_the_decoder_attr_count_as_openslide(tmp_path):
    path = write_features(tmp_path / "old.h5", np.zeros((2, 4), np.float32), np.zeros((2, 2), np.int64),
                          {"encoder": "a"})
    assert settings_match(path, {"encoder": "a", "decoder": "openslide"})
    assert not settings_match(path, {"encoder": "a", "decoder": "dct"})
