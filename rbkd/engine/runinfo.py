"""config.json's content: everything needed to rebuild the model and reproduce the run."""

import json
from pathlib import Path

from torch import Tensor

from rbkd.engine.config import TrainConfig
from rbkd.engine.objectives import tensor_sha256
from rbkd.engine.rundir import RunDirError, package_versions

# TrainConfig fields a resumed run may change without changing what the first epochs did.
_RESUMABLE_CHANGES = {"epochs", "device", "eval_batch_size"}


def run_config(
    model,
    train,
    test,
    cfg: TrainConfig,
    objective,
    rows: Tensor,
    world_size: int,
    extra_config: dict | None,
) -> dict:
    return {
        "dataset": model.dataset,
        "arch": model.arch,
        "train_data": {"name": train.name, "split": train.split, "size": len(train)},
        "test_data": {"name": test.name, "split": test.split, "size": len(test)},
        # The transfer set itself is the caller's to record (e.g. in extra_config: "50 per
        # class, seed 3"); its size and digest here tell whether a resume uses the same one.
        "transfer_set": {"size": len(rows), "indices_sha256": tensor_sha256(rows)},
        "objective": objective.describe(),
        "train_config": cfg.to_dict(),
        "seed": cfg.seed,
        "world_size": world_size,
        "versions": package_versions(),
        "extra_config": extra_config or {},
    }


def check_resumable(run_dir: Path, new: dict) -> None:
    """Refuse to resume a run with different data, model, objective or hyper-parameters."""
    path = Path(run_dir) / "config.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"cannot resume: {path} is missing or unreadable ({e})") from e
    for key in ("dataset", "arch", "train_data", "transfer_set", "objective", "seed"):
        if old.get(key) != new[key]:
            raise RunDirError(
                f"cannot resume {run_dir}: {key} was {old.get(key)!r}, now {new[key]!r}; "
                "start a new run directory instead"
            )
    old_cfg = old.get("train_config", {})
    for key, value in new["train_config"].items():
        if key not in _RESUMABLE_CHANGES and old_cfg.get(key) != value:
            raise RunDirError(
                f"cannot resume {run_dir}: train_config.{key} was {old_cfg.get(key)!r}, now "
                f"{value!r} (only {sorted(_RESUMABLE_CHANGES)} may change on resume)"
            )
