"""A step bar for language-model training: loss and tokens/s, on stderr, on a terminal only;
the metrics lines (every eval) print on the main rank as the engine's epoch lines do."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rbkd.engine import progress as engine_progress


class StepProgress:
    def __init__(self, enabled: bool, steps: int, start: int = 0, *, main: bool = True):
        self.console = Console(stderr=True, highlight=False)
        self.bar_on = enabled and main and self.console.is_terminal
        self.logs = (enabled or engine_progress._always_log) and main
        self.steps, self.start = steps, start
        self._progress: Progress | None = None

    def __enter__(self) -> StepProgress:
        if self.bar_on:
            self._progress = Progress(
                TextColumn("[bold]step"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[rate]:,.0f} tokens/s"), TimeRemainingColumn(),
                console=self.console,
            )  # fmt: skip
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.steps, completed=self.start,
                                                 loss=float("nan"), rate=0.0)  # fmt: skip
        return self

    def step(self, loss: float, rate: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=loss, rate=rate)

    def log(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, soft_wrap=True, markup=False)
        elif self.logs:
            self.console.print(line, soft_wrap=True, markup=False)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
