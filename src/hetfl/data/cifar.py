"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official "python version" archives.

A ``data_dir`` holds the archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) or the folder
it extracts to (``cifar-10-batches-py/`` / ``cifar-100-python/``); without one, hetfl's cache is used and,
when the machine is online, the archive is downloaded from :data:`CIFAR10.url` into it.

Trust: the batches are Python pickles.  The archive is checked against its published md5 (and an
extracted folder's batches against theirs) *before* anything is unpickled, and every batch is then read
with a restricted unpickler (:func:`hetfl.data.fetch.safe_unpickle`) that rebuilds only numpy arrays,
dicts, lists, strings and numbers -- so even a copy accepted with ``data.verify = false`` cannot run code.
Members are read from the archive in memory; nothing is extracted to disk.  The first read is converted
into an uncompressed uint8 ``<cache>/<name>/<name>.npz`` that later runs load directly while the source is
unchanged.
"""

from __future__ import annotations

import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.checks import check_choice
from hetfl.data.fetch import ArrayCache, Lookup, check_file, default_cache_dir, download_url, safe_unpickle
from hetfl.data.registry import DATASETS
from hetfl.errors import DataError

__all__ = ["CIFAR10", "CIFAR100", "CifarSource", "cifar10", "cifar100"]


@dataclass(frozen=True)
class CifarSource:
    name: str  # hetfl's dataset name, also the cache folder
    archive: str
    archive_md5: str
    archive_size: int
    folder: str  # what the archive extracts to
    train: tuple[tuple[str, str], ...]  # (batch file, md5)
    test: tuple[tuple[str, str], ...]
    label_keys: tuple[str, ...]  # keys of the label lists in a batch, e.g. ("labels",)

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"

    @property
    def batches(self) -> tuple[tuple[str, str], ...]:
        return self.train + self.test


CIFAR10 = CifarSource(
    name="cifar10",
    archive="cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    archive_size=170_498_071,
    folder="cifar-10-batches-py",
    train=(
        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    ),
    test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    label_keys=("labels",),
)
CIFAR100 = CifarSource(
    name="cifar100",
    archive="cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    archive_size=169_001_437,
    folder="cifar-100-python",
    train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
    test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    label_keys=("fine_labels", "coarse_labels"),
)
_FORMAT = 1


def _how_to_provide(src: CifarSource) -> str:
    return (f"To provide it, download {src.url} (md5 {src.archive_md5}) and pass the folder that holds it -- or "
            f"the {src.folder}/ folder it extracts to -- as --data-dir (config: data.data_dir); or copy the "
            f"archive into hetfl's cache {default_cache_dir() / src.name}.")


def _check_arrays(src: CifarSource) -> Callable[[dict[str, Any]], None]:
    def check(arrays: dict[str, Any]) -> None:
        for part in ("train", "test"):
            x = arrays[f"x_{part}"]
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32):
                raise ValueError(f"x_{part} is {x.shape} {x.dtype}, expected (n, 3, 32, 32) uint8")
            for key in src.label_keys:
                y = arrays[f"{key}_{part}"]
                if y.shape != (len(x),):
                    raise ValueError(f"{key}_{part} has shape {y.shape} for {len(x)} images")
    return check


def _batch_arrays(data: bytes, what: str, src: CifarSource) -> dict[str, np.ndarray]:
    """Unpickle one batch (restricted) into uint8 images (n, 3, 32, 32) and int64 label arrays."""
    try:
        batch = safe_unpickle(data)
    except pickle.UnpicklingError as e:
        raise DataError(f"{what} is not a CIFAR batch: {e}") from None
    except Exception as e:  # truncated or foreign bytes: EOFError, ValueError, ...
        raise DataError(f"{what} could not be read as a CIFAR batch ({type(e).__name__}: truncated or "
                        "damaged)") from None
    if not isinstance(batch, dict) or "data" not in batch or any(k not in batch for k in src.label_keys):
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{what} holds {keys}, not a CIFAR batch with 'data' and {', '.join(src.label_keys)}")
    x = np.asarray(batch["data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DataError(f"{what}: 'data' is {x.shape} {x.dtype}, expected (n, 3072) uint8")
    out = {"x": x.reshape(-1, 3, 32, 32)}
    for key in src.label_keys:
        y = np.asarray(batch[key], dtype=np.int64)
        if y.shape != (len(x),):
            raise DataError(f"{what}: {len(y)} {key} for {len(x)} images")
        out[key] = y
    return out


def _assemble(src: CifarSource, read: Callable[[str], bytes], where: str) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for part, batches in (("train", src.train), ("test", src.test)):
        parts = [_batch_arrays(read(name), f"{where}/{name}", src) for name, _ in batches]
        arrays[f"x_{part}"] = np.concatenate([p["x"] for p in parts])
        for key in src.label_keys:
            arrays[f"{key}_{part}"] = np.concatenate([p[key] for p in parts])
    return arrays


def _from_archive(path: Path, src: CifarSource, verify: bool) -> tuple[dict[str, np.ndarray], str, bool]:
    """Check the archive (size, md5) and read its batches in memory."""
    size = path.stat().st_size
    if size < src.archive_size and verify:
        raise DataError(f"{path} is truncated: {size} of {src.archive_size} bytes (an interrupted download?); "
                        f"nothing was unpacked. Download it again from {src.url}")
    digest, ok = check_file(path, {"md5": src.archive_md5}, verify=verify)
    try:
        with tarfile.open(path, mode="r:gz") as tar:

            def read(name: str) -> bytes:
                try:
                    f = tar.extractfile(f"{src.folder}/{name}")
                except KeyError:
                    raise DataError(f"{path} has no member {src.folder}/{name}") from None
                if f is None:
                    raise DataError(f"{path}: {src.folder}/{name} is not a file")
                return f.read()

            arrays = _assemble(src, read, f"{path}!{src.folder}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path} is truncated or damaged ({type(e).__name__}: {e}); nothing was used. "
                        f"Download it again from {src.url}") from None
    return arrays, digest, ok


def _folder_batches(folder: Path, src: CifarSource) -> dict[str, Path] | None:
    for base in (folder, folder / src.folder):
        if all((base / name).is_file() for name, _ in src.batches):
            return {name: base / name for name, _ in src.batches}
    return None


def _from_folder(files: dict[str, Path], src: CifarSource, verify: bool) -> tuple[dict[str, np.ndarray], dict, bool]:
    """Check every extracted batch against its published md5 first, then read them."""
    sources, verified = {}, True
    for name, md5 in src.batches:
        digest, ok = check_file(files[name], {"md5": md5}, verify=verify)
        sources[name] = (files[name], digest)
        verified &= ok
    folder = files[src.batches[0][0]].parent
    return _assemble(src, lambda name: files[name].read_bytes(), str(folder)), sources, verified


def _cifar_arrays(src: CifarSource, data_dir: str | None, verify: bool) -> tuple[dict[str, np.ndarray], str]:
    cache_dir = default_cache_dir() / src.name
    keys = [f"{k}_{p}" for p in ("train", "test") for k in ("x", *src.label_keys)]
    cache = ArrayCache(cache_dir / f"{src.name}.npz", _FORMAT, keys, _check_arrays(src))
    lookup = Lookup(src.name, _how_to_provide(src), [src.archive, f"{src.folder}/"])

    def cached(sources: dict[str, Path] | None) -> dict[str, np.ndarray] | None:
        if not cache.path.is_file():
            return None
        try:
            return cache.load(sources)
        except DataError as e:
            lookup.note(cache.path, str(e))
            return None

    def load_archive(path: Path) -> dict[str, np.ndarray]:
        arrays = cached({src.archive: path})
        if arrays is None:
            arrays, digest, ok = _from_archive(path, src, verify)
            if ok:  # a copy accepted with data.verify = false never becomes the cache
                cache.save(arrays, {src.archive: (path, digest)})
        return arrays

    def load_folder(files: dict[str, Path]) -> dict[str, np.ndarray]:
        arrays = cached(files)
        if arrays is None:
            arrays, sources, ok = _from_folder(files, src, verify)
            if ok:
                cache.save(arrays, sources)
        return arrays

    if data_dir is not None:
        base = Path(data_dir).expanduser()
        archive = base if base.is_file() and base.name == src.archive else None
        for folder in (base, base / src.name):
            if archive is None and (folder / src.archive).is_file():
                archive = folder / src.archive
        if archive is not None:
            return load_archive(archive), str(archive)
        files = next((f for f in (_folder_batches(base, src), _folder_batches(base / src.name, src)) if f), None)
        if files is not None:
            return load_folder(files), str(files[src.batches[0][0]].parent)
        lookup.note(base, "does not exist" if not base.exists() else f"holds neither {src.archive} nor "
                    f"{src.folder}/ with {', '.join(n for n, _ in src.batches)}")
        raise lookup.error(f"data_dir {base} holds no {src.name}")

    if cache.path.is_file():
        arrays = cached(None)
        if arrays is not None:
            return arrays, str(cache.path)
    else:
        lookup.note(cache.path, "not found")
    target = cache_dir / src.archive
    if not target.is_file():
        try:
            download_url(src.url, target, {"md5": src.archive_md5})
        except DataError as e:
            lookup.note(src.url, str(e))
            raise lookup.error() from None
    return load_archive(target), str(target)


def _dataset(src: CifarSource, arrays: dict[str, np.ndarray], where: str, label_key: str,
             num_classes: int, normalize: bool) -> Dataset:
    x_train = torch.from_numpy(arrays["x_train"].astype(np.float32) / np.float32(255.0))
    x_test = torch.from_numpy(arrays["x_test"].astype(np.float32) / np.float32(255.0))
    notes: dict[str, object] = {"source": where, "sizes": {"train": len(x_train), "test": len(x_test)},
                                "labels": label_key}
    if normalize:  # per channel, with the training images' own mean and std
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        notes["normalize"] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    y_train = torch.from_numpy(arrays[f"{label_key}_train"])
    y_test = torch.from_numpy(arrays[f"{label_key}_test"])
    for part, y in (("train", y_train), ("test", y_test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(f"{where}: {part} {label_key} fall outside 0..{num_classes - 1}")
    return Dataset(name=src.name, train=Split(x_train, y_train), test=Split(x_test, y_test),
                   info=DataInfo(input_shape=(3, 32, 32), num_classes=num_classes), notes=notes)


@DATASETS.register("cifar10")
def cifar10(*, data_dir: str | None = None, seed: int = 0, verify: bool = True, normalize: bool = True) -> Dataset:
    """CIFAR-10: 60 000 32x32 colour images in 10 classes (50k train / 10k test), official python archive.

    ``normalize`` standardises each channel with the training images' mean and std (else pixels / 255).
    """
    del seed  # the published split is used as is
    arrays, where = _cifar_arrays(CIFAR10, data_dir, verify)
    return _dataset(CIFAR10, arrays, where, "labels", 10, normalize)


@DATASETS.register("cifar100")
def cifar100(*, data_dir: str | None = None, seed: int = 0, verify: bool = True, normalize: bool = True,
             labels: str = "fine") -> Dataset:
    """CIFAR-100: 60 000 32x32 colour images, 100 fine classes (or the 20 coarse superclasses: ``labels``)."""
    del seed
    labels = check_choice("labels", labels, ("fine", "coarse"))
    arrays, where = _cifar_arrays(CIFAR100, data_dir, verify)
    return _dataset(CIFAR100, arrays, where, f"{labels}_labels", 100 if labels == "fine" else 20, normalize)
