"""Batched torch Macenko normaliser: agreement with torchstain, batching, fit, edge cases."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.vision_tower.stain import MacenkoNormalizer, _smallest
from chatexaonepath.synthetic.slides import stained_patch as he_patch

torchstain = pytest.importorskip("torchstain")
from torchstain.torch.normalizers import TorchMacenkoNormalizer  # noqa: E402

STRENGTHS = [(1.0, 1.0), (0.5, 1.4), (1.5, 0.6), (0.8, 0.8), (1.3, 1.3), (0.6, 0.5)]


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.stack([he_patch(i, h=h, e=e) for i, (h, e) in enumerate(STRENGTHS)])


def torchstain_normalize(images: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Reference: torchstain's per-image Macenko (C×H×W in, H×W×C int out)."""
    ref = TorchMacenkoNormalizer()
    if target is not None:
        ref.fit(torch.from_numpy(target).permute(2, 0, 1))
    outs = [ref.normalize(torch.from_numpy(img).permute(2, 0, 1), stains=False)[0] for img in images]
    return torch.stack(outs).numpy()


def mean_abs_diff(a: np.ndarray | torch.Tensor, b: np.ndarray) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.abs(a.astype(np.int32) - b.astype(np.int32)).reshape(len(a), -1).mean(1)


def test_agrees_with_torchstain_per_image(batch):
    ours = MacenkoNormalizer().normalize(torch.from_numpy(batch))
    mad = mean_abs_diff(ours, torchstain_normalize(batch))
    assert (mad <= 2.0).all(), mad
    # and it did something: the stains were really remapped
    assert (mean_abs_diff(ours, batch) > 3.0).all()


def test_odd_sized_image_agrees_with_torchstain():
    img = he_patch(42, size=128)[:101, :93]  # pixel count not a multiple of the selection block
    ours = MacenkoNormalizer().normalize(img[None])
    assert mean_abs_diff(ours, torchstain_normalize(img[None]))[0] <= 2.0


def test_batched_equals_per_image(batch):
    norm = MacenkoNormalizer()
    batched = norm.normalize(torch.from_numpy(batch))
    for i, img in enumerate(batch):
        single = norm.normalize(torch.from_numpy(img))
        assert torch.equal(batched[i], single), i


def test_fit_changes_output_and_agrees_with_torchstain_fit(batch):
    target = he_patch(99, h=1.4, e=0.7, white=0.05)
    default = MacenkoNormalizer().normalize(batch)
    norm = MacenkoNormalizer()
    assert norm.fit(target) is norm
    fitted = norm.normalize(batch)
    assert (mean_abs_diff(fitted, default.numpy()) > 1.0).all()
    mad = mean_abs_diff(fitted, torchstain_normalize(batch, target=target))
    assert (mad <= 2.0).all(), mad


def test_blank_and_flat_images_are_left_unchanged_and_logged(batch, caplog):
    white = np.random.default_rng(0).integers(225, 256, size=batch.shape[1:], dtype=np.uint8)
    flat_pink = np.broadcast_to(np.array([200, 120, 170], np.uint8), batch.shape[1:])  # no stain spread
    images = np.concatenate([batch[:2], white[None], batch[2:4], flat_pink[None], batch[4:]])
    with caplog.at_level(logging.WARNING, logger="chatexaonepath.vision_tower.stain"):
        out = MacenkoNormalizer().normalize(images)
    assert torch.equal(out[2], torch.from_numpy(white))
    assert torch.equal(out[5], torch.from_numpy(flat_pink.copy()))
    assert "unchanged" in caplog.text and "2" in caplog.text and "5" in caplog.text
    others = torch.cat([out[:2], out[3:5], out[6:]])
    assert (mean_abs_diff(others, torchstain_normalize(batch)) <= 2.0).all()


def test_fit_on_blank_target_raises():
    with pytest.raises(ChatEXAONEPathError):
        MacenkoNormalizer().fit(np.full((64, 64, 3), 250, np.uint8))


def test_dtype_shape_and_numpy_input(batch):
    norm = MacenkoNormalizer()
    from_numpy = norm.normalize(batch)
    assert isinstance(from_numpy, torch.Tensor)
    assert from_numpy.dtype == torch.uint8 and from_numpy.shape == batch.shape
    assert torch.equal(from_numpy, norm.normalize(torch.from_numpy(batch)))
    single = norm.normalize(batch[0])
    assert single.shape == batch.shape[1:] and single.dtype == torch.uint8
    assert torch.equal(single, from_numpy[0])
    assert norm.normalize(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 8, 8, 3)


def test_rejects_bad_input():
    norm = MacenkoNormalizer()
    with pytest.raises(TypeError):
        norm.normalize(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        norm.normalize(np.zeros((2, 8, 8, 4), np.uint8))


def test_blocked_selection_is_exact():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 500, (6, 4096), generator=gen).float()  # plenty of ties
    for k in (1, 41, 200):
        got, idx = _smallest(values, k, ordered=True)
        assert torch.equal(got, values.sort(1).values[:, :k])
        assert torch.equal(values.gather(1, idx), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(batch):
    norm = MacenkoNormalizer()
    gpu = norm.normalize(torch.from_numpy(batch).cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8
    assert (mean_abs_diff(gpu.cpu(), norm.normalize(batch).numpy()) <= 0.5).all()


def test_stain_target_image_fits_the_reference_and_is_recorded(batch, tmp_path, slides, tiny_encoder):
    """--stain-target: the normaliser is fitted to the image, and features record which image (by hash)."""
    from PIL import Image

    from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
    from chatexaonepath.vision_tower.features import read_attrs
    from chatexaonepath.vision_tower.slide import open_slide
    from chatexaonepath.vision_tower.stain import HE_REF, macenko_normalizer, stain_target_sha256

    target = he_patch(99, h=1.4, e=0.7, white=0.05)
    path = tmp_path / "target.png"
    Image.fromarray(target).save(path)
    fitted = macenko_normalizer(path)
    assert not torch.allclose(fitted.he_ref, torch.tensor(HE_REF), atol=1e-3)
    torch.testing.assert_close(fitted.normalize(batch), MacenkoNormalizer().fit(target).normalize(batch))
    config = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, stain_norm="macenko", stain_target=str(path))
    extractor = FeatureExtractor(config, tiny_encoder)
    torch.testing.assert_close(extractor.normalizer.he_ref, fitted.he_ref)
    with open_slide(slides["tumor"]) as slide:
        extractor.extract(slide, tmp_path / "out")
    attrs = read_attrs(tmp_path / "out" / "tumor.h5")
    assert attrs["stain_target_sha256"] == stain_target_sha256(path) != "none"
    assert attrs["stain_target"] == str(path)


def test_stain_target_errors_are_one_sentence(tmp_path):
    from chatexaonepath.vision_tower.extraction import ExtractConfig
    from chatexaonepath.vision_tower.stain import macenko_normalizer

    with pytest.raises(ChatEXAONEPathError, match="needs --stain-norm macenko"):
        ExtractConfig(stain_target=str(tmp_path / "t.png"))
    with pytest.raises(ChatEXAONEPathError, match="is not a file"):
        macenko_normalizer(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ChatEXAONEPathError, match="not a readable image"):
        macenko_normalizer(tmp_path / "bad.png")
