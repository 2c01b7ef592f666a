"""config.json's content: everything needed to rebuild the model and reproduce the run."""

from pathlib import Path

from torch import Tensor

from rbkd.config import TrainConfig
from rbkd.engine.objectives import tensor_sha256
from rbkd.engine.rundir import RunDirError, package_versions
from rbkd.io import read_json_file

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
        # rbkd's own models name their dataset and architecture (load_run rebuilds them from
        # these); any other nn.Module has neither, so its class and size describe it instead.
        "dataset": getattr(model, "dataset", None),
        "arch": getattr(model, "arch", None),
        "model": describe_model(model),
        "train_data": {"name": train.name, "split": train.split, "size": len(train)},
        "test_data": None
        if test is None
        else {"name": test.name, "split": test.split, "size": len(test)},
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


def describe_model(model) -> dict:
    """The model's class (module.qualname) and trainable parameter count."""
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def check_resumable(run_dir: Path, new: dict, old: dict | None = None, where: str = "") -> None:
    """Refuse to resume a run with different data, model, objective or hyper-parameters.

    `old` is the configuration the checkpoint was written with (it travels in the checkpoint);
    without it, config.json's is used."""
    if old is None:
        path = Path(run_dir) / "config.json"
        try:
            old = read_json_file(path, "run configuration")
        except (OSError, ValueError) as e:
            raise RunDirError(f"cannot resume: {path} is missing or unreadable ({e})") from e
        where = where or "config.json"
    where = f" ({where})" if where else ""
    for key in ("dataset", "arch", "model", "train_data", "transfer_set", "objective", "seed"):
        if key == "model" and key not in old:
            continue  # written by an rbkd that did not record it: dataset and arch still do
        if old.get(key) != new[key]:
            raise RunDirError(
                f"cannot resume {run_dir}: {key} was {_short(old.get(key))}{where}, now "
                f"{_short(new[key])}; rerun with the run's own options, or start a new run folder"
            )
    old_cfg = old.get("train_config", {})
    for key, value in new["train_config"].items():
        if key not in _RESUMABLE_CHANGES and old_cfg.get(key) != value:
            raise RunDirError(
                f"cannot resume {run_dir}: train_config.{key} was {old_cfg.get(key)!r}{where}, "
                f"now {value!r} (only {sorted(_RESUMABLE_CHANGES)} may change on resume); rerun "
                "with the run's own options, or start a new run folder"
            )


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
