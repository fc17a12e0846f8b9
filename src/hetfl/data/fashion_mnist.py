"""Fashion-MNIST (Zalando Research, MIT): 70 000 28x28 grey images of clothing in 10 classes.

The four standard idx files (``train-images-idx3-ubyte.gz`` ...) are looked for, in this order:

1. ``data_dir`` (the folder itself or its ``fashion_mnist/`` / ``fashion-mnist/`` subfolder);
2. :data:`SYSTEM_DIR`, ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``);
3. hetfl's cache (``<cache>/fashion_mnist/``: the converted ``.npz``, or idx files copied there);
4. the official download (:data:`OFFICIAL_URL`), when the machine is online.

Each idx file is checked before it is read: against the sha256 Debian ships, or the md5 the
Fashion-MNIST README publishes for the download (gzip wraps the same bytes differently).  The first read
is converted into an uncompressed ``<cache>/fashion_mnist/fashion_mnist.npz`` (uint8, ``allow_pickle``
off) that records the sha256, size and mtime of the files it was made from: later runs load it directly
(as fast as MNIST's cache) as long as the source files are unchanged.  Pixels become ``byte / 256``, as
in :mod:`hetfl.data.mnist`, so the same models and learning rates apply.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.fetch import ArrayCache, Lookup, check_file, default_cache_dir, download_url
from hetfl.data.registry import DATASETS
from hetfl.errors import DataError

__all__ = ["FMNIST_CLASSES", "FMNIST_FILES", "OFFICIAL_URL", "SYSTEM_DIR", "fashion_mnist", "read_idx"]

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CACHE_NAME = "fashion_mnist.npz"
_FORMAT = 1

#: file -> accepted digests: sha256 of Debian's copy, md5 of the official download (its README)
FMNIST_FILES: dict[str, dict[str, str]] = {
    "train-images-idx3-ubyte.gz": {
        "sha256": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "md5": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    },
    "train-labels-idx1-ubyte.gz": {
        "sha256": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "md5": "25c81989df183df01b3e8a0aad5dffbe",
    },
    "t10k-images-idx3-ubyte.gz": {
        "sha256": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "md5": "bef4ecab320f06d8554ea6380940ec79",
    },
    "t10k-labels-idx1-ubyte.gz": {
        "sha256": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "md5": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_KEYS = {"train-images-idx3-ubyte.gz": "x_train", "train-labels-idx1-ubyte.gz": "y_train",
         "t10k-images-idx3-ubyte.gz": "x_test", "t10k-labels-idx1-ubyte.gz": "y_test"}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")

HOW_TO_PROVIDE = (
    "To provide it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs the files in "
    f"{SYSTEM_DIR}), or download the four files {', '.join(FMNIST_FILES)} from {OFFICIAL_URL} (or the "
    "zalandoresearch/fashion-mnist repository's data/fashion/ folder) into a folder and pass it as "
    "--data-dir (config: data.data_dir)."
)


def read_idx(data: bytes, what: str) -> np.ndarray:
    """Parse one (uncompressed) idx file: big-endian header, then uint8 data, as MNIST's files."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{what} is not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"{what}: idx data type 0x{data[2]:02x}, only unsigned bytes (0x08) are read")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{what}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(data) - 4 - 4 * ndim != size:
        raise DataError(f"{what}: the header says {shape} ({size} bytes) but {len(data) - 4 - 4 * ndim} follow "
                        "(truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_gz_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable .gz file: {e}") from None
    return read_idx(data, str(path))


def _find_files(folder: Path) -> dict[str, Path] | None:
    for sub in (folder, folder / "fashion_mnist", folder / "fashion-mnist"):
        if all((sub / name).is_file() for name in FMNIST_FILES):
            return {name: sub / name for name in FMNIST_FILES}
    return None


def _check_arrays(arrays: dict[str, np.ndarray]) -> None:
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {part} images are {x.shape} {x.dtype} and labels {y.shape}; "
                             "expected (n, 28, 28) uint8 and (n,)")
        if int(y.max(initial=0)) > 9:
            raise ValueError(f"Fashion-MNIST {part} labels fall outside 0..9")


