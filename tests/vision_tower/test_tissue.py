import numpy as np
import pytest

from chatexaonepath.errors import NoTissueError
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.synthetic.slides import render_synthetic_image
from chatexaonepath.vision_tower.tissue import TissueConfig, draw_tissue_outline, segment_tissue


def test_finds_the_tissue_of_a_synthetic_slide(slides):
    with open_slide(slides["tumor"]) as slide:
        tissue = segment_tissue(slide)
    assert tissue.contours, "expected at least one tissue region"
    # the generator covers ~55% of the slide with tissue
    assert 0.4 < tissue.tissue_fraction < 0.7
    # glass margin: the corners are background
    assert not tissue.mask[0, 0] and not tissue.mask[-1, -1]
    assert tissue.mask[tissue.mask.shape[0] // 2, tissue.mask.shape[1] // 2]
    for contour in tissue.contours:  # level-0 coordinates
        assert contour.min() >= 0 and contour.max() <= 2048


def test_mask_agrees_with_the_rendered_tissue():
    from chatexaonepath.synthetic.slides import write_pyramidal_tiff
    import tempfile, pathlib

    image = render_synthetic_image("stroma", (2048, 2048), mpp=0.25, seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_pyramidal_tiff(pathlib.Path(tmp) / "s.tiff", image, 0.25)
        with open_slide(path) as slide:
            tissue = segment_tissue(slide)
    glass = (np.abs(image.astype(int) - [242, 240, 244]).sum(-1) < 25)
    small = glass[16::32, 16::32]  # sample at the mask's 32× resolution
    agreement = (tissue.mask == ~small).mean()
    assert agreement > 0.9


def test_segmentation_is_deterministic(slides):
    with open_slide(slides["stroma"]) as slide:
        first, second = segment_tissue(slide), segment_tissue(slide)
    np.testing.assert_array_equal(first.mask, second.mask)
    assert first.threshold == second.threshold


def test_blank_slide_raises_no_tissue(slides):
    with open_slide(slides["blank"]) as slide:
        with pytest.raises(NoTissueError, match="No tissue found"):
            segment_tissue(slide)


def test_min_tissue_area_removes_small_specks(slides):
    with open_slide(slides["tumor"]) as slide:
        with pytest.raises(NoTissueError):
            segment_tissue(slide, TissueConfig(min_tissue_mm2=1000.0))


def test_outline_is_drawn_on_a_copy(slides):
    with open_slide(slides["tumor"]) as slide:
        tissue = segment_tissue(slide)
    outlined = draw_tissue_outline(tissue.thumbnail, tissue, tissue.downsample)
    assert outlined.shape == tissue.thumbnail.shape
    assert (outlined != tissue.thumbnail).any()
    assert not np.shares_memory(outlined, tissue.thumbnail)
