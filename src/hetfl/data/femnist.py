"""FEMNIST (LEAF, Caldas et al. 2018): handwritten characters, 62 classes, one natural client per writer.

hetfl reads LEAF's preprocessed JSON files; it does not run LEAF's scripts (they download the NIST
Special Database 19).  ``data_dir`` is the folder that holds them, in one of LEAF's layouts:

* ``train/*.json`` and ``test/*.json`` (after LEAF's ``split_data.sh``): the split is LEAF's;
* ``all_data/*.json`` (after ``preprocess.sh`` alone), or the ``*.json`` files themselves: per writer,
  the last ``test_fraction`` of the writer's samples become test samples (LEAF's sample split).

Each file is ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], "y":
[labels]}}}``; pixels are floats in [0, 1] (LEAF writes ``k / 255``) and are kept as they are.  The
first read is converted into ``<cache>/femnist/femnist-<layout>.npz`` (uint8, ``k``), reused while the
JSON files are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.checks import check_fraction, check_int, split_counts
from hetfl.data.fetch import ArrayCache, Lookup, default_cache_dir, file_digest
from hetfl.data.registry import DATASETS
from hetfl.errors import DataError

__all__ = ["FEMNIST_CLASSES", "femnist"]

#: LEAF's label order: digits, upper-case, lower-case letters
FEMNIST_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_FORMAT = 1
HOW_TO_PROVIDE = (
    "FEMNIST is not downloaded by hetfl: run LEAF's data/femnist/preprocess.sh (github.com/TalwalkarLab/leaf; "
    "it fetches NIST Special Database 19) and pass the folder holding all_data/ (or train/ and test/) as "
    "--data-dir (config: data.data_dir)."
)


def _layout(base: Path) -> tuple[str, dict[str, list[Path]]] | None:
    for root in (base, base / "femnist", base / "data"):
        train, test = sorted((root / "train").glob("*.json")), sorted((root / "test").glob("*.json"))
        if train and test:
            return "split", {"train": train, "test": test}
        if files := sorted((root / "all_data").glob("*.json")):
            return "all_data", {"all": files}
        if files := sorted(root.glob("*.json")):
            return "all_data", {"all": files}
    return None


def _read_json(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One LEAF file -> {writer: (uint8 images (n, 28, 28), int64 labels)}."""
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({type(e).__name__}: {e}); a truncated copy? Run LEAF's "
                        "preprocessing again") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("user_data"), dict):
        keys = ", ".join(sorted(map(str, raw))) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{path} is not a LEAF FEMNIST file: it has no 'user_data' object (found: {keys}); "
                        "expected {\"users\": [...], \"num_samples\": [...], \"user_data\": {writer: {\"x\": "
                        "[[784 floats]], \"y\": [labels]}}}")
    out = {}
    for writer, data in raw["user_data"].items():
        try:
            x = np.asarray(data["x"], dtype=np.float32)
            y = np.asarray(data["y"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: writer {writer!r} has no numeric 'x' and 'y' lists ({e})") from None
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (len(x),):
            raise DataError(f"{path}: writer {writer!r} has x {x.shape} and y {y.shape}; expected (n, 784) and (n,)")
        if len(y) and (y.min() < 0 or y.max() >= len(FEMNIST_CLASSES)):
            raise DataError(f"{path}: writer {writer!r} has labels outside 0..61")
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise DataError(f"{path}: writer {writer!r} has pixels outside [0, 1]")
        out[str(writer)] = (np.rint(x * 255).astype(np.uint8).reshape(-1, 28, 28), y)
    return out


def _check_arrays(arrays: dict[str, Any]) -> None:
    for part in ("train", "test"):
        x, y, g = arrays[f"x_{part}"], arrays[f"y_{part}"], arrays[f"g_{part}"]
        if x.dtype != np.uint8 or x.shape[1:] != (28, 28) or y.shape != (len(x),) or g.shape != (len(x),):
            raise ValueError(f"{part}: x {x.shape} {x.dtype}, y {y.shape}, writers {g.shape}")


def _arrays(layout: str, files: dict[str, list[Path]], test_fraction: float) -> dict[str, np.ndarray]:
    writers: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for part, paths in files.items():
        for path in paths:
            for writer, xy in _read_json(path).items():
                writers.setdefault(writer, {})[part] = xy
    names = sorted(writers)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for g, writer in enumerate(names):
        if layout == "split":
            for part in ("train", "test"):
                if part in writers[writer]:
                    x, y = writers[writer][part]
                    parts[part].append((x, y, np.full(len(y), g)))
        else:
            x, y = writers[writer]["all"]
            k = len(y) - split_counts(len(y), test_fraction)
            parts["train"].append((x[:k], y[:k], np.full(k, g)))
            parts["test"].append((x[k:], y[k:], np.full(len(y) - k, g)))
    out: dict[str, np.ndarray] = {"writers": np.array(names)}
    for part, rows in parts.items():
        out[f"x_{part}"] = np.concatenate([r[0] for r in rows]) if rows else np.zeros((0, 28, 28), np.uint8)
        out[f"y_{part}"] = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.int64)
        out[f"g_{part}"] = np.concatenate([r[2] for r in rows]).astype(np.int64) if rows else np.zeros(0, np.int64)
    return out


@DATASETS.register("femnist")
def femnist(*, data_dir: str | None = None, seed: int = 0, test_fraction: float = 0.1,
            max_writers: int = 0) -> Dataset:
    """LEAF's FEMNIST (28x28 handwritten digits and letters, 62 classes), one natural group per writer.

    ``max_writers > 0`` keeps that many writers (a seeded choice) for quick runs.  Use the ``natural``
    partitioner with ``num_clients = 0`` for one client per writer.
    """
    test_fraction = check_fraction("test_fraction", test_fraction)
    max_writers = check_int("max_writers", max_writers, 0)
    lookup = Lookup("femnist", HOW_TO_PROVIDE, ["train/*.json + test/*.json", "all_data/*.json", "*.json"])
    if data_dir is None:
        lookup.note("data.data_dir", "not set (FEMNIST is read from LEAF's files only)")
        raise lookup.error()
    base = Path(data_dir).expanduser()
    found = _layout(base)
    if found is None:
        lookup.note(base, "does not exist" if not base.exists() else "holds no LEAF JSON files")
        raise lookup.error(f"data_dir {base} holds no FEMNIST")
    layout, files = found
    sources = {f"{part}/{p.name}": p for part, paths in files.items() for p in paths}
    tag = hashlib.sha256(f"{base.resolve()}|{layout}|{test_fraction}".encode()).hexdigest()[:12]
    keys = ["writers", *(f"{k}_{p}" for p in ("train", "test") for k in ("x", "y", "g"))]
    cache = ArrayCache(default_cache_dir() / "femnist" / f"femnist-{tag}.npz", _FORMAT, keys, _check_arrays)
    arrays = None
    if cache.path.is_file():
        try:
            arrays = cache.load(sources)
        except DataError:
            arrays = None
    if arrays is None:
        arrays = _arrays(layout, files, test_fraction)
        cache.save(arrays, {n: (p, file_digest(p, "sha256")) for n, p in sources.items()})
    names = [str(w) for w in arrays["writers"]]
    x_tr, y_tr, g_tr = arrays["x_train"], arrays["y_train"], arrays["g_train"]
    x_te, y_te, g_te = arrays["x_test"], arrays["y_test"], arrays["g_test"]
    if max_writers and max_writers < len(names):
        keep = np.sort(np.random.default_rng(seed).choice(len(names), max_writers, replace=False))
        remap = np.full(len(names), -1)
        remap[keep] = np.arange(len(keep))
        tr, te = np.isin(g_tr, keep), np.isin(g_te, keep)
        x_tr, y_tr, g_tr = x_tr[tr], y_tr[tr], remap[g_tr[tr]]
        x_te, y_te, g_te = x_te[te], y_te[te], remap[g_te[te]]
        names = [names[i] for i in keep]
    if len(y_tr) == 0:
        raise DataError(f"{base}: the FEMNIST files hold no training samples")

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32)[:, None] / np.float32(255.0))

    return Dataset(
        name="femnist",
        train=Split(images(x_tr), torch.from_numpy(y_tr)),
        test=Split(images(x_te), torch.from_numpy(y_te)),
        info=DataInfo(input_shape=(1, 28, 28), num_classes=len(FEMNIST_CLASSES)),
        groups=g_tr.astype(np.int64),
        group_names=tuple(names),
        notes={"source": str(base), "layout": layout, "writers": len(names),
               "sizes": {"train": len(y_tr), "test": len(y_te)},
               "split": "LEAF's train/test files" if layout == "split"
               else f"per writer, the last {test_fraction} of its samples are test"},
    )
