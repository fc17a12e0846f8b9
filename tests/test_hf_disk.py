"""``hf_disk``: Hugging Face ``save_to_disk`` folders, built here with pyarrow in the format ``datasets`` writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.ipc  # noqa: E402, F401 (pa.ipc below)

from hetfl.data.datasets import load_dataset  # noqa: E402
from hetfl.errors import ConfigError, DataError  # noqa: E402
from hetfl.resolve import load_config  # noqa: E402
from hetfl.runner import prepare  # noqa: E402

CLASSES = ["tshirt", "trouser", "bag"]


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _save(folder: Path, columns: dict, features: dict, *, shards: int = 1, stream: bool = True) -> None:
    """One Dataset folder as ``Dataset.save_to_disk`` writes it: Arrow stream shards, state.json, dataset_info.json."""
    folder.mkdir(parents=True)
    table = pa.table(columns)
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    n = len(table)
    files = []
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        part = table.slice(i * n // shards, (i + 1) * n // shards - i * n // shards)
        with pa.OSFile(str(folder / name), "wb") as sink:
            writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
            writer.write_table(part)
            writer.close()
        files.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "0", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": features, "citation": ""}))


def _images(n: int, seed: int, rgb: bool = False) -> tuple[list[dict], np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    arrays = [rng.integers(0, 256, (8, 8, 3) if rgb else (8, 8), dtype=np.uint8) for _ in range(n)]
    return [{"bytes": _png(a), "path": None} for a in arrays], labels, arrays


IMAGE_FEATURES = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}


def _image_dict(root: Path, rgb: bool = False) -> Path:
    root.mkdir()
    for split, n, seed in (("train", 12, 0), ("test", 6, 1)):
        cells, labels, _ = _images(n, seed, rgb)
        _save(root / split, {"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                             "label": pa.array(labels, pa.int64())},
              IMAGE_FEATURES, shards=2 if split == "train" else 1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    return root


def test_dataset_dict_of_png_images(tmp_path: Path) -> None:
    root = _image_dict(tmp_path / "hf")
    ds = load_dataset("hf_disk", data_dir=str(root))
    assert ds.info.input_shape == (1, 8, 8) and ds.info.num_classes == 3
    assert len(ds.train) == 12 and len(ds.test) == 6
    _, _, arrays = _images(12, 0)
    np.testing.assert_allclose(ds.train.x[5, 0].numpy(), arrays[5] / 255.0, rtol=0, atol=1e-7)
    assert ds.train.y.tolist() == (np.arange(12) % 3).tolist()
    assert ds.notes["classes"] == CLASSES


def test_rgb_images_resize_and_grayscale(tmp_path: Path) -> None:
    root = _image_dict(tmp_path / "hf", rgb=True)
    assert load_dataset("hf_disk", data_dir=str(root)).info.input_shape == (3, 8, 8)
    assert load_dataset("hf_disk", data_dir=str(root), grayscale=True, size=4).info.input_shape == (1, 4, 4)


def test_single_dataset_of_arrays_with_clients_runs_natural(tmp_path: Path) -> None:
    """A plain Dataset folder (no dict) of Array2D uint8 inputs, string labels and a writer column."""
    n, rng = 40, np.random.default_rng(3)
    x = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
    writers = [f"w{i % 4}" for i in range(n)]
    labels = [CLASSES[i % 3] for i in range(n)]
    column = pa.array(x.tolist(), pa.list_(pa.list_(pa.uint8())))
    _save(tmp_path / "ds", {"pixels": column, "category": pa.array(labels), "writer": pa.array(writers)},
          {"pixels": {"shape": [6, 6], "dtype": "uint8", "_type": "Array2D"}, "category": {"dtype": "string",
           "_type": "Value"}, "writer": {"dtype": "string", "_type": "Value"}}, stream=False)
    ds = load_dataset("hf_disk", data_dir=str(tmp_path / "ds"), image_column="pixels", label_column="category",
                      client_column="writer", test_fraction=0.25)
    assert ds.info.input_shape == (1, 6, 6) and ds.info.num_classes == 3
    assert len(ds.train) == 32 and len(ds.test) == 8  # round(25 % of each writer's 10 samples) = 2
    assert ds.group_names == ("w0", "w1", "w2", "w3") and len(ds.groups) == len(ds.train)
    assert ds.notes["classes"] == sorted(CLASSES)
    assert float(ds.train.x.max()) <= 1.0 and ds.train.x.dtype.is_floating_point
    again = load_dataset("hf_disk", data_dir=str(tmp_path / "ds"), image_column="pixels", label_column="category",
                         client_column="writer", test_fraction=0.25)
    assert np.array_equal(again.train.x.numpy(), ds.train.x.numpy())  # the carve-out is seeded
    cfg = load_config(None, [f'data={{name="hf_disk", data_dir="{tmp_path / "ds"}", num_clients=0, '
                             'image_column="pixels", label_column="category", client_column="writer", '
                             'partition={name="natural"}}', 'model={name="mlp"}', "rounds=1"])
    assert prepare(cfg).federation.num_clients == 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"train_split": "training"}, "data.train_split = 'training': .* has splits train, test"),
    ({"test_split": "validation"}, "data.test_split = 'validation': .* has splits train, test; set data.test_split"),
    ({"image_column": "img"}, "data.image_column = 'img': .* has no such column \\(it has image, label\\)"),
    ({"label_column": "fine_label"}, "data.label_column = 'fine_label': .* has no such column"),
])
def test_bad_names_list_what_is_there(tmp_path: Path, kwargs: dict, message: str) -> None:
    root = _image_dict(tmp_path / "hf")
    with pytest.raises(DataError, match=message):
        load_dataset("hf_disk", data_dir=str(root), **kwargs)


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.data_dir, which is not set"):
        load_dataset("hf_disk")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("hf_disk", data_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a folder written by save_to_disk"):
        load_dataset("hf_disk", data_dir=str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (bad / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="is not an Arrow IPC stream or file"):
        load_dataset("hf_disk", data_dir=str(bad))
    with pytest.raises(ConfigError, match="data.test_fraction must be in"):
        load_dataset("hf_disk", data_dir=str(bad), test_fraction=1.5)


def test_text_column_is_refused_with_its_type(tmp_path: Path) -> None:
    _save(tmp_path / "txt", {"text": pa.array(["a", "b", "c", "d"]), "label": pa.array([0, 1, 0, 1])},
          {"text": {"dtype": "string", "_type": "Value"}, "label": {"dtype": "int64", "_type": "Value"}})
    with pytest.raises(DataError, match="neither an Image nor an array of numbers \\(innermost type string"):
        load_dataset("hf_disk", data_dir=str(tmp_path / "txt"), image_column="text")


def test_missing_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _image_dict(tmp_path / "hf")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"pyarrow, which is not installed; pip install -e '.\[hf\]'"):
        load_dataset("hf_disk", data_dir=str(root))
