"""Dataset specs: the built-in names and ``imagefolder:PATH``."""

from __future__ import annotations

import os

from ..errors import DataError
from .arrays import load_digits, load_fashion_mnist, load_mnist5k
from .bundle import DatasetBundle, check_image_size
from .imagefolder import load_imagefolder

_BUILTINS = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "fashion-mnist": load_fashion_mnist,
}
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "mnist-5k": "mnist5k"}


def list_datasets() -> list[str]:
    """The dataset specs :func:`load_dataset` understands (``imagefolder:PATH`` is a template).

        >>> list_datasets()
        ['digits', 'mnist5k', 'fashion-mnist', 'imagefolder:PATH']
    """
    return list(_BUILTINS) + ["imagefolder:PATH"]


def load_dataset(spec: str, *, seed: int = 0, image_size: int | None = None) -> DatasetBundle:
    """Load a dataset by spec into memory: ``digits``, ``mnist5k``, ``fashion-mnist`` or ``imagefolder:PATH``.

    ``seed`` fixes the stratified 80/20 split (digits, mnist5k, image folders without train/test);
    ``image_size`` resizes to a square side (default: the dataset's own size, 32 for image folders).
    Nothing is downloaded.

        >>> b = load_dataset("digits", seed=0)
        >>> b.num_classes, b.in_channels, b.input_size, len(b.train), len(b.test)
        (10, 1, 8, 1437, 360)
        >>> b32 = load_dataset("digits", image_size=32)  # the same digits, bilinearly upsampled
        >>> own = load_dataset("imagefolder:./my_images", image_size=64)  # doctest: +SKIP
    """
    valid = ", ".join(list_datasets())
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset spec {spec!r} is not usable; expected one of: {valid}.")
    check_image_size(image_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed={seed!r} is not usable; expected an integer (it fixes the train/test split).")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if sep and kind.strip().lower() == "imagefolder":
        return load_imagefolder(rest.strip(), seed=seed, image_size=image_size)
    key = spec.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    loader = _BUILTINS.get(key)
    if loader is None:
        hint = ""
        if os.path.isdir(spec):
            hint = f" {spec!r} is a folder: did you mean 'imagefolder:{spec}'?"
        raise DataError(f"unknown dataset {spec!r}; expected one of: {valid}.{hint}")
    return loader(seed=seed, image_size=image_size)
