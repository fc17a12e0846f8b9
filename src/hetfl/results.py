"""The run directory: resolved config, metrics.jsonl, summary.json and an atomic checkpoint.

Layout::

    RUN_DIR/
      config.toml       the resolved config (every default written out); `hetfl run --resume` reads it
      partition.json    partition summary (client sizes, label histogram, skew statistics)
      metrics.jsonl     one JSON object per round, appended and fsync'ed line by line
      checkpoint.pt     server state + round + timings, replaced atomically (temp file + rename)
      summary.json      written when the run ends: status, rounds_completed, accuracies, wall time

A run is *complete* exactly when summary.json says ``"status": "complete"``.  A crash leaves at most
the rounds since the last checkpoint to redo; ``--resume`` truncates metrics.jsonl to the
checkpointed round, so a resumed run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from hetfl.errors import HetflError

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
PARTITION = "partition.json"
CHECKPOINT_FORMAT = 1

#: Fields that measure time: they differ between otherwise identical runs.
TIMING_KEYS = frozenset({"time_s", "round_time_s", "train_time_s", "eval_time_s", "wall_time_s",
                         "server_time_s"})


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {obj!r}")


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(v) is int for v in value):  # per-client integer arrays: nothing to clean, skip the walk
            return value
        return [_clean(v) for v in value]
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """``indent=None`` writes one line with json's C encoder (fast for per-client arrays)."""
    atomic_write_text(path, json.dumps(_clean(obj), indent=indent, default=_json_default) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete line of metrics.jsonl (a torn last line, from a crash, is ignored)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class RunDir:
    """Writes one run's files.  Create with :meth:`create` (new run) or :meth:`open` (resume)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: str | Path, config_toml: str) -> RunDir:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise HetflError(f"output path {str(path)!r} is a file, not a directory; choose another --out")
        try:  # a crash inside an earlier create() may have left only its probe or temp file: that is empty
            kept = [p for p in path.iterdir() if p.name != ".write-test" and not
                    (p.name.startswith(".") and p.name.endswith(".tmp"))] if path.exists() else []
        except OSError as exc:
            raise HetflError(f"cannot read output directory {str(path)!r}: {exc.strerror or exc}") from None
        if kept:
            raise HetflError(
                f"output directory {str(path)!r} already exists and is not empty; choose another --out, "
                f"or continue it with `hetfl run --resume {path}`"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise HetflError(f"cannot write to output directory {str(path)!r}: {exc.strerror or exc}") from None
        run = cls(path)
        atomic_write_text(path / CONFIG, config_toml)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise HetflError(f"{str(path)!r} is not a hetfl run directory (no {CONFIG}); nothing to resume")
        for stale in path.glob(".*.tmp"):  # temp files of atomic writes interrupted by a crash
            stale.unlink(missing_ok=True)
        return cls(path)

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one line with a single write, then fsync: a crash never leaves a torn line behind
        except possibly the last, which :func:`read_metrics` and :meth:`truncate_metrics` drop."""
        data = (json.dumps(_clean(row), default=_json_default, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self.path / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:  # one write(2) for the whole line (a buffered file may split long lines)
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate_metrics(self, last_round: int) -> None:
        rows = [r for r in read_metrics(self.path) if r.get("round", 0) <= last_round]
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
        atomic_write_text(self.path / METRICS, text)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        import io

        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, buf)
        atomic_write_bytes(self.path / CHECKPOINT, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
            # hetfl writes checkpoints atomically, so this file was damaged or replaced from outside
            raise HetflError(f"checkpoint {str(path)!r} is unreadable (not a complete torch checkpoint: "
                             f"{type(exc).__name__}); the run cannot be resumed from it") from None
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise HetflError(f"checkpoint {str(path)!r} has format {ckpt.get('format')!r}, "
                             f"this hetfl reads format {CHECKPOINT_FORMAT}")
        return ckpt

    # ------------------------------------------------------------------ other files
    def write_json(self, name: str, obj: Any) -> None:
        # partition.json holds per-client arrays (sizes, label histogram: clients x classes); indented, a
        # 100 000-client fleet took 3 s and 10 MB through the pure-Python encoder, one line takes 0.2 s
        write_json(self.path / name, obj, indent=None if name == PARTITION else 2)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json(SUMMARY, summary)

    def summary(self) -> dict[str, Any] | None:
        return read_summary(self.path)


def inert_keys(cfg: Any) -> dict[str, str]:
    """Keys of a resolved config that change nothing in this run, with why (``"section.key" -> reason``; a
    whole section as ``"[section]" -> reason``)."""
    out: dict[str, str] = {}
    source = cfg.fleet.source
    if source == "uniform":
        for key in ("mix", "assignment"):
            out[f"fleet.{key}"] = 'fleet.source = "uniform": every client trains the full model'
    if source != "phones":
        out["fleet.budget_quantile"] = 'used only with fleet.source = "phones"'
    if cfg.data.local_test_fraction == 0:
        for key in ("local", "local_clients"):
            out[f"eval.{key}"] = "data.local_test_fraction = 0: clients hold no local test split"
    from hetfl.catalog import ALGORITHMS

    entry = ALGORITHMS.get(cfg.algorithm.name) if cfg.algorithm.name in ALGORITHMS else None
    if entry is not None and hasattr(entry, "placer"):  # a server algorithm; whole sections: "[section]" -> why
        out["[graph]"] = f"used only by decentralized algorithms (dkd, dpsgd, ...), not {cfg.algorithm.name}"
    if not cfg.privacy.active:
        out["[privacy]"] = "off: no clip, noise_multiplier or target_epsilon"
    return out


def config_text(cfg: Any) -> str:
    """The resolved config as written to a run's config.toml: every key, those that do nothing in this run
    marked ``# inert: why`` (a comment: the file reads back to the same config)."""
    inert = inert_keys(cfg)
    lines, section = [], ""
    for line in cfg.to_toml().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            if inert.get(line):  # a whole section that does nothing in this run: marked on its header
                line = f"{line}  # inert: {inert[line]}"
        elif " = " in line:
            key = line.split(" = ", 1)[0]
            why = inert.get(f"{section}.{key}" if section else key)
            if why:
                line = f"{line}  # inert: {why}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def strip_timing(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics rows without the wall-clock fields (what must match between identical runs)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
