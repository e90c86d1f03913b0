import numpy as np
import pytest

from chatexaonepath.errors import NoTissueError
from chatexaonepath.vision_tower.patching import patch_grid, read_patch
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.vision_tower.tissue import segment_tissue


def test_40x_slide_reads_512_at_level0_and_resizes_to_256(slides):
    with open_slide(slides["tumor"]) as slide:
        tissue = segment_tissue(slide)
        grid = patch_grid(slide, tissue, patch_size=256, mpp=0.5)
        assert grid.patch_size_level0 == 512 and grid.read_level == 0 and grid.read_size == 512
        assert len(grid) > 0
        patch = read_patch(slide, grid, *grid.coords[0])
    assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8


def test_20x_slide_reads_256_directly(slides):
    with open_slide(slides["normal_20x"]) as slide:
        grid = patch_grid(slide, segment_tissue(slide), patch_size=256, mpp=0.5)
    assert grid.patch_size_level0 == 256 and grid.read_size == 256


def test_coords_are_on_the_grid_inside_the_slide_and_in_tissue(slides):
    with open_slide(slides["tumor"]) as slide:
        tissue = segment_tissue(slide)
        grid = patch_grid(slide, tissue, min_tissue=0.5)
        assert grid.coords.dtype == np.int64 and grid.coords.shape[1] == 2
        assert (grid.coords % grid.patch_size_level0 == 0).all()
        assert (grid.coords >= 0).all() and (grid.coords + grid.patch_size_level0 <= 2048).all()
        assert (grid.tissue_fraction >= 0.5).all()
        centres = (grid.coords + grid.patch_size_level0 // 2) / tissue.downsample
        assert tissue.mask[centres[:, 1].astype(int), centres[:, 0].astype(int)].mean() > 0.9
        # patches are tissue-coloured, not glass
        patch = read_patch(slide, grid, *grid.coords[len(grid) // 2])
    assert patch.mean() < 225


def test_stricter_min_tissue_keeps_fewer_patches(slides):
    with open_slide(slides["tumor"]) as slide:
        tissue = segment_tissue(slide)
        loose = patch_grid(slide, tissue, min_tissue=0.05)
        strict = patch_grid(slide, tissue, min_tissue=0.95)
    assert len(strict) < len(loose)
    assert set(map(tuple, strict.coords)) <= set(map(tuple, loose.coords))


def test_patch_larger_than_slide_is_an_error(slides):
    with open_slide(slides["tumor"]) as slide:
        tissue = segment_tissue(slide)
        with pytest.raises(NoTissueError, match="smaller than one patch"):
            patch_grid(slide, tissue, patch_size=2048, mpp=0.5)