def _parse(files: dict[str, Path], verify: bool) -> tuple[dict[str, np.ndarray], dict[str, tuple[Path, str]], bool]:
    """Check and read the four idx files; returns the arrays, their sources, and whether all checks passed."""
    sources: dict[str, tuple[Path, str]] = {}
    verified = True
    for name, path in files.items():
        digest, ok = check_file(path, FMNIST_FILES[name], verify=verify)
        verified &= ok
        sources[name] = (path, digest)
    arrays = {_KEYS[name]: _read_gz_idx(path) for name, path in files.items()}
    try:
        _check_arrays(arrays)
    except ValueError as e:
        raise DataError(str(e)) from None
    return arrays, sources, verified


def _fmnist_arrays(data_dir: str | None, verify: bool) -> tuple[dict[str, np.ndarray], str]:
    cache_dir = default_cache_dir() / "fashion_mnist"
    cache = ArrayCache(cache_dir / CACHE_NAME, _FORMAT, _KEYS.values(), _check_arrays)
    lookup = Lookup("fashion_mnist", HOW_TO_PROVIDE, FMNIST_FILES)

    def from_files(files: dict[str, Path]) -> dict[str, np.ndarray]:
        if cache.path.is_file():
            try:
                arrays = cache.load(files)
                if arrays is not None:
                    return arrays
            except DataError as e:
                lookup.note(cache.path, str(e))
        arrays, sources, verified = _parse(files, verify)
        if verified:  # a copy accepted with data.verify = false never becomes the cache
            cache.save(arrays, sources)
        return arrays

    places: list[tuple[str, Path]] = []
    if data_dir is not None:
        places.append(("data_dir", Path(data_dir).expanduser()))
    places += [("system", SYSTEM_DIR), ("cache", cache_dir)]
    for kind, folder in places:
        files = _find_files(folder)
        if files is None:
            if kind == "cache" and cache.path.is_file():
                try:
                    return cache.load(), str(cache.path)  # type: ignore[return-value]
                except DataError as e:
                    lookup.note(cache.path, str(e))
                    continue
            what = "does not exist" if not folder.exists() else "does not hold the four idx .gz files"
            lookup.note(folder, what)
            if kind == "data_dir":  # an explicit data_dir that lacks the files is an error, not a hint
                raise lookup.error(f"data_dir {folder} holds no Fashion-MNIST")
            continue
        try:
            return from_files(files), str(files["train-images-idx3-ubyte.gz"].parent)
        except DataError as e:
            if kind != "cache":
                raise
            lookup.note(folder, str(e))

    # the official download, into the cache (each file checked before it is kept)
    try:
        files = {}
        for name, digests in FMNIST_FILES.items():
            target = cache_dir / name
            files[name] = target if target.is_file() else download_url(OFFICIAL_URL + name, target, digests)
    except DataError as e:
        lookup.note(OFFICIAL_URL, str(e))
        raise lookup.error() from None
    return from_files(files), f"{OFFICIAL_URL} (downloaded into {cache_dir})"


@DATASETS.register("fashion_mnist")
def fashion_mnist(*, data_dir: str | None = None, seed: int = 0, verify: bool = True) -> Dataset:
    """Fashion-MNIST, 28x28 grey clothing images (60k train / 10k test, 10 classes; Zalando, MIT)."""
    del seed  # nothing is random: the published train/test split is used as is
    arrays, where = _fmnist_arrays(data_dir, verify)

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32)[:, None, :, :] / np.float32(256.0))

    train = Split(images(arrays["x_train"]), torch.from_numpy(arrays["y_train"].astype(np.int64)))
    test = Split(images(arrays["x_test"]), torch.from_numpy(arrays["y_test"].astype(np.int64)))
    return Dataset(
        name="fashion_mnist",
        train=train,
        test=test,
        info=DataInfo(input_shape=(1, 28, 28), num_classes=10),
        notes={
            "source": where,
            "sizes": {"train": len(train), "test": len(test)},
            "classes": list(FMNIST_CLASSES),
            "scaling": "pixel = byte / 256, as hetfl's mnist",
            "licence": "MIT, Zalando SE (Xiao, Rasul, Vollgraf 2017)",
        },
    )
