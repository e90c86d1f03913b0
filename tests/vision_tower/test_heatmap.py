import numpy as np
import pytest
import torch

from chatexaonepath.vision_tower.heatmap import attention_to_unit, render_heatmap, top_attended_patches
from chatexaonepath.vision_tower.patching import patch_grid
from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.vision_tower.tissue import segment_tissue


@pytest.fixture
def slide_and_grid(slides):
    slide = open_slide(slides["tumor"])
    grid = patch_grid(slide, segment_tissue(slide))
    yield slide, grid
    slide.close()


def test_heatmap_colours_patches_by_attention(slide_and_grid):
    slide, grid = slide_and_grid
    attention = torch.linspace(0, 1, len(grid))
    plain = render_heatmap(slide, grid.coords, attention, opacity=0.0)
    tinted = render_heatmap(slide, grid.coords, attention, opacity=0.6)
    assert plain.size == tinted.size and max(tinted.size) <= 1024
    a, b = np.asarray(plain).astype(int), np.asarray(tinted).astype(int)
    assert (a != b).any()
    # glass outside every patch is untouched
    assert (a[0, 0] == b[0, 0]).all()


def test_highest_and_lowest_patches_get_opposite_ends_of_the_colormap(slide_and_grid):
    slide, grid = slide_and_grid
    attention = np.zeros(len(grid))
    attention[0], attention[-1] = -5.0, 5.0
    image = np.asarray(render_heatmap(slide, grid.coords, attention, opacity=1.0, patch_size_level0=512))
    scale = max(slide.dimensions) / max(image.shape[:2])
    low = image[int((grid.coords[0][1] + 256) / scale), int((grid.coords[0][0] + 256) / scale)]
    high = image[int((grid.coords[-1][1] + 256) / scale), int((grid.coords[-1][0] + 256) / scale)]
    assert low[2] > low[1] and high[1] > high[2]  # viridis: dark purple-blue low, yellow-green high


def test_top_patches_are_the_most_attended_crops(slide_and_grid):
    slide, grid = slide_and_grid
    attention = np.random.default_rng(0).random(len(grid))
    top = top_attended_patches(slide, grid.coords, attention, k=3, size=128)
    assert [p.rank for p in top] == [1, 2, 3]
    assert top[0].attention == attention.max()
    assert tuple(grid.coords[attention.argmax()]) == top[0].coord
    assert top[0].image.size == (128, 128)


def test_rank_scaling_spreads_outliers():
    unit = attention_to_unit(np.array([0.0, 0.001, 0.002, 100.0]))
    assert unit.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    linear = attention_to_unit(np.array([0.0, 0.001, 0.002, 100.0]), "linear")
    assert linear[2] < 0.01


def test_mismatched_inputs_raise(slide_and_grid):
    slide, grid = slide_and_grid
    with pytest.raises(ValueError, match="attention scores"):
        render_heatmap(slide, grid.coords, np.zeros(len(grid) + 1))
    with pytest.raises(ValueError, match="colormap"):
        render_heatmap(slide, grid.coords, np.zeros(len(grid)), colormap="jet")


def test_the_weight_scale_shows_equal_weights_as_equal():
    """By rank, weights of 0.0197 ± 0.0001 span the whole colormap; by weight (from zero to the largest) they are
    one colour, and a weight twice another sits twice as far up."""
    nearly_equal = np.array([0.0196, 0.0197, 0.0198])
    assert attention_to_unit(nearly_equal).tolist() == [0.0, 0.5, 1.0]
    assert attention_to_unit(nearly_equal, "weight").min() > 0.98
    np.testing.assert_allclose(attention_to_unit(np.array([0.1, 0.2, 0.4]), "weight"), [0.25, 0.5, 1.0])
    assert attention_to_unit(np.zeros(3), "weight").tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rank, weight, linear"):
        attention_to_unit(nearly_equal, "percent")
