"""A live progress bar for runs (round, accuracy, ETA) on stderr; silent with ``quiet``."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and value == value


def round_status(metrics: dict[str, float]) -> str:
    """A round's numbers, each labelled by what it is: the test accuracy and loss (evaluation rounds), the
    accuracy of the models the clients run (``deployed``, heterogeneous runs), the clients' *train* loss, and
    epsilon so far (private runs)."""
    parts = []
    if _finite(metrics.get("test_accuracy")):
        parts.append(f"test acc {metrics['test_accuracy']:.4f}")
    if _finite(metrics.get("deployed_accuracy")) and metrics.get("deployed_accuracy") != metrics.get("test_accuracy"):
        parts.append(f"deployed {metrics['deployed_accuracy']:.4f}")
    if _finite(metrics.get("test_loss")):
        parts.append(f"test loss {metrics['test_loss']:.4f}")
    if _finite(metrics.get("train_loss")):
        parts.append(f"train loss {metrics['train_loss']:.4f}")
    eps = metrics.get("privacy.epsilon")
    if "privacy.epsilon" in metrics:
        parts.append(f"ε {eps:.2f}" if _finite(eps) else "ε ∞")
    return "  ".join(parts)


class RunProgress:
    def __init__(self, total: int, start: int = 0, *, label: str = "hetfl", quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None
        self.total = total
        self.start = start
        self.label = label
        self._eval_task = None
        self._last = ""  # the last round's accuracy/loss text

    def __enter__(self) -> RunProgress:
        if not self.quiet:
            console = Console(file=sys.stderr)
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
                refresh_per_second=4,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, completed=self.start,
                                                 status="")
        return self

    def phase(self, rnd: int, text: str) -> None:
        """What the current round is doing now ("training", "evaluating"): shown next to the round count."""
        if self._progress is not None:
            self._progress.update(self._task, status=f"round {rnd}: {text}  {self._last}".rstrip())

    def eval_step(self, done: int, total: int, label: str) -> None:
        """Evaluation as its own step with its own bar: ``done`` of ``total`` models evaluated, ``label`` next.

        Evaluating several models (one per width, each with a BatchNorm statistics pass) can take longer than
        training a round; without this the round bar looks frozen."""
        if self._progress is None:
            return
        if self._eval_task is None:
            self._eval_task = self._progress.add_task("  evaluation", total=total, completed=done, status="")
        what = f"model {label!r}" if label not in ("", "global") else ("global model" if label else "done")
        self._progress.update(self._eval_task, total=total, completed=done, visible=done < total,
                              status=f"{what} ({min(done + 1, total)}/{total})" if done < total else "done")
        if done == 0:
            self._progress.reset(self._eval_task, total=total, completed=0, visible=True,
                                 status=f"{what} (1/{total})")

    def update(self, rnd: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        text = round_status(metrics)
        if text:
            self._last = text
        self._progress.update(self._task, completed=rnd, status=self._last)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        elif not self.quiet:
            print(message, file=sys.stderr)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
