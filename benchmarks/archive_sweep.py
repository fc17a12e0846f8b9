"""Carry a long sweep from one machine to the next: archive its complete cells, restore them, resume.

A study of many CPU-hours outlives one machine here.  ``hetfl sweep`` skips a cell whose run directory holds
the study's config and a complete summary, so the complete cells are all a later machine needs:

    python benchmarks/archive_sweep.py pack sweeps/crossover-g8 benchmarks/results/cells/crossover-g8.tar.gz
    python benchmarks/archive_sweep.py unpack benchmarks/results/cells/crossover-g8.tar.gz sweeps
    hetfl sweep configs/study_crossover_g8.toml --out sweeps/crossover-g8      # runs only what is missing

``pack`` keeps, per complete cell, what the results table is built from (config.toml, summary.json,
metrics.jsonl, partition.json; no checkpoints) plus the sweep's study.toml and results.csv, compressed; cells
that are still running or failed are left out (they rerun from the start).  ``unpack`` refuses to overwrite
a cell directory that already exists.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

KEEP = ("config.toml", "summary.json", "metrics.jsonl", "partition.json")
TOP = ("study.toml", "results.csv")


def complete(cell: Path) -> bool:
    try:
        summary = json.loads((cell / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return summary.get("status") == "complete" and all((cell / name).is_file() for name in KEEP)


def pack(sweep: Path, dest: Path) -> int:
    if not (sweep / "study.toml").is_file():
        sys.exit(f"{sweep}: not a sweep directory (no study.toml)")
    cells = sorted(c for c in (sweep / "cells").iterdir() if c.is_dir()) if (sweep / "cells").is_dir() else []
    done = [c for c in cells if complete(c)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in TOP:
            if (sweep / name).is_file():
                tar.add(sweep / name, arcname=f"{sweep.name}/{name}")
        for c in done:
            for name in KEEP:
                tar.add(c / name, arcname=f"{sweep.name}/cells/{c.name}/{name}")
    tmp.replace(dest)  # never a half-written archive under the final name
    print(f"{dest}: {len(done)} complete cells of {len(cells)} ({dest.stat().st_size / 1e6:.1f} MB)")
    return len(done)


def unpack(archive: Path, into: Path) -> int:
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts or not m.isfile():
                sys.exit(f"{archive}: unexpected member {m.name!r}")
        cells = {Path(m.name).parts[2] for m in members if len(Path(m.name).parts) == 4}
        root = {Path(m.name).parts[0] for m in members}
        clash = [c for r in root for c in cells if (into / r / "cells" / c).exists()]
        if clash:
            sys.exit(f"{into}: cell directories already exist ({', '.join(sorted(clash)[:3])}...); unpack elsewhere")
        for m in members:
            target = into / m.name
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(m)
            assert data is not None
            target.write_bytes(io.BytesIO(data.read()).getvalue())
    print(f"{into}: {len(cells)} complete cells restored")
    return len(cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="archive a sweep's complete cells")
    p.add_argument("sweep", type=Path)
    p.add_argument("archive", type=Path)
    u = sub.add_parser("unpack", help="restore an archive into a sweeps folder")
    u.add_argument("archive", type=Path)
    u.add_argument("into", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.sweep, args.archive)
    else:
        unpack(args.archive, args.into)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
