"""Helpers shared by the dataset tests (the `isolated` cache fixture is in conftest.py)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

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
