"""Whether a content-addressed run folder is done, half done or new, and so what to do with it.

A run folder records its key in config.json (written before the first epoch) and in its result
file (written last, atomically): the result file with the right key is the one mark of a finished
run. A folder whose config.json carries another key holds a different run and is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbkd.engine.rundir import RunDirError
from rbkd.io import MAX_JSON_BYTES, read_bounded, read_json_file, read_safetensors_metadata


@dataclass
class RunState:
    run_dir: Path
    key: str
    status: str  # "done" | "partial" (resumes from its checkpoint) | "new"
    epochs_done: int = 0
    result: dict[str, Any] | None = None


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        value = read_json_file(path, "run file")
    except ValueError:
        return None  # unreadable (half a file cannot be: writes are atomic): the run redoes it
    return value if isinstance(value, dict) else None


def _epochs_done(run_dir: Path) -> int:
    """The epochs a partial run has completed: its checkpoint's count (what fit resumes from),
    else the lines of metrics.jsonl. A kill between the checkpoint write and the metrics line
    leaves metrics.jsonl one line short; the checkpoint header is the truth."""
    checkpoint = run_dir / "checkpoint.safetensors"  # rbkd.engine.checkpoint.CHECKPOINT
    if checkpoint.exists():
        try:
            header = read_safetensors_metadata(checkpoint, "checkpoint", max_metadata=8 << 20)
            return int(header["epoch"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable: fit says so in one line when it resumes; count the metrics here
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    text = read_bounded(path, MAX_JSON_BYTES, "metrics file").decode(errors="replace")
    return sum(1 for line in text.splitlines() if line.strip())


def run_state(run_dir: Path, key: str, result_file: str) -> RunState:
    """The state of `run_dir` for a run with `key`; RunDirError when it holds another run."""
    run_dir = Path(run_dir)
    result = _read_json(run_dir / result_file)
    if result is not None and result.get("key") == key:
        return RunState(run_dir, key, "done", result.get("epochs") or 0, result)
    config = _read_json(run_dir / "config.json")
    if config is not None:
        held = (config.get("extra_config") or {}).get("key")
        if held != key:
            what = f"run {held[:12]}" if held else "a run made without a key"
            raise RunDirError(
                f"{run_dir} already holds {what}, not this one ({key[:12]}): give another "
                "--out, or leave --out out to use the run's own folder"
            )
        return RunState(run_dir, key, "partial", _epochs_done(run_dir))
    return RunState(run_dir, key, "new")
