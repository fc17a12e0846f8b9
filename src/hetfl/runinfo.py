"""One run directory as ``hetfl plot`` and ``hetfl summary`` read it: its resolved config, metrics and summary,
what tells it apart from the other runs shown with it, and the heterogeneous curves its metrics hold.

The names of those curves are the evaluator's (:mod:`hetfl.evaluation`): ``test_accuracy.w<width>`` (the global
model cut to one width, on the common test set), ``tier_acc.<label>`` (each tier's model on its own clients'
held-out data; ``global`` is the full model's tier), ``deployed_accuracy`` (every client's own model) and
``smallest_accuracy``; ``tier.<label>.flops`` / ``bytes_up`` / ``bytes_down`` are the round's costs per tier.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetfl.errors import HetflError
from hetfl.results import CONFIG, read_metrics, read_summary

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Config keys that never tell runs apart in a legend (where or how fast a run ran, not what it is).
NOT_IDENTITY = ("name", "device", "workers", "threads_per_worker", "worker_timeout_s", "batched", "checkpoint_every",
                "data.data_dir", "data.verify", "engine", "train.memory_format", "graph.processes", "graph.timeout_s")

#: Keys shown as their bare value in a legend ("fjord", not "algorithm.name=fjord").
BARE = ("algorithm.name", "model.name", "data.name")


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config, flattened: "section.key" -> value

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("test_accuracy") is not None]

    @property
    def last_eval(self) -> dict[str, Any]:
        evals = self.evals
        return evals[-1] if evals else {}

    @property
    def name(self) -> str:
        return str(self.summary.get("name") or self.config.get("name") or self.path.name)

    def fleet(self) -> str:
        source = self.config.get("fleet.source", "uniform")
        if source == "tiers":
            return f"tiers {self.config.get('fleet.mix', '')}".strip()
        return str(source)

    def epsilon(self) -> float | None | str:
        """Epsilon of a private run (``None``: no guarantee, i.e. infinite); ``""`` for a run without [privacy]."""
        privacy = self.summary.get("privacy")
        if privacy:
            return privacy.get("epsilon")
        for r in reversed(self.rows):
            if "privacy.epsilon" in r:
                return r["privacy.epsilon"]
        return ""

    def width_curves(self) -> list[tuple[str, str]]:
        """``(label, metric)`` of the global model cut to each width, widest first."""
        keys = {k for r in self.evals for k in r if k.startswith("test_accuracy.w")}
        return [(f"width {k[len('test_accuracy.w'):]}", k) for k in sorted(keys, key=_width_of, reverse=True)]

    def tier_curves(self) -> list[tuple[str, str]]:
        """``(label, metric)`` of each tier's model on its own clients' data, strongest tier first."""
        keys = {k for r in self.evals for k in r if k.startswith("tier_acc.")}
        return [(f"tier of width {_tier_width(k)}", k) for k in sorted(keys, key=_width_of, reverse=True)]

    def tier_accuracies(self) -> dict[str, float]:
        """The last evaluation's accuracy of every tier's model on its clients' data: ``{"w0.5": acc}``."""
        last = self.last_eval
        return {f"w{_tier_width(key)}": last[key] for _, key in self.tier_curves() if key in last}


def _tier_width(key: str) -> str:
    label = key[len("tier_acc."):]
    return "1" if label == "global" else label.removeprefix("w")


def _width_of(key: str) -> float:
    tail = key.rsplit(".", 1)[-1] if "." in key else key
    m = re.search(r"w?([0-9.]+)$", key.split(".", 1)[-1])
    if tail == "global" or key.endswith(".global"):
        return 2.0
    try:
        return float(m.group(1)) if m else 0.0
    except ValueError:
        return 0.0


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def load_run(path: str | Path, *, need_metrics: bool = True) -> Run:
    path = Path(path)
    rows = read_metrics(path) if path.is_dir() else []
    if need_metrics and not rows:
        raise HetflError(f"{str(path)!r} is not a hetfl run directory with metrics (no metrics.jsonl rows)")
    config: dict[str, Any] = {}
    with suppress(OSError, tomllib.TOMLDecodeError):  # a run without a readable config.toml still plots
        config = _flatten(tomllib.loads((path / CONFIG).read_text()))
    return Run(path, rows, read_summary(path) or {}, config)


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    return [load_run(d) for d in dirs]


def differences(runs: Sequence[Run]) -> list[str]:
    """The config keys whose values differ between the runs (what a legend must show), in config order."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    return [k for k in keys if k not in NOT_IDENTITY and len({repr(r.config.get(k)) for r in runs}) > 1]


def _short(key: str, value: Any) -> str:
    if key in BARE:
        return str(value)
    if key == "seed":
        return f"seed {value}"
    name = key.split(".", 1)[-1] if key.startswith(("algorithm.", "data.partition.", "fleet.", "model.")) else key
    return f"{name}={'-' if value is None else value}"


def legends(runs: Sequence[Run]) -> list[str]:
    """One label per run from what differs between them (algorithm, seed, any key a --set changed); a single
    run, or runs whose configs are the same, by name (then directory)."""
    diff = differences(runs)
    if not diff:
        names = [r.name for r in runs]
        return names if len(set(names)) == len(names) else [str(r.path) for r in runs]
    labels = [", ".join(_short(k, r.config.get(k)) for k in diff[:4]) + (" …" if len(diff) > 4 else "") for r in runs]
    return labels if len(set(labels)) == len(labels) else [f"{lb} ({r.path.name})" for lb, r in zip(labels, runs)]


def common_title(runs: Sequence[Run]) -> str:
    """What the runs share: dataset, model, partition, clients and fleet (what differs is in the legend)."""
    diff = set(differences(runs))
    first = runs[0].config
    parts = []
    for key, fmt in (("data.name", "{}"), ("model.name", "{}"), ("data.partition.name", "{} partition"),
                     ("data.partition.alpha", "α={}"), ("data.num_clients", "{} clients"),
                     ("algorithm.name", "{}")):
        if key in first and key not in diff:
            if key == "data.partition.alpha" and first.get("data.partition.name") != "dirichlet":
                continue
            parts.append(fmt.format(first[key]))
    if not {"fleet.source", "fleet.mix"} & diff and first:
        parts.append(f"fleet {runs[0].fleet()}")
    return " · ".join(parts) or runs[0].name
