"""``imagefolder:PATH``: your own images, one sub-folder per class, loaded into memory with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .arrays import make_bundle
from .bundle import DatasetBundle, stratified_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
DEFAULT_IMAGE_SIZE = 32


def _class_folders(root: Path, spec: str) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        files = [p.name for p in root.iterdir() if p.is_file()][:5]
        found = f"only files ({', '.join(files)})" if files else "nothing"
        raise DataError(
            f"{spec}: {root} holds no class folders ({found}). Expected one sub-folder per class with its "
            f"images, e.g. {root}/cat/001.png and {root}/dog/002.png."
        )
    return folders


def _images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _scan(root: Path, spec: str, classes: list[str] | None = None) -> tuple[list[str], list[Path], list[int]]:
    """Class names, image paths and labels under ``root``; with ``classes`` given, folders must be among them."""
    folders = _class_folders(root, spec)
    if classes is None:
        classes = [f.name for f in folders]
    else:
        unknown = [f.name for f in folders if f.name not in classes]
        if unknown:
            raise DataError(
                f"{spec}: {root} has class folder(s) {', '.join(unknown)} that the train/ folder lacks "
                f"(train classes: {', '.join(classes)}). Use the same class folder names in both."
            )
    paths, labels = [], []
    for folder in folders:
        images = _images_of(folder)
        if not images:
            extra = ""
            if any(p.is_dir() for p in folder.iterdir()):
                extra = (" It holds sub-folders: if they are the classes, point at it directly, or for a "
                         "ready-made split give both train/ and test/ (or val/).")
            raise DataError(
                f"{spec}: class folder {folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}).{extra} "
                f"Add images or remove the folder."
            )
        paths += images
        labels += [classes.index(folder.name)] * len(images)
    return classes, paths, labels


def _read(paths: list[Path], size: int, spec: str) -> tuple[np.ndarray, str]:
    """Decode, convert (L if every image is grayscale, else RGB) and resize to ``size x size``; uint8 (N, C, H, W).

    Two passes, so only one decoded full-size image is in memory at a time: headers first (for the
    modes), then decode and resize each.
    """
    from PIL import Image, UnidentifiedImageError

    errors = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)

    def fail(p, e):
        return DataError(f"{spec}: cannot read image {p} ({type(e).__name__}: {e}). Remove or replace that file.")

    modes = []
    for p in paths:
        try:
            with Image.open(p) as im:
                modes.append(im.mode)
        except errors as e:
            raise fail(p, e) from e
    mode = "L" if all(m in _GRAY_MODES for m in modes) else "RGB"
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im.load()
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale to 8 bits
                    a = np.asarray(im, dtype=np.float32)
                    hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
                    im = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8), "L")
                im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except errors as e:
            raise fail(p, e) from e
        out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)
    return out, mode


def load_imagefolder(path: str, *, seed: int = 0, image_size: int | None = None) -> DatasetBundle:
    """Images under ``path/<class>/*.png|jpg|jpeg|bmp|webp``, resized to ``image_size`` (default 32), in memory.

    Images are converted to grayscale (1 channel) when every image is grayscale, otherwise to RGB, and
    resized by stretching to a square. If ``path`` has ``train/`` and ``test/`` (or ``val/``) sub-folders,
    each holding class folders, that split is used; otherwise a stratified 80/20 split with ``seed``.

        >>> b = load_imagefolder("/data/flowers", image_size=64)  # doctest: +SKIP
        >>> b.classes, b.in_channels, b.input_size  # doctest: +SKIP
        (['daisy', 'rose'], 3, 64)
    """
    spec = f"imagefolder:{path}"
    if not path:
        raise DataError("imagefolder: no folder given; expected 'imagefolder:PATH' with PATH a folder of "
                        "class sub-folders, e.g. imagefolder:./my_images")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{spec}: folder {root} does not exist. Check the path (relative paths are "
                        f"resolved from {Path.cwd()}).")
    if not root.is_dir():
        raise DataError(f"{spec}: {root} is a file, not a folder. Give the folder that holds one sub-folder per class.")
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size

    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes, train_paths, y_train = _scan(root / "train", spec)
        _, test_paths, y_test = _scan(test_dir, spec, classes)
        x, mode = _read(train_paths + test_paths, size, spec)
        x_train, x_test = x[:len(train_paths)], x[len(train_paths):]
        y_train, y_test = np.array(y_train, np.int64), np.array(y_test, np.int64)
        split = f"the folder's own split (train/ and {test_dir.name}/)"
    else:
        classes, paths, labels = _scan(root, spec)
        if len(classes) < 2:
            raise DataError(f"{spec}: found a single class folder ({classes[0]}); a classifier needs at least "
                            f"two. Put each class in its own sub-folder of {root}.")
        y = np.array(labels, np.int64)
        tr, te = stratified_split(y, seed, spec, classes=classes)
        x, mode = _read(paths, size, spec)
        x_train, x_test, y_train, y_test = x[tr], x[te], y[tr], y[te]
        split = f"stratified 80/20 split with seed {seed}"
    kind = "grayscale" if mode == "L" else "RGB"
    bundle = make_bundle(
        f"imagefolder:{root}", x_train, y_train, x_test, y_test, scale=255.0, classes=classes, image_size=None,
        source=f"image folder {root.resolve()} ({len(classes)} classes, {kind}, resized to {size}x{size})",
        split=split,
    )
    return bundle
