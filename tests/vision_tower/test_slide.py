import pickle

import numpy as np
import pytest

from chatexaonepath.errors import MissingMppError, SlideError
from chatexaonepath.vision_tower.slide import find_slides, open_slide, slide_fingerprint


def test_opens_pyramidal_tiff_with_mpp_from_metadata(slides):
    with open_slide(slides["tumor"]) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.mpp_source == "metadata"
        assert slide.dimensions == (2048, 2048)
        assert slide.level_count >= 2
        assert slide.level_downsamples[1] == pytest.approx(4.0)
        region = slide.read_region((100, 200), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_missing_mpp_names_the_flag(slides):
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(slides["no_mpp"])


def test_mpp_override_is_used_and_recorded(slides):
    with open_slide(slides["no_mpp"], mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "override"
    with open_slide(slides["tumor"], mpp=0.26) as slide:
        assert slide.mpp == 0.26


def test_implausible_mpp_override_is_rejected(slides):
    with pytest.raises(SlideError, match="plausible"):
        open_slide(slides["tumor"], mpp=254.0)


def test_png_needs_mpp_and_then_reads(slides):
    with pytest.raises(MissingMppError):
        open_slide(slides["png"])
    with open_slide(slides["png"], mpp=0.5) as slide:
        assert slide.dimensions == (1024, 1024)
        assert slide.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


@pytest.mark.parametrize("name", ["truncated", "text_as_svs"])
def test_broken_files_raise_one_sentence_slide_error(slides, name):
    with pytest.raises(SlideError) as info:
        with open_slide(slides[name]) as slide:  # a truncation past the header fails on read
            for y in range(0, slide.dimensions[1], 512):
                slide.read_region((0, y), 0, (slide.dimensions[0], 512))
    message = str(info.value)
    assert str(slides[name]) in message and "\n" not in message


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.svs")
    empty = tmp_path / "empty.ndpi"
    empty.touch()
    with pytest.raises(SlideError, match="empty"):
        open_slide(empty)


def test_slide_pickles_by_path_and_reopens(slides):
    with open_slide(slides["tumor"]) as slide:
        expected = slide.read_region((512, 512), 0, (32, 32))
        clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(clone.read_region((512, 512), 0, (32, 32)), expected)
    clone.close()


def test_best_level_never_upsamples(slides):
    with open_slide(slides["tumor"]) as slide:  # levels at 1× and 4×
        assert slide.best_level_for_downsample(2.0) == 0
        assert slide.best_level_for_downsample(4.0) == 1
        assert slide.best_level_for_downsample(100.0) == slide.level_count - 1


def test_read_at_downsample_gives_requested_scale(slides):
    with open_slide(slides["tumor"]) as slide:
        image, downsample = slide.read_at_downsample(32)
    assert image.shape == (64, 64, 3) and downsample == pytest.approx(32)


def test_fingerprint_changes_with_content(tmp_path, slides):
    copy = tmp_path / "copy.tiff"
    copy.write_bytes(slides["tumor"].read_bytes())
    assert slide_fingerprint(copy) == slide_fingerprint(slides["tumor"])
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert slide_fingerprint(copy) != slide_fingerprint(slides["tumor"])


def test_find_slides_expands_folders_and_rejects_missing(slides, tmp_path):
    found = find_slides([slides["tumor"].parent])
    assert slides["tumor"] in found and slides["png"] in found
    with pytest.raises(SlideError, match="not found"):
        find_slides([tmp_path / "missing"])
    with pytest.raises(SlideError, match="No slides"):
        find_slides([tmp_path])


def test_16_bit_images_are_rejected_not_clipped(tmp_path):
    from PIL import Image

    path = tmp_path / "deep.png"
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(path)
    with pytest.raises(SlideError, match="8-bit RGB"):
        open_slide(path, mpp=0.5)


def test_greyscale_images_are_rejected_with_a_reason(tmp_path):
    from PIL import Image

    path = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(path)
    with pytest.raises(SlideError, match="greyscale"):
        open_slide(path, mpp=0.5)


def test_single_level_slides_are_read_in_strips(tmp_path, monkeypatch):
    """Without a pyramid, a thumbnail is assembled strip by strip and matches the one-piece read."""
    from chatexaonepath.vision_tower import slide as slide_module
    from chatexaonepath.vision_tower.synthetic import make_synthetic_slide

    path = make_synthetic_slide(tmp_path / "flat.tiff", "stroma", (2048, 1536), mpp=0.5, seed=9, downsample=1000)
    with open_slide(path) as slide:
        assert slide.level_count == 1
        whole, ds_whole = slide.read_at_downsample(16)
        monkeypatch.setattr(slide_module, "STRIP_PIXELS", 2048 * 100)  # force ~16 strips
        strips, ds_strips = slide.read_at_downsample(16)
    assert strips.shape == whole.shape == (96, 128, 3) and ds_whole == ds_strips
    assert np.abs(strips.astype(int) - whole.astype(int)).mean() < 2.0
