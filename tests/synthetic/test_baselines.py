"""The baselines the learning benchmark puts beside the model: intervals, the classifiers, colour statistics
read from a slide, and a label-supervised ABMIL that finds what there is to find."""

import numpy as np
import pytest
import torch

from chatexaonepath.synthetic import baselines as B
from chatexaonepath.synthetic.lesions import NO_LESION
from chatexaonepath.synthetic.slides import make_synthetic_slide
from chatexaonepath.vision_tower.features import SlideFeatures


def test_an_accuracy_carries_its_wilson_interval():
    low, high = B.Accuracy(8, 8).interval
    assert high == 1.0 and low == pytest.approx(0.676, abs=1e-3)  # 8/8 is not certainty
    low, high = B.Accuracy(12, 24).interval
    assert low == pytest.approx(0.314, abs=1e-3) and high == pytest.approx(0.686, abs=1e-3)
    assert B.Accuracy(0, 10).interval[0] == 0.0 and np.isnan(B.Accuracy(0, 0).interval[0])
    assert str(B.Accuracy(3, 4)).startswith("0.75 [")


def test_the_classifiers_separate_what_is_separable_and_choose_their_penalty_on_validation():
    rng = np.random.default_rng(0)
    centres = {"a": np.array([3.0, 0, 0]), "b": np.array([0, 3.0, 0]), "c": np.array([0, 0, 3.0])}

    def draw(n):
        labels = [k for k in centres for _ in range(n)]
        return np.stack([centres[k] + rng.normal(0, 1, 3) for k in labels]), labels

    train, val, (test_x, test_y) = draw(20), draw(10), draw(10)
    for method in ("centroid", "logistic"):
        predicted = B.classify(train, val, test_x, method)
        assert np.mean([p == t for p, t in zip(predicted, test_y)]) > 0.85, method


def test_colour_statistics_are_read_from_the_slide_at_the_features_coordinates(tmp_path):
    slide = make_synthetic_slide(tmp_path / "s.tiff", "tumor", (1024, 1024), mpp=0.5, seed=1, coverage=0.9)
    coords = np.array([[0, 0], [512, 512]])
    stats = B.patch_colour_statistics(slide, coords, 256)
    assert stats["moments"].shape == (2, 6) and stats["histogram"].shape == (2, 24) and stats["density"].shape == (2, 6)
    assert np.allclose(stats["histogram"].reshape(2, 3, 8).sum(-1), 1.0)
    glass = B.patch_colour_statistics(slide, np.array([[0, 0]]), 64)["moments"][0]  # a corner of bright glass
    assert (glass[:3] > 200).all()


def _view(rng, ids, split, signal: bool):
    """A split of fake slides: normal patches, and on lesion slides a few patches carrying a type-specific shift
    under a slide-wide offset (a stain) that hides it from anything not looking within the slide."""
    labels, features, coverage, colour = {}, {}, {}, {}
    types = ("adenocarcinoma", "melanoma", NO_LESION)
    for i, sid in enumerate(ids):
        diagnosis = types[i % 3]
        x = rng.normal(0, 1, (40, 16)) + rng.normal(0, 3, 16)  # the slide's own offset
        cover = np.zeros(40)
        if diagnosis != NO_LESION:
            cover[:4] = 1.0
            if signal:
                x[:4, types.index(diagnosis)] += 6.0
        labels[sid] = {"slide_id": sid, "organ": "colon", "diagnosis": diagnosis,
                       "grade": "low" if diagnosis != NO_LESION else "", "margins": "clear" if diagnosis != NO_LESION
                       else "", "split": split}
        features[sid] = SlideFeatures(torch.tensor(x, dtype=torch.float16), torch.zeros(40, 2, dtype=torch.long), {})
        coverage[sid] = cover
        colour[sid] = {"moments": rng.normal(0, 1, (40, 6))}
    return B.SplitView(list(ids), labels, features, colour, coverage)


@pytest.mark.parametrize("signal", [True, False])
def test_abmil_finds_a_lesion_hidden_under_each_slide_s_offset_and_nothing_where_there_is_none(signal):
    rng = np.random.default_rng(1)
    views = {split: _view(rng, [f"{split}-{i}" for i in range(n)], split, signal)
             for split, n in (("train", 36), ("val", 12), ("test", 24))}
    result = B.abmil_baseline(views, seed=0, epochs=15)
    if signal:
        assert result.accuracy["diagnosis"].value >= 0.9 and result.localisation_auc > 0.9
    else:
        assert result.accuracy["diagnosis"].value <= 0.6  # chance is a third
    colour = B.colour_baseline(views)  # colour here is noise: no variant may find anything
    assert colour.best("diagnosis")[1].value <= 0.7 and colour.best_localisation()[1] < 0.8
