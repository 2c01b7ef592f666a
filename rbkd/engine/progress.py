"""What a training run shows while it runs: one line per finished epoch (on the main rank) and,
on a terminal with progress on, a live bar of the epoch (loss, accuracy, samples/s).

Both go to stderr: stdout carries only a command's result (its table, or its `--json`).
A file or pipe gets the epoch lines but no bar: a bar redrawn into a log file is noise.
The epoch lines come with progress=True; the command line asks for them always
(`print_epoch_lines`), so `--no-progress` drops only the bar, while the Python API, whose
default is progress=False, stays quiet.
"""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_always_log = False


def print_epoch_lines(on: bool = True) -> None:
    """Print every epoch's line even with progress=False (what the command line wants)."""
    global _always_log
    _always_log = on


class EpochProgress:
    """`with EpochProgress(progress, epochs, main=...) as bar: bar.start(epoch, steps);
    bar.step(loss, acc, rate); bar.log(line)`. `enabled` asks for the live bar (drawn on a
    terminal only) and the epoch lines; `log` prints when enabled or when `print_epoch_lines()`
    was called. Only the main rank (`main`, the engine's DistributedContext.is_main) shows
    anything."""

    def __init__(
        self,
        enabled: bool,
        total_epochs: int,
        console: Console | None = None,
        *,
        main: bool = True,
    ):
        self.total_epochs = total_epochs
        self.console = console or Console(stderr=True, highlight=False)
        self.enabled = enabled and main and self.console.is_terminal
        self._logs = (enabled or _always_log) and main
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "EpochProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
                TextColumn("{task.fields[rate]:,.0f} samples/s"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.__enter__()
        return self

    def start(self, epoch: int, steps: int) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(
                "train",
                total=steps,
                epoch=epoch + 1,
                epochs=self.total_epochs,
                loss=float("nan"),
                acc=0.0,
                rate=0.0,
            )

    def step(self, loss: float, acc: float, rate: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=loss, acc=acc, rate=rate)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, soft_wrap=True, markup=False)
        elif self._logs:
            self.console.print(message, soft_wrap=True, markup=False)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
