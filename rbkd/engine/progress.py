"""The rich progress bar of one epoch: loss, accuracy and samples/s of the steps so far."""

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class EpochProgress:
    """`with EpochProgress(enabled) as bar: bar.start(epoch, steps); bar.step(loss, acc, rate)`;
    a no-op when disabled (progress=False, or any rank but 0)."""

    def __init__(self, enabled: bool, total_epochs: int):
        self.enabled, self.total_epochs = enabled, total_epochs
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
            self._progress.console.print(message)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
