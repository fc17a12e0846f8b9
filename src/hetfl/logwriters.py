"""Metric writers: every round's metrics also to TensorBoard and/or MLflow (``[log] to``; off by default).

metrics.jsonl stays the record of a run; a writer is a copy for the tools people already look at.  Both are
optional extras (``pip install 'hetfl[tensorboard]'``, ``'hetfl[mlflow]'``): a run that asks for one that is not
installed fails before anything is written, naming the extra.

* TensorBoard: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR/tensorboard``); every
  numeric metric as a scalar (``tier.w0.5.flops`` as ``tier/w0.5/flops``), step = round; the resolved config as
  text and as hyperparameters (TensorBoard's HParams plugin) with the final test accuracy.
* MLflow: one MLflow run (named as the hetfl run) in ``log.mlflow_uri`` (default a local file store in
  ``RUN_DIR/mlruns``; ``mlflow ui --backend-store-uri RUN_DIR/mlruns``), the resolved config flattened into its
  parameters, every numeric metric with step = round.  A resumed hetfl run continues the same MLflow run (its
  parameters stay those it started with; the tag ``hetfl.rounds`` follows an extended ``rounds``).

Where we differ from pfl-research's and FL-bench's writers: one writer per tool, fed from the same row that goes
to metrics.jsonl (nothing is computed twice), and the whole resolved config as hyperparameters.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hetfl.errors import ConfigError

LOG_WRITERS = ("tensorboard", "mlflow")


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: where every round's metrics go besides metrics.jsonl (off by default; see hetfl.logwriters).

    * ``to``: ``"tensorboard"`` (event files in RUN_DIR/tensorboard; extra ``hetfl[tensorboard]``), ``"mlflow"``
      (a run of an MLflow tracking store, with the resolved config as its parameters; extra ``hetfl[mlflow]``),
      both comma-separated, or ``""``: none.
    * ``mlflow_uri``: the MLflow tracking URI (default: a local file store in RUN_DIR/mlruns).
    * ``mlflow_experiment``: the MLflow experiment the run is logged under.
    """

    to: str = ""
    mlflow_uri: str = ""
    mlflow_experiment: str = "hetfl"

    def __post_init__(self) -> None:
        unknown = [w for w in self.writers if w not in LOG_WRITERS]
        if unknown:
            raise ConfigError(f"log.to: unknown writer {unknown[0]!r} in {self.to!r}; allowed: "
                              f"{', '.join(LOG_WRITERS)} (comma-separated), or \"\" for none")

    @property
    def writers(self) -> tuple[str, ...]:
        return tuple(w.strip().lower() for w in self.to.split(",") if w.strip())


EXTRAS = {"tensorboard": ("tensorboard", "pip install 'hetfl[tensorboard]'"),
          "mlflow": ("mlflow", "pip install 'hetfl[mlflow]'")}
MLFLOW_RUN_ID = "mlflow_run_id.txt"


class MetricWriter(Protocol):
    def write(self, rnd: int, row: Mapping[str, Any]) -> None: ...

    def close(self, summary: Mapping[str, Any]) -> None: ...


def check_writers(cfg: Any) -> None:
    """Fail before a run starts when ``[log] to`` names a writer whose package is not installed."""
    for name in cfg.log.writers:
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f'log.to = "{cfg.log.to}" needs {module}, which is not installed: {extra}')


def numeric(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's finite numbers (flags and lists left out; booleans as 0/1)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (int, float)) and math.isfinite(v):  # (booleans are ints: 0 / 1)
            out[k] = float(v)
    return out


def flat_config(cfg: Any) -> dict[str, Any]:
    def walk(table: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in table.items():
            if isinstance(v, Mapping):
                out.update(walk(v, f"{prefix}{k}."))
            elif v is not None:
                out[f"{prefix}{k}"] = v
        return out

    return walk(cfg.to_dict(), "")


class TensorBoardWriter:
    def __init__(self, cfg: Any, run_dir: Path, config_text: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```toml\n" + config_text + "\n```", 0)

    def write(self, rnd: int, row: Mapping[str, Any]) -> None:
        for key, value in numeric(row).items():
            if key != "round":
                self.writer.add_scalar(key.replace(".", "/"), value, rnd)
        self.writer.flush()

    def close(self, summary: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config(self.cfg).items()}
        metrics = {f"final/{k}": v for k, v in numeric(summary).items()
                   if k in ("test_accuracy", "best_test_accuracy", "test_accuracy_last5_mean")}
        for summary_pb in hparams(params, metrics):
            self.writer.file_writer.add_summary(summary_pb)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, int(summary.get("rounds_completed", 0) or 0))
        self.writer.close()


class MLflowWriter:
    def __init__(self, cfg: Any, run_dir: Path) -> None:
        uri = cfg.log.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow keeps its file store in maintenance mode behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / MLFLOW_RUN_ID
        if id_file.is_file():  # a resumed hetfl run continues its MLflow run (parameters are immutable in MLflow:
            self.run_id = id_file.read_text().strip()  # an extended `rounds` goes to the tag hetfl.rounds)
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "hetfl.rounds", str(cfg.rounds))
            return
        experiment = self.client.get_experiment_by_name(cfg.log.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(cfg.log.mlflow_experiment))
        self.run_id = self.client.create_run(experiment_id, run_name=cfg.name or run_dir.name).info.run_id
        id_file.write_text(self.run_id + "\n")
        self.client.set_tag(self.run_id, "hetfl.rounds", str(cfg.rounds))
        self.client.set_tag(self.run_id, "hetfl.run_dir", str(run_dir))
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def write(self, rnd: int, row: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, rnd) for k, v in numeric(row).items() if k != "round"]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, summary: Mapping[str, Any]) -> None:
        status = {"complete": "FINISHED", "interrupted": "KILLED"}.get(str(summary.get("status")), "FAILED")
        self.client.set_terminated(self.run_id, status=status)


def open_writers(cfg: Any, run_dir: Path, config_text: str) -> list[MetricWriter]:
    """The writers ``[log] to`` asks for (none by default)."""
    check_writers(cfg)
    writers: list[MetricWriter] = []
    for name in cfg.log.writers:
        writers.append(TensorBoardWriter(cfg, run_dir, config_text) if name == "tensorboard"
                       else MLflowWriter(cfg, run_dir))
    return writers
