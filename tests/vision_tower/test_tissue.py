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


# -- real H&E at a slide's edge (tests/vision_tower/realistic_he.py paints it; a JPEG like a scanner's) ------------
def _segmented_edge(tmp_path, seed: int = 0, config: TissueConfig | None = None, **paint):
    from tests.vision_tower.realistic_he import edge_of_a_real_slide, save_jpeg

    edge = edge_of_a_real_slide(seed=seed, **paint)
    path = save_jpeg(edge.image, tmp_path / f"edge-{seed}.jpg")
    with open_slide(path, 0.5) as slide:
        tissue = segment_tissue(slide, config)
    height, width = edge.image.shape[:2]
    import cv2

    mask = cv2.resize(tissue.mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return edge, tissue, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_pale_stroma_and_fat_at_the_edge_of_real_he_are_tissue(tmp_path, seed):
    """Otsu alone split pale from dense tissue (pale stroma: 0 % found) and the median blur erased fat's
    membranes (6 % found); glass and dust stay out."""
    edge, tissue, mask = _segmented_edge(tmp_path, seed)
    assert mask[edge.dense].mean() > 0.95
    assert mask[edge.pale].mean() > 0.9, mask[edge.pale].mean()
    assert mask[edge.fat].mean() > 0.9, mask[edge.fat].mean()
    assert mask[~edge.tissue].mean() < 0.03  # the outline's own width at 8 µm per mask pixel
    assert len(tissue.contours) == 1  # one fragment: no dust speck became tissue


def test_tissue_near_the_slides_edge_is_not_glued_to_it(tmp_path):
    """Closing fat's cells must not join tissue to the image's border (OpenCV erodes as if the outside were tissue)."""
    from tests.vision_tower.realistic_he import edge_of_a_real_slide, save_jpeg

    edge = edge_of_a_real_slide(seed=0)
    right = int(np.nonzero(edge.tissue.any(axis=0))[0].max())
    cut = right + 64  # 32 µm of glass beyond the tissue: less than half an adipocyte-sized closing
    path = save_jpeg(np.ascontiguousarray(edge.image[:, :cut]), tmp_path / "near-edge.jpg")
    with open_slide(path, 0.5) as slide:
        tissue = segment_tissue(slide)
    assert not tissue.mask[:, -2:].any()
    assert tissue.mask[:, -12:-8].any()  # the tissue itself reaches that far


def test_a_tinted_glass_is_still_glass(tmp_path):
    """A scanner whose background has a blue cast (saturation ~19, as much as the palest stroma): the cap
    follows the glass, so the glass is not tissue (pale stroma and fat may then be lost, as with Otsu alone)."""
    edge, _, mask = _segmented_edge(tmp_path, 3, glass=(226, 232, 244))
    assert mask[~edge.tissue].mean() < 0.03
    assert mask[edge.dense].mean() > 0.95


def test_clams_recipe_alone_is_still_available(tmp_path):
    """`glass_margin=None, fat_cell_um=0` is CLAM's saturation → median → Otsu → closing, as before."""
    edge, tissue, mask = _segmented_edge(tmp_path, 0, TissueConfig(glass_margin=None, fat_cell_um=0))
    assert tissue.threshold > 30 and mask[edge.pale].mean() < 0.1 and mask[edge.fat].mean() < 0.2
