"""The user's own data: a folder of images (one sub-folder per class) or a ``.npz`` of arrays.

``image_folder``: ``data_dir`` holds one sub-folder per class (``cat/``, ``dog/`` ...), or ``train/`` and
``test/`` folders that each hold the same class sub-folders.  Without ``train/``/``test/``, a stratified
``test_fraction`` of each class becomes the test set (seeded).  Images are read with Pillow (PNG, JPEG,
BMP, GIF, ...), converted to RGB (or grey: ``grayscale``), resized to ``size`` x ``size`` if ``size > 0``
(else they must all have one size), and scaled to [0, 1].  Classes are numbered in sorted name order.

``npz``: ``data_dir`` is a ``.npz`` file (``numpy.savez``) holding ``x`` (images ``(n, h, w)``,
``(n, c, h, w)`` or ``(n, h, w, c)`` with c in 1, 3, 4, or feature vectors ``(n, d)``), integer labels
``y`` ``(n,)`` and optionally ``client`` ``(n,)``: the natural owner of each sample (use the ``natural``
partitioner with ``num_clients = 0``).  uint8 inputs are divided by 255.  Per client (or per class without
``client``) a ``test_fraction`` of the samples becomes the test set.  Loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.checks import check_fraction, check_int, split_counts
from hetfl.data.registry import DATASETS
from hetfl.errors import DataError

__all__ = ["image_folder", "npz"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
FOLDER_LAYOUT = ("DIR/<class>/<image> (one sub-folder per class), or DIR/train/<class>/<image> and "
                 "DIR/test/<class>/<image> with the same classes")


def _seeded_split(keys: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A test mask taking a seeded ``test_fraction`` of each key's samples (at least one left on each side)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(keys), dtype=bool)
    for k in np.unique(keys):
        idx = np.flatnonzero(keys == k)
        mask[rng.permutation(idx)[: split_counts(len(idx), test_fraction)]] = True
    return mask


def data_folder(data_dir: str | None, dataset: str, layout: str, what: str = "") -> Path:
    """``data.data_dir`` as an existing folder, or a :class:`DataError` that shows the expected layout."""
    if data_dir is None:
        raise DataError(f"dataset {dataset} reads data.data_dir, which is not set; layout: {layout}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{what}{root} does not exist or is not a folder; layout: {layout}")
    return root


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_images(folder: Path, classes: list[str], size: int, grayscale: bool) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 (optional: Pillow comes with matplotlib)

    xs, ys, shapes = [], [], set()
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"image folder {folder}: class folder {name}/ holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add images")
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert("L" if grayscale else "RGB")
                    if size:
                        im = im.resize((size, size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{path} is not a readable image: {e}") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            shapes.add(arr.shape)
            xs.append(arr)
            ys.append(label)
    if len(shapes) > 1:
        raise DataError(f"image folder {folder}: images have different sizes {sorted(shapes)[:4]}; set "
                        "data.size = N to resize them all to N x N")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


@DATASETS.register("image_folder")
def image_folder(*, data_dir: str | None = None, seed: int = 0, test_fraction: float = 0.2, size: int = 0,
                 grayscale: bool = False) -> Dataset:
    """Your images, one sub-folder per class (optionally under ``train/`` and ``test/``)."""
    test_fraction = check_fraction("test_fraction", test_fraction)
    size = check_int("size", size, 0)
    root = data_folder(data_dir, "image_folder", FOLDER_LAYOUT, what="image folder ")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split else root
    classes = [p.name for p in _class_folders(train_root)]
    if not classes:
        raise DataError(f"image folder {train_root} has no class sub-folders; layout: {FOLDER_LAYOUT}")
    if split:
        test_classes = [p.name for p in _class_folders(root / "test")]
        if test_classes != classes:
            raise DataError(f"image folder {root}: train/ has classes {classes} but test/ has {test_classes}")
        x_tr, y_tr = _read_images(root / "train", classes, size, grayscale)
        x_te, y_te = _read_images(root / "test", classes, size, grayscale)
    else:
        x, y = _read_images(root, classes, size, grayscale)
        te = _seeded_split(y, test_fraction, seed)
        x_tr, y_tr, x_te, y_te = x[~te], y[~te], x[te], y[te]

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / np.float32(255.0))

    return Dataset(
        name="image_folder",
        train=Split(images(x_tr), torch.from_numpy(y_tr)),
        test=Split(images(x_te), torch.from_numpy(y_te)),
        info=DataInfo(input_shape=tuple(x_tr.shape[1:]), num_classes=len(classes)),
        notes={"source": str(root), "classes": classes, "sizes": {"train": len(y_tr), "test": len(y_te)},
               "split": "train/ and test/ folders" if split else f"stratified, test_fraction={test_fraction}"},
    )


def _as_inputs(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype.kind not in "uif" or x.ndim < 2:
        raise DataError(f"{path}: x must be a numeric array (n, ...) , got {x.dtype} {x.shape}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # channels last -> first
    out = x.astype(np.float32)
    if x.dtype == np.uint8:
        out /= np.float32(255.0)  # in place: no second float32 copy of the whole array
    return out


@DATASETS.register("npz")
def npz(*, data_dir: str | None = None, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Your arrays in a ``.npz`` (``x``, ``y``, optional ``client`` for natural clients)."""
    test_fraction = check_fraction("test_fraction", test_fraction)
    if data_dir is None:
        raise DataError("dataset npz reads the .npz file named by data.data_dir, which is not set")
    path = Path(data_dir).expanduser()
    if not path.is_file():
        raise DataError(f"{path} is not a file; dataset npz reads a .npz file with arrays x, y (and client)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataError(f"{path} has no array {' or '.join(missing)} (it holds {', '.join(z.files)}); "
                                "expected x, y and optionally client")
            x, y = z["x"], z["y"]
            client = z["client"] if "client" in z.files else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        # numpy's own text would advise loading it "unsafely" with allow_pickle: never pass that on
        reason = "holds pickled objects, which hetfl does not load" if "pickle" in str(e) else type(e).__name__
        raise DataError(f"{path} is not a readable .npz of plain arrays ({reason}); write it with "
                        "numpy.savez(path, x=..., y=...)") from None
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}; they must match")
    if client is not None and len(client) != len(y):
        raise DataError(f"{path}: client has {len(client)} entries but y has {len(y)}; they must match")
    if y.ndim != 1 or y.dtype.kind not in "ui" or (len(y) and y.min() < 0):
        raise DataError(f"{path}: y must be non-negative integer labels (n,), got {y.dtype} {y.shape}")
    inputs = _as_inputs(x, path)
    labels = y.astype(np.int64)
    groups, names = None, None
    if client is not None:
        names_arr, groups = np.unique(client, return_inverse=True)
        names = tuple(str(c) for c in names_arr)
    te = _seeded_split(groups if groups is not None else labels, test_fraction, seed)
    return Dataset(
        name="npz",
        train=Split(torch.from_numpy(inputs[~te]), torch.from_numpy(labels[~te])),
        test=Split(torch.from_numpy(inputs[te]), torch.from_numpy(labels[te])),
        info=DataInfo(input_shape=tuple(inputs.shape[1:]), num_classes=int(labels.max()) + 1 if len(labels) else 0),
        groups=None if groups is None else groups[~te].astype(np.int64),
        group_names=names,
        notes={"source": str(path), "sizes": {"train": int((~te).sum()), "test": int(te.sum())},
               "split": f"per {'client' if client is not None else 'class'}, test_fraction={test_fraction}"},
    )
