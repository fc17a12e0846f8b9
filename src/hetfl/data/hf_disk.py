"""A Hugging Face dataset written with ``save_to_disk``, read with pyarrow alone (no ``datasets`` package).

What ``datasets.Dataset.save_to_disk(DIR)`` writes, and what this module reads:

* a **Dataset** folder: ``state.json`` (its ``_data_files`` list the shards, ``data-00000-of-0000N.arrow``),
  ``dataset_info.json`` (its ``features`` describe the columns) and the shards, Arrow IPC *stream* files
  (an IPC *file* is accepted too);
* a **DatasetDict** folder (``DatasetDict.save_to_disk``): ``dataset_dict.json`` (``{"splits": [...]}``) and
  one Dataset folder per split.

Columns: the inputs (``image_column``) are an ``Image`` feature (a struct of encoded ``bytes`` and a
``path``; decoded with Pillow, converted to grey when every image is grey or when ``grayscale``, else to
RGB, resized to ``size`` x ``size`` when ``size > 0``) or a numeric array column (``Array2D``/``Array3D``,
nested ``Sequence``s, or a fixed-length list of numbers for feature vectors), laid out like the ``npz``
source's ``x``.  uint8 pixels are divided by 255.  Labels (``label_column``) are a ``ClassLabel`` (its
``names`` name the classes), integers, or strings (numbered in sorted order).  ``client_column`` names a
column whose value is each sample's natural owner (a writer, a user) for the ``natural`` partitioner.

Splits: ``train_split`` and ``test_split`` of a DatasetDict; ``test_split = ""`` (or a plain Dataset
folder) carves a seeded ``test_fraction`` of each class (of each client, with ``client_column``) out of the
training split, as ``npz`` does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.checks import check_fraction, check_int
from hetfl.data.registry import DATASETS
from hetfl.data.user import _as_inputs, _seeded_split, data_folder
from hetfl.errors import DataError

__all__ = ["hf_disk"]

LAYOUT = ("DIR/dataset_dict.json + DIR/<split>/ (DatasetDict.save_to_disk) or DIR/state.json + "
          "DIR/data-*.arrow (Dataset.save_to_disk)")


def _pyarrow():
    try:
        import pyarrow as pa  # noqa: PLC0415 (optional: the [hf] extra)
        import pyarrow.ipc  # noqa: F401, PLC0415
    except ImportError:
        raise DataError("dataset hf_disk reads Arrow files with pyarrow, which is not installed; "
                        "pip install -e '.[hf]' (or pip install pyarrow)") from None
    return pa


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({type(e).__name__}: {e}); {LAYOUT}") from None


def _read_table(folder: Path):
    """The Arrow table of one saved Dataset folder (all shards, in order) and its features (or {})."""
    pa = _pyarrow()
    state_path = folder / "state.json"
    if state_path.is_file():
        state = _json(state_path)
        files = [folder / f["filename"] for f in state.get("_data_files", []) if isinstance(f, dict)
                 and "filename" in f]
    else:
        files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise DataError(f"{folder} holds no Arrow shards (state.json lists none and there is no data-*.arrow); "
                        f"layout: {LAYOUT}")
    tables = []
    for path in files:
        if not path.is_file():
            raise DataError(f"{path} is listed in {state_path} but does not exist")
        tables.append(_read_arrow(pa, path))
    try:
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as e:
        raise DataError(f"{folder}: its shards have different columns ({e})") from None
    features: dict = {}
    info_path = folder / "dataset_info.json"
    if info_path.is_file():
        features = _json(info_path).get("features") or {}
    elif table.schema.metadata and b"huggingface" in table.schema.metadata:
        meta = json.loads(table.schema.metadata[b"huggingface"])
        features = (meta.get("info") or {}).get("features") or {}
    return table, features


def _read_arrow(pa, path: Path):
    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not an Arrow IPC stream or file ({e})") from None


def _column(table, name: str, key: str, folder: Path):
    if name not in table.column_names:
        raise DataError(f"data.{key} = {name!r}: {folder} has no such column (it has "
                        f"{', '.join(table.column_names)})")
    return table.column(name).combine_chunks()


def _decode_images(column, folder: Path, size: int, grayscale: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 (Pillow comes with matplotlib)

    opened = []
    for i, cell in enumerate(column.to_pylist()):
        cell = cell or {}
        data, path = cell.get("bytes"), cell.get("path")
        try:
            if data is not None:
                im = Image.open(io.BytesIO(data))
            elif path:
                p = Path(path) if Path(path).is_absolute() else folder / path
                im = Image.open(p)
            else:
                raise DataError(f"{folder}: image {i} has neither bytes nor a path")
            im.load()
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{folder}: image {i} is not a readable image ({e})") from None
        opened.append(im)
    grey = grayscale or all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in opened)
    arrays, shapes = [], set()
    for im in opened:
        im = im.convert("L" if grey else "RGB")
        if size:
            im = im.resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        shapes.add(arr.shape)
        arrays.append(arr)
    if len(shapes) > 1:
        raise DataError(f"{folder}: images have different sizes {sorted(shapes)[:4]}; set data.size = N to resize "
                        "them all to N x N")
    if not arrays:
        return np.zeros((0, 1, 1, 1), dtype=np.uint8)
    return np.stack(arrays)


def _nested_numpy(pa, arr, name: str, folder: Path) -> np.ndarray:
    """A (nested) list column of numbers as one array ``(n, d1, d2, ...)``, keeping its dtype."""
    n, dims = len(arr), []
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise DataError(f"data.image_column = {name!r}: {folder} has missing values in its inputs")
        if pa.types.is_fixed_size_list(arr.type):
            width = arr.type.list_size
        else:
            lengths = np.asarray(arr.value_lengths())
            if len(lengths) and (lengths != lengths[0]).any():
                raise DataError(f"data.image_column = {name!r}: {folder} rows have different shapes "
                                f"({sorted(set(lengths.tolist()))[:4]} entries at one level); hetfl needs one "
                                "input shape")
            width = int(lengths[0]) if len(lengths) else 0
        dims.append(width)
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)) or arr.null_count:
        raise DataError(f"data.image_column = {name!r}: {folder} column is neither an Image nor an array of numbers "
                        f"(innermost type {arr.type}{', with missing values' if arr.null_count else ''})")
    return arr.to_numpy(zero_copy_only=False).reshape(n, *dims)


def _inputs(table, name: str, features: dict, folder: Path, size: int, grayscale: bool) -> np.ndarray:
    column = _column(table, name, "image_column", folder)
    feature = features.get(name) or {}
    kind = feature.get("_type") if isinstance(feature, dict) else None
    pa = _pyarrow()
    storage = column.storage if isinstance(column, pa.ExtensionArray) else column
    if kind == "Image" or (pa.types.is_struct(storage.type) and storage.type.get_field_index("bytes") >= 0):
        x = _decode_images(storage, folder, size, grayscale)
    else:
        x = _nested_numpy(pa, storage, name, folder)
    return x


def _labels(table, name: str, features: dict, folder: Path, names: list[str] | None) -> tuple[np.ndarray, list]:
    column = _column(table, name, "label_column", folder)
    feature = features.get(name) if isinstance(features.get(name), dict) else {}
    values = column.to_pylist()
    if any(v is None for v in values):
        raise DataError(f"data.label_column = {name!r}: {folder} has rows without a label")
    if feature.get("_type") == "ClassLabel" or all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        y = np.asarray(values, dtype=np.int64)
        if len(y) and y.min() < 0:
            raise DataError(f"data.label_column = {name!r}: {folder} has negative labels (min {y.min()})")
        return y, list(feature.get("names") or names or [])
    if all(isinstance(v, str) for v in values):
        classes = names or sorted(set(values))
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise DataError(f"data.label_column = {name!r}: {folder} has labels {unknown[:5]} absent from the "
                            "training split")
        return np.asarray([lookup[v] for v in values], dtype=np.int64), classes
    raise DataError(f"data.label_column = {name!r}: {folder} column of type {column.type} is not a ClassLabel, "
                    "integers or strings")


def _load_split(folder: Path, p: dict, names: list[str] | None):
    table, features = _read_table(folder)
    x = _as_inputs(_inputs(table, p["image_column"], features, folder, p["size"], p["grayscale"]), folder)
    y, classes = _labels(table, p["label_column"], features, folder, names)
    client = None
    if p["client_column"]:
        client = np.asarray([str(v) for v in _column(table, p["client_column"], "client_column", folder).to_pylist()])
    return x, y, classes, client


@DATASETS.register("hf_disk")
def hf_disk(*, data_dir: str | None = None, seed: int = 0, image_column: str = "image", label_column: str = "label",
            client_column: str = "", train_split: str = "train", test_split: str = "test",
            test_fraction: float = 0.2, size: int = 0, grayscale: bool = False) -> Dataset:
    """A Hugging Face dataset saved with ``save_to_disk`` (images or arrays, class labels, optional owners)."""
    test_fraction = check_fraction("test_fraction", test_fraction)
    size = check_int("size", size, 0)
    root = data_folder(data_dir, "hf_disk", LAYOUT)
    p = {"image_column": image_column, "label_column": label_column, "client_column": client_column,
         "size": size, "grayscale": grayscale}
    if (root / "dataset_dict.json").is_file():
        splits = [str(s) for s in _json(root / "dataset_dict.json").get("splits", [])]
        for key, split in (("train_split", train_split), ("test_split", test_split)):
            if split and split not in splits:
                raise DataError(f"data.{key} = {split!r}: {root} has splits {', '.join(splits) or '(none)'}"
                                + ("; set data.test_split = \"\" to carve a test set out of the training split"
                                   if key == "test_split" else ""))
        train_dir, test_dir = root / train_split, (root / test_split if test_split else None)
    elif (root / "state.json").is_file() or any(root.glob("data-*.arrow")):
        train_dir, test_dir = root, None
    else:
        raise DataError(f"{root} is not a folder written by save_to_disk (no dataset_dict.json or state.json); "
                        f"layout: {LAYOUT}")
    x_tr, y_tr, classes, client = _load_split(train_dir, p, None)
    if test_dir is not None:
        x_te, y_te, _, _ = _load_split(test_dir, p, classes or None)
        if x_te.shape[1:] != x_tr.shape[1:]:
            raise DataError(f"{root}: test inputs have shape {x_te.shape[1:]} but training inputs "
                            f"{x_tr.shape[1:]}; set data.size = N to resize images to N x N")
        how = f"splits {train_split!r} / {test_split!r}"
    else:
        keys = client if client is not None else y_tr
        te = _seeded_split(np.unique(keys, return_inverse=True)[1], test_fraction, seed)
        x_tr, y_tr, x_te, y_te = x_tr[~te], y_tr[~te], x_tr[te], y_tr[te]
        client = None if client is None else client[~te]
        how = f"per {'client' if client is not None else 'class'} from {train_dir.name}, test_fraction={test_fraction}"
    groups, group_names = None, None
    if client is not None:
        names_arr, groups = np.unique(client, return_inverse=True)
        group_names = tuple(str(c) for c in names_arr)
    num_classes = max(len(classes), int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1)
    return Dataset(
        name="hf_disk",
        train=Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        test=Split(torch.from_numpy(x_te), torch.from_numpy(y_te)),
        info=DataInfo(input_shape=tuple(x_tr.shape[1:]), num_classes=num_classes),
        groups=None if groups is None else groups.astype(np.int64),
        group_names=group_names,
        notes={"source": str(root), "classes": classes, "sizes": {"train": len(y_tr), "test": len(y_te)},
               "split": how},
    )
