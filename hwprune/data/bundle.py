"""``DatasetBundle`` and the array helpers shared by every dataset: split, standardize, resize, wrap."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..errors import DataError


@dataclass
class DatasetBundle:
    """A dataset ready for training: train and test splits plus what a model needs to know about them.

    ``train`` / ``test`` yield ``(image, label)`` with ``image`` a float32 ``(C, H, W)`` tensor, already
    standardized with the train split's per-channel ``mean`` / ``std`` (given in the raw ``[0, 1]`` pixel
    scale), and ``label`` an int64 scalar.

        >>> from hwprune.data import load_dataset
        >>> b = load_dataset("digits")
        >>> x, y = b.train[0]
        >>> tuple(x.shape), b.num_classes, b.classes[:3]
        ((1, 8, 8), 10, ['0', '1', '2'])
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    input_size: int
    classes: list[str]
    description: str
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __repr__(self) -> str:
        return (f"DatasetBundle(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
                f"num_classes={self.num_classes}, in_channels={self.in_channels}, input_size={self.input_size})")


def check_image_size(image_size) -> None:
    """Raise ``DataError`` unless ``image_size`` is None or a positive int.

        >>> check_image_size(32)
    """
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 4096:
        raise DataError(f"image_size={image_size!r} is not usable; expected a positive integer "
                        f"(the side of the square images, e.g. 32), or None for the dataset's own size.")


def stratified_split(n_or_labels: np.ndarray, seed: int, spec: str, test_fraction: float = 0.2,
                     classes: list[str] | None = None):
    """Indices ``(train_idx, test_idx)`` of a stratified split (sklearn ``train_test_split``, ``stratify=y``).
    ``classes``: the class names, for errors (an image folder's class folders).

        >>> tr, te = stratified_split(np.repeat(np.arange(2), 5), seed=0, spec="toy")
        >>> len(tr), len(te)
        (8, 2)
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(n_or_labels)
    counts = np.bincount(y)
    if counts.min(initial=2) < 2:
        few = [int(c) for c in np.flatnonzero(counts < 2)]
        names = "; ".join(f"class {repr(classes[c]) if classes else f'index {c}'} has {counts[c]}" for c in few[:8])
        raise DataError(
            f"{spec}: a stratified 80/20 split needs at least 2 examples per class, but {names}. Add examples, "
            f"or give train/ and test/ folders."
        )
    try:
        tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)
    except ValueError as e:
        raise DataError(
            f"{spec}: cannot make a stratified {1 - test_fraction:.0%}/{test_fraction:.0%} split of "
            f"{len(y)} examples in {len(counts)} classes ({e}). Add examples, or give train/ and test/ folders."
        ) from e
    return np.sort(tr), np.sort(te)


def to_unit_tensor(x: np.ndarray, scale: float) -> torch.Tensor:
    """A float32 torch copy of ``x`` divided by ``scale`` (e.g. 255 for bytes), so pixels are in ``[0, 1]``.

        >>> to_unit_tensor(np.array([[0, 255]], np.uint8), 255.0)
        tensor([[0., 1.]])
    """
    x = np.ascontiguousarray(x)
    with warnings.catch_warnings():  # read-only arrays (np.frombuffer) are fine: the tensor is copied at once
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(x).to(torch.float32, copy=True)
    return t.mul_(1.0 / scale) if scale != 1.0 else t


def standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """In place: subtract the train split's per-channel mean and divide by its std, for ``(N, C, H, W)`` tensors.

    Returns the ``(mean, std)`` that were used, per channel.

        >>> a, b = torch.tensor([0.0, 2.0]).reshape(2, 1, 1, 1), torch.ones(1, 1, 1, 1)
        >>> standardize(a, b), float(b.mean())
        (((1.0,), (1.0,)), 0.0)
    """
    var, mean = torch.var_mean(train, dim=(0, 2, 3), correction=0)
    std = torch.where(var.sqrt() > 1e-6, var.sqrt(), torch.ones_like(var))
    m, s = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
    for t in (train, test):
        t.sub_(m).div_(s)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` float images to ``size x size`` (bilinear, antialiased when shrinking).

        >>> resize(torch.zeros(2, 1, 8, 8), 16).shape
        torch.Size([2, 1, 16, 16])
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrink = size < max(x.shape[-2:])
    return torch.cat([F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
                      for chunk in torch.split(x, 4096)])


def tensor_dataset(x: torch.Tensor, y) -> TensorDataset:
    """Wrap float images and integer labels as a ``TensorDataset`` of float32 / int64 tensors.

        >>> len(tensor_dataset(torch.zeros(3, 1, 2, 2), np.arange(3)))
        3
    """
    return TensorDataset(x.to(torch.float32).contiguous(),
                         torch.as_tensor(np.asarray(y, dtype=np.int64)))
