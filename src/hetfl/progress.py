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


class RunProgress:
    def __init__(self, total: int, start: int = 0, *, label: str = "hetfl", quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None
        self.total = total
        self.start = start
        self.label = label

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

    def update(self, rnd: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        parts = []
        if "test_accuracy" in metrics:
            parts.append(f"acc {metrics['test_accuracy']:.4f}")
        if "train_loss" in metrics and metrics["train_loss"] == metrics["train_loss"]:
            parts.append(f"loss {metrics['train_loss']:.4f}")
        fields = {"status": "  ".join(parts)} if parts else {}
        self._progress.update(self._task, completed=rnd, **fields)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        elif not self.quiet:
            print(message, file=sys.stderr)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
