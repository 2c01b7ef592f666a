"""The run directory: config.json, metrics.jsonl, model.safetensors; and load_run to read it back.

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written file behind: a reader sees the previous version or the new one.
"""

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rbkd.io import (
    MAX_JSON_BYTES,
    NotOursError,
    atomic_path,
    atomic_write_bytes,
    check_regular_file,
    claim_folder,
    jsonable,
    read_bounded,
    read_json_file,
    read_safetensors_metadata,
)
from rbkd.models import build_model

CONFIG, METRICS, MODEL = "config.json", "metrics.jsonl", "model.safetensors"


class RunDirError(ValueError):
    """A run directory (or a file in it) cannot be used; the message says which and what to do."""


# Every name rbkd writes into a run folder (the engine's files, a teacher's soft labels, the
# study's result marks): a folder holding only these (and no config.json) is a run killed early.
RUN_FILES = frozenset(
    {
        CONFIG,
        METRICS,
        MODEL,
        "checkpoint.safetensors",
        "soft_labels_train.safetensors",
        "soft_labels_test.safetensors",
        "result.json",
        "report.json",
    }
)


def check_run_folder(run_dir: str | Path) -> Path:
    """`run_dir` if a run may be written there: a new folder, an empty one, or an rbkd run
    folder (its config.json is rbkd's, or it holds nothing but files a run writes). Whether the
    run there is this one is for the caller (resume, content keys) to decide. A file, a dangling
    link or a folder of the user's is RunDirError, one line naming the path."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunDirError(
            f"cannot write a run into {run_dir}: it is a dangling symbolic link (to "
            f"{os.readlink(run_dir)!r}); give a new folder name, or fix the link"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(
            f"cannot write a run into {run_dir}: it is a file, not a folder; give a new folder "
            "name (out=, --out)"
        )

    def recognise(folder: Path) -> bool:
        if (folder / CONFIG).exists():
            try:
                read_config(folder)
            except (OSError, ValueError):
                return False
            return True
        names = {e.name for e in folder.iterdir()}
        return bool(names) and names <= RUN_FILES | {".rbkd.lock"}

    try:
        claim_folder(
            run_dir, "run", recognise=recognise, todo="give a new or empty folder (out=, --out)"
        )
    except NotOursError as e:
        raise RunDirError(str(e)) from None
    return run_dir


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """The whole metrics.jsonl, rewritten atomically (a few hundred bytes per epoch)."""
    text = "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in rows)
    atomic_write_bytes(run_dir / METRICS, text.encode())


# Names the losses had before rbkd recorded both: "train_loss" was the objective's (the
# T**2-scaled KD loss for a student), "test_loss" the cross-entropy.
OLD_LOSS_NAMES = {"train_loss": "train_objective_loss", "test_loss": "test_ce_loss"}


def renamed_losses(row: dict) -> dict:
    """A metrics row (or final metrics) written by an older rbkd, in today's names."""
    if not any(old in row for old in OLD_LOSS_NAMES):
        return row
    return {OLD_LOSS_NAMES.get(k, k): v for k, v in row.items()}


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows, one per epoch, in today's names (an older run's too)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    try:
        text = read_bounded(path, MAX_JSON_BYTES, "metrics file").decode()
        return [renamed_losses(json.loads(line)) for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON lines ({e}); the run folder is damaged") from e


def package_versions() -> dict:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rbkd": version("rbkd"),
        "numpy": version("numpy"),
        "safetensors": version("safetensors"),
    }


def save_model(run_dir: Path, model: nn.Module) -> None:

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"dataset": str(getattr(model, "dataset", "")), "arch": str(getattr(model, "arch", ""))}
    with atomic_path(run_dir / MODEL) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a run directory (pass the folder that "
            "`rbkd train-teacher` or fit(run_dir=...) wrote)"
        )
    try:
        config = read_json_file(path, "run configuration")
    except ValueError as e:
        raise RunDirError(f"{e}; the run directory is damaged") from e
    if not isinstance(config, dict):
        raise RunDirError(f"{path} holds no JSON object; the run directory is damaged")
    for key in ("dataset", "arch"):
        if key not in config:
            raise RunDirError(f"{path} has no {key!r}: it was not written by rbkd.engine.fit")
    return config


def load_run(
    run_dir: str | Path, *, device="cpu", model: nn.Module | None = None
) -> tuple[nn.Module, dict]:
    """(model in eval mode with the final weights, config dict) of a finished run.

    rbkd's own models are rebuilt from config.json; a run of a model of your own (the Python
    API's train_teacher/distill with an nn.Module) needs that module passed as `model`, whose
    weights are then replaced by the run's."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    own_model = not config.get("arch")
    if own_model and model is None:
        what = config.get("model") or {}
        name = what.get("class", "a model") if isinstance(what, dict) else "a model"
        raise RunDirError(
            f"{run_dir} holds a run of your own model ({name}), which rbkd cannot rebuild: pass "
            "an instance of it, load_run(run_dir, model=MyModel())"
        )
    path = run_dir / MODEL
    if not path.exists() and not path.is_symlink():
        hint = (
            "the run did not finish: continue it with resume=True (`rbkd train ... --resume`)"
            if (run_dir / "checkpoint.safetensors").exists()
            else "train it first"
        )
        raise FileNotFoundError(f"{path} not found: {hint}")
    check_regular_file(path, "model weights")
    try:
        saved = read_safetensors_metadata(path, "model weights")
        weights = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise RunDirError(
            f"{path} is not a readable safetensors file ({e}): it is corrupt or truncated; "
            "re-run the training (or resume it from checkpoint.safetensors)"
        ) from e
    if own_model:
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise RunDirError(
                f"{path} does not fit the model passed to load_run ({_first_line(e)}): pass the "
                "same architecture the run trained"
            ) from e
        return model.to(device).eval(), config
    if model is not None:
        raise ValueError(
            f"{run_dir} holds rbkd's {config['dataset']}/{config['arch']} model, which load_run "
            "rebuilds itself: leave out model="
        )
    model = build_model(config["dataset"], config["arch"])
    if saved.get("arch") and (saved.get("dataset"), saved.get("arch")) != (
        config["dataset"],
        config["arch"],
    ):
        raise RunDirError(
            f"{path} holds a {saved.get('dataset')}/{saved.get('arch')} model but config.json "
            f"says {config['dataset']}/{config['arch']}: the files come from different runs"
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise RunDirError(
            f"{path} does not match the {config['dataset']}/{config['arch']} architecture of this "
            f"rbkd version ({e}); it was written by a different model definition (rbkd "
            f"{config.get('versions', {}).get('rbkd', '?')}) — retrain, or load it with that version"
        ) from e
    return model.to(device).eval(), config


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
