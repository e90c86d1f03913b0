import h5py
import numpy as np
import pytest
import torch

from chatexaonepath.errors import FeaturesError
from chatexaonepath.vision_tower.features import read_features, settings_match, write_features


def test_roundtrip_keeps_arrays_and_attrs(tmp_path):
    features = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    coords = np.arange(10, dtype=np.int64).reshape(5, 2) * 512
    path = write_features(tmp_path / "s1.h5", features, coords, {"encoder": "x", "target_mpp": 0.5})
    bag = read_features(path)
    assert bag.features.dtype == torch.float16 and bag.features.shape == (5, 8)
    np.testing.assert_allclose(bag.features.float().numpy(), features, atol=1e-2)
    assert bag.coords.dtype == torch.int64 and bag.coords.tolist() == coords.tolist()
    assert bag.attrs["encoder"] == "x" and bag.attrs["target_mpp"] == 0.5 and bag.attrs["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5"]  # no temp file left behind


def test_two_sessions_writing_the_same_slide_at_once_both_succeed(tmp_path):
    # The app's sessions are threads of one process: the same slide uploaded twice at once is
    # extracted twice and both write its cache file. Each must land whole, neither fail.
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    features = np.random.default_rng(0).normal(size=(4000, 256)).astype(np.float32)
    coords = np.zeros((4000, 2), dtype=np.int64)
    start = Barrier(4)

    def write(_):
        start.wait()
        return write_features(tmp_path / "s1.h5", features, coords, {"encoder": "x"})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    assert read_features(tmp_path / "s1.h5").features.shape == (4000, 256)
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5"]


def test_reads_pt_tensors_and_dicts(tmp_path):
    torch.save(torch.randn(7, 16), tmp_path / "a.pt")
    torch.save({"features": torch.randn(1, 4, 16), "coords": torch.zeros(4, 2, dtype=torch.int32)}, tmp_path / "b.pt")
    a, b = read_features(tmp_path / "a.pt"), read_features(tmp_path / "b.pt")
    assert a.features.shape == (7, 16) and a.coords is None
    assert b.features.shape == (4, 16) and b.coords.dtype == torch.int64


@pytest.mark.parametrize("case", ["no_features", "not_hdf5", "bad_coords", "nan", "pt_wrong_type", "wrong_suffix", "missing"])
def test_malformed_files_raise_features_error(tmp_path, case):
    path = tmp_path / "bad.h5"
    if case == "no_features":
        with h5py.File(path, "w") as f:
            f.create_dataset("coords", data=np.zeros((2, 2)))
    elif case == "not_hdf5":
        path.write_text("hello")
    elif case == "bad_coords":
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=np.zeros((3, 4)))
            f.create_dataset("coords", data=np.zeros((2, 2)))
    elif case == "nan":
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=np.full((3, 4), np.nan))
    elif case == "pt_wrong_type":
        path = tmp_path / "bad.pt"
        torch.save(["not", "a", "tensor"], path)
    elif case == "wrong_suffix":
        path = tmp_path / "bad.npy"
        path.write_text("x")
    else:
        path = tmp_path / "absent.h5"
    with pytest.raises(FeaturesError) as info:
        read_features(path)
    assert "\n" not in str(info.value)


def test_settings_match_detects_changes(tmp_path):
    path = write_features(tmp_path / "s.h5", np.zeros((1, 2)), np.zeros((1, 2)), {"encoder": "a", "stain_norm": "none"})
    assert settings_match(path, {"encoder": "a", "stain_norm": "none"})
    assert not settings_match(path, {"encoder": "a", "stain_norm": "macenko"})
    assert not settings_match(tmp_path / "other.h5", {"encoder": "a"})
