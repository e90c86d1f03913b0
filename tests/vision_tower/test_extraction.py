import json
import os

import numpy as np
import pytest

from chatexaonepath.errors import SlideError
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor, SlideLock, extract_slides
from chatexaonepath.vision_tower.features import read_features
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.vision_tower.tissue import segment_tissue

CONTRACT_ATTRS = {"patch_size", "patch_size_level0", "target_mpp", "level0_mpp", "level0_width", "level0_height",
                  "encoder", "encoder_weights_sha256", "stain_norm", "slide_fingerprint", "version", "precision"}


@pytest.fixture
def extractor(tiny_encoder):
    return FeatureExtractor(ExtractConfig(encoder=tiny_encoder.name, batch_size=4, num_workers=0), tiny_encoder)


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

    from chatexaonepath.vision_tower.patching import read_patch

    extract_slides([slides["stroma"]], tmp_path, extractor.config, extractor=extractor)
    bag = read_features(tmp_path / "stroma.h5")
    with open_slide(slides["stroma"]) as slide:
        _, grid = extractor.prepare(slide)
        patches = torch.from_numpy(np.stack([read_patch(slide, grid, x, y) for x, y in bag.coords[:3].tolist()]))
    direct = extractor.encode(patches)
    np.testing.assert_allclose(bag.features[:3].float().numpy(), direct.numpy(), atol=2e-2, rtol=2e-2)


def test_worker_processes_give_the_same_features(slides, tmp_path, tiny_encoder):
    config = ExtractConfig(encoder=tiny_encoder.name, batch_size=3, num_workers=2)
    extract_slides([slides["tumor"]], tmp_path / "w", config, extractor=FeatureExtractor(config, tiny_encoder))
    config0 = ExtractConfig(encoder=tiny_encoder.name, batch_size=5, num_workers=0)
    extract_slides([slides["tumor"]], tmp_path / "s", config0, extractor=FeatureExtractor(config0, tiny_encoder))
    a, b = read_features(tmp_path / "w" / "tumor.h5"), read_features(tmp_path / "s" / "tumor.h5")
    assert a.coords.tolist() == b.coords.tolist()
    np.testing.assert_allclose(a.features.float().numpy(), b.features.float().numpy(), atol=1e-2)


def test_rerun_skips_done_slides_and_redoes_changed_settings(slides, tmp_path, extractor, tiny_encoder):
    extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    before = (tmp_path / "tumor.h5").stat().st_mtime_ns
    again = extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    assert again.count("skipped") == 1 and (tmp_path / "tumor.h5").stat().st_mtime_ns == before
    changed = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, min_tissue=0.9)
    redo = extract_slides([slides["tumor"]], tmp_path, changed, extractor=FeatureExtractor(changed, tiny_encoder))
    assert redo.count("extracted") == 1
    assert read_features(tmp_path / "tumor.h5").attrs["min_tissue"] == 0.9


def test_interrupted_batch_resumes(slides, tmp_path, extractor):
    inputs = [slides["tumor"], slides["stroma"], slides["normal_20x"]]
    calls = []

    def kill_during_second(slide, total):
        calls.append(slide.slide_id)
        if len(calls) == 2:
            def die(done, _total):
                raise KeyboardInterrupt  # what Ctrl-C or a kill does mid-slide
            return die
        return None

    with pytest.raises(KeyboardInterrupt):
        extract_slides(inputs, tmp_path, extractor.config, extractor=extractor, on_slide_start=kill_during_second)
    assert (tmp_path / "tumor.h5").exists() and not (tmp_path / "stroma.h5").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.lock"))
    resumed = extract_slides(inputs, tmp_path, extractor.config, extractor=extractor)
    assert [r.status for r in resumed.results] == ["skipped", "extracted", "extracted"]


def test_bad_slides_are_recorded_and_the_batch_goes_on(slides, tmp_path, extractor):
    inputs = [slides["text_as_svs"], slides["tumor"], slides["no_mpp"], slides["blank"]]
    summary = extract_slides(inputs, tmp_path, extractor.config, extractor=extractor)
    assert [r.status for r in summary.results] == ["failed", "extracted", "failed", "failed"]
    errors = [json.loads(line) for line in summary.errors_file.read_text().splitlines()]
    assert len(errors) == 3
    assert "--mpp" in errors[1]["error"] and "No tissue" in errors[2]["error"]
    with pytest.raises(SlideError):
        extract_slides(inputs, tmp_path / "ff", extractor.config, extractor=extractor, skip_errors=False)


def test_mpp_override_extracts_a_slide_without_metadata(slides, tmp_path, tiny_encoder):
    config = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, mpp=0.25)
    summary = extract_slides([slides["no_mpp"]], tmp_path, config, extractor=FeatureExtractor(config, tiny_encoder))
    assert summary.count("extracted") == 1
    assert read_features(tmp_path / "no_mpp.h5").attrs["mpp_source"] == "override"


def test_macenko_and_precision_are_recorded(slides, tmp_path, tiny_encoder):
    config = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, stain_norm="macenko", precision="fp32")
    extract_slides([slides["tumor"]], tmp_path, config, extractor=FeatureExtractor(config, tiny_encoder))
    attrs = read_features(tmp_path / "tumor.h5").attrs
    assert attrs["stain_norm"] == "macenko" and attrs["precision"] == "fp32"


def test_live_locks_are_respected_and_stale_ones_taken_over(slides, tmp_path, extractor):
    import socket

    lock = tmp_path / "tumor.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    summary = extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    assert summary.results[0].status == "locked" and lock.exists()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345}))  # no such process
    summary = extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    assert summary.results[0].status == "extracted" and not lock.exists()
    assert SlideLock(lock).acquire()


def test_duplicate_slide_ids_are_rejected(slides, tmp_path, extractor):
    from chatexaonepath.errors import ChatEXAONEPathError

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "tumor.tiff").write_bytes(slides["tumor"].read_bytes())
    with pytest.raises(ChatEXAONEPathError, match="share the id"):
        extract_slides([slides["tumor"], other / "tumor.tiff"], tmp_path / "o", extractor.config, extractor=extractor)
