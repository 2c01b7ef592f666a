"""Soft labels: a teacher's raw logits for one dataset split, stored as safetensors.

A soft-label file holds the *logits* (not probabilities at some T), so any temperature can be
derived later: `softmax(logits / T)`. Tensors:

    logits   [N, C] float32   raw teacher logits
    labels   [N]    int64     the dataset's hard labels at `indices` (checked on load)
    indices  [N]    int64     positions of the rows in the dataset split

String metadata: `rbkd_format` ("1"), `dataset`, `split`, `num_classes`, `teacher`
("runs/t1@sha256:<hex of its model.safetensors>"), `created` (ISO 8601, UTC).

Soft labels of a teacher that is not an rbkd run (`rbkd.soft_labels(teacher, data)`) say so:
`teacher` is "user model <class> (state-dict sha256 <hex>)" or "user callable <qualname>, no
state", with `teacher_kind` ("user model" | "user callable") and, for a model,
`teacher_state_sha256`. Extra keys only: files of either kind read the same way.

Reading validates everything a later run relies on and raises `SoftLabelsError` (a `ValueError`)
with one line naming the file and what to do next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rbkd.data.adapters import IGNORE_INDEX
from rbkd.io import (
    NotOursError,
    check_new_file,
    read_safetensors_metadata,
    sha256_file,
    write_bytes,
)

FORMAT_VERSION = "1"
TENSOR_KEYS = ("logits", "labels", "indices")
METADATA_KEYS = ("rbkd_format", "dataset", "split", "num_classes", "teacher", "created")
SPLITS = ("train", "test")
TRAIN_FILE = "soft_labels_train.safetensors"
TEST_FILE = "soft_labels_test.safetensors"


class SoftLabelsError(ValueError):
    """A soft-label file is missing, corrupt, or does not fit the data it is used with."""


@dataclass
class SoftLabels:
    """Teacher logits for one split, with the dataset indices and labels they belong to."""

    logits: Tensor  # [N, C] float32, raw teacher logits
    labels: Tensor  # [N] int64
    indices: Tensor  # [N] int64, positions in the dataset split
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def dataset(self) -> str:
        return self.metadata.get("dataset", "")

    @property
    def split(self) -> str:
        return self.metadata.get("split", "")

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def teacher(self) -> str:
        return self.metadata.get("teacher", "")

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def probs(self, T: float = 1.0) -> Tensor:
        """Soft labels at temperature T: softmax(logits / T), float32 [N, C]."""
        if not T > 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        return torch.softmax(self.logits.double() / T, dim=1).float()

    def dense_logits(self, num_examples: int) -> Tensor:
        """Logits scattered into a [num_examples, C] table aligned with the dataset split.

        Rows the file does not cover are NaN, so using one by mistake shows up at once.
        """
        out = torch.full((num_examples, self.num_classes), float("nan"), dtype=torch.float32)
        out[self.indices] = self.logits
        return out


def teacher_id(teacher_run: str | os.PathLike, teacher_sha256: str) -> str:
    """The `teacher` metadata string: "<run path>@sha256:<hex>"."""
    return f"{teacher_run}@sha256:{teacher_sha256}"


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in order): changes
    whenever a weight or buffer does, whatever device it lives on."""
    import hashlib

    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def user_teacher_metadata(teacher: Any) -> dict[str, str]:
    """The `teacher` metadata of a teacher that is not an rbkd run: a module is named by its
    class and the hash of its state dict; a plain function by its qualified name (no state)."""
    if isinstance(teacher, torch.nn.Module):
        cls = type(teacher)
        digest = state_dict_sha256(teacher)
        return {
            "teacher": f"user model {cls.__module__}.{cls.__qualname__} (state-dict sha256 {digest})",
            "teacher_kind": "user model",
            "teacher_state_sha256": digest,
        }
    name = getattr(teacher, "__qualname__", None) or type(teacher).__qualname__
    module = getattr(teacher, "__module__", None)
    name = f"{module}.{name}" if module else name
    return {"teacher": f"user callable {name}, no state", "teacher_kind": "user callable"}


def soft_labels_metadata(
    dataset: str, split: str, num_classes: int, teacher: dict[str, str]
) -> dict[str, str]:
    """A soft-label file's metadata; `teacher` holds "teacher" and any teacher_* keys."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return {
        "rbkd_format": FORMAT_VERSION,
        "dataset": str(dataset),
        "split": split,
        "num_classes": str(num_classes),
        **teacher,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


_REPLACE_TODO = (
    "give another file name (--out, out=), or delete it first (`rbkd soft-labels --force` "
    "replaces it)"
)


def _teacher_origin(teacher: str) -> str:
    """What a `teacher` metadata string says about where the labels come from, without the
    hash of the weights: the run folder (resolved), or the user model's class, or the callable."""
    run, sep, _ = teacher.rpartition("@sha256:")
    if sep and not teacher.startswith("user "):
        return "run " + os.path.realpath(run)
    return teacher.split(" (state-dict sha256 ", 1)[0]


def check_soft_labels_target(
    path: str | os.PathLike,
    *,
    dataset: str,
    split: str,
    teacher: str,
    teacher_run: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """`path` if soft labels of `teacher` (its `teacher` metadata) for `dataset`/`split` may be
    written there: a new file, or rbkd's own soft-label file of the same origin (the same run
    folder or user model, dataset and split: a regenerated file replaces the old one), or, in a
    teacher's run folder, that run's own soft_labels_SPLIT file. A foreign file or a link only
    with `force`; a folder never. Otherwise NotOursError, one line naming the path."""
    path = Path(path)

    def owned(existing: Path) -> bool:
        meta = read_safetensors_metadata(existing, "soft-label file")
        if "rbkd_format" not in meta or "teacher" not in meta:
            return False
        if (
            teacher_run is not None
            and existing.name in (TRAIN_FILE, TEST_FILE)
            and os.path.realpath(existing.parent) == os.path.realpath(teacher_run)
        ):
            return True  # the run's own file, wherever the run was made
        same = (
            meta.get("dataset") == str(dataset)
            and meta.get("split") == split
            and _teacher_origin(meta["teacher"]) == _teacher_origin(teacher)
        )
        if not same:
            raise NotOursError(
                f"{existing} already holds rbkd soft labels of another teacher or split "
                f"({meta.get('dataset')}/{meta.get('split')} from {meta['teacher'][:200]!r}); "
                f"rbkd does not replace them: {_REPLACE_TODO}"
            )
        return True

    return check_new_file(path, "soft labels", owned=owned, force=force, todo=_REPLACE_TODO)


def write_soft_labels(
    path: str | os.PathLike,
    logits: Tensor,
    labels: Tensor,
    indices: Tensor,
    *,
    dataset: str,
    split: str,
    teacher_run: str | os.PathLike | None = None,
    teacher_sha256: str | None = None,
    teacher: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write a soft-label file atomically; returns its path. Inputs are checked, not coerced.

    The teacher is a run (`teacher_run` and the SHA-256 of its model.safetensors) or, for any
    other teacher, `teacher=user_teacher_metadata(model_or_function)`. An existing file is
    replaced only when it is rbkd's soft labels of the same origin, or with `force`
    (`check_soft_labels_target`); a folder or a foreign file is NotOursError (a ValueError)."""
    from safetensors.torch import save

    if (teacher is None) == (teacher_run is None or teacher_sha256 is None):
        raise ValueError("give either teacher_run and teacher_sha256, or teacher (not both)")
    if teacher is None:
        teacher = {"teacher": teacher_id(teacher_run, teacher_sha256)}
    check_soft_labels_target(
        path,
        dataset=dataset,
        split=split,
        teacher=teacher["teacher"],
        teacher_run=teacher_run,
        force=force,
    )

    logits = logits.detach().to("cpu", torch.float32).contiguous()
    labels = labels.detach().to("cpu").contiguous()
    indices = indices.detach().to("cpu").contiguous()
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if labels.dtype != torch.int64 or labels.shape != (n,):
        raise ValueError(f"labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
    if indices.dtype != torch.int64 or indices.shape != (n,):
        raise ValueError(f"indices must be int64 [{n}], got {indices.dtype} {tuple(indices.shape)}")
    metadata = soft_labels_metadata(dataset, split, c, teacher)
    data = save({"logits": logits, "labels": labels, "indices": indices}, metadata=metadata)
    return write_bytes(path, data)


def _fail(path: Path, what: str, todo: str) -> SoftLabelsError:
    return SoftLabelsError(f"soft-label file {path}: {what}; {todo}")


_REGENERATE = "regenerate it with `rbkd soft-labels --teacher RUN --split SPLIT --out FILE`"


def read_soft_labels(path: str | os.PathLike, *, dataset: Any | None = None) -> SoftLabels:
    """Read and validate a soft-label file; with `dataset`, also check that it belongs to it.

    `dataset` is an `rbkd.data.ImageDataset` (its name, number of classes, length and labels are
    compared). Every problem raises `SoftLabelsError` with one line naming the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise _fail(
            path, "no such file", "write one with `rbkd soft-labels --teacher RUN --out FILE`"
        )
    try:
        # Bounded and regular-file-only: a FIFO or /dev/zero would hang safe_open, and a
        # 50 MB metadata string would be copied into every report made from the file.
        metadata = read_safetensors_metadata(path, "soft-label file")
    except (OSError, ValueError) as e:  # the message names the file and what is wrong
        raise SoftLabelsError(f"{e}; {_REGENERATE}") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in TENSOR_KEYS if k not in keys]
            if missing:
                raise _fail(path, f"missing tensor(s) {', '.join(missing)}", _REGENERATE)
            tensors = {k: f.get_tensor(k) for k in TENSOR_KEYS}
    except SoftLabelsError:
        raise
    except Exception as e:  # safetensors raises its own error type, or OSError, for bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(path, f"not a readable safetensors file ({reason})", _REGENERATE) from e

    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise _fail(path, f"missing metadata {', '.join(missing)}", _REGENERATE)
    if metadata["rbkd_format"] != FORMAT_VERSION:
        raise _fail(
            path,
            f"format {metadata['rbkd_format']!r}, this rbkd reads format {FORMAT_VERSION!r}",
            _REGENERATE,
        )
    logits, labels, indices = (tensors[k] for k in TENSOR_KEYS)
    if logits.dtype != torch.float32 or logits.dim() != 2:
        raise _fail(
            path,
            f"logits must be float32 [N, C], got {logits.dtype} {tuple(logits.shape)}",
            _REGENERATE,
        )
    n, c = logits.shape
    for name, t in (("labels", labels), ("indices", indices)):
        if t.dtype != torch.int64 or tuple(t.shape) != (n,):
            raise _fail(
                path, f"{name} must be int64 [{n}], got {t.dtype} {tuple(t.shape)}", _REGENERATE
            )
    if metadata["num_classes"] != str(c):
        raise _fail(
            path, f"metadata says {metadata['num_classes']} classes, logits have {c}", _REGENERATE
        )
    if metadata["split"] not in SPLITS:
        raise _fail(path, f"unknown split {metadata['split']!r}", _REGENERATE)
    if n and not torch.isfinite(logits).all():
        raise _fail(path, "logits contain NaN or inf", _REGENERATE)
    if n and (labels.min() < 0 or labels.max() >= c):
        raise _fail(path, f"labels outside [0, {c})", _REGENERATE)
    if n and (indices.min() < 0 or indices.unique().numel() != n):
        raise _fail(path, "indices must be distinct and >= 0", _REGENERATE)

    soft = SoftLabels(logits, labels, indices, metadata, path)
    if dataset is not None:
        check_matches_dataset(soft, dataset)
    return soft


def soft_labels_file(run_dir: str | os.PathLike, split: str) -> Path:
    """`run_dir/soft_labels_{split}.safetensors`, the file `train-teacher` writes for `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return Path(run_dir) / (TRAIN_FILE if split == "train" else TEST_FILE)


def recorded_teacher_sha256(soft: SoftLabels) -> str:
    """The SHA-256 of the teacher's model.safetensors recorded in the file ("" if none)."""
    _, sep, digest = soft.teacher.rpartition("@sha256:")
    return digest if sep else ""


def read_teacher_soft_labels(
    run_dir: str | os.PathLike, split: str, dataset: Any | None = None
) -> SoftLabels:
    """Read a teacher run's own soft labels (`run_dir/soft_labels_{split}.safetensors`) and check
    that they were made by the weights now in `run_dir/model.safetensors`: the SHA-256 recorded
    in the file must equal the weights' SHA-256. Stale labels (a resumed run killed before it
    rewrote them) or a file copied in from another run raise `SoftLabelsError` (one line, with
    the command that regenerates them). With `dataset`, the file is also checked against it
    (`check_matches_dataset`)."""
    run_dir = Path(run_dir)
    path = soft_labels_file(run_dir, split)
    soft = read_soft_labels(path)
    regenerate = (
        f"regenerate them with `rbkd soft-labels --teacher {run_dir} --split {split}` "
        "(or `rbkd train-teacher ... --resume`)"
    )
    model_file = run_dir / "model.safetensors"
    if not model_file.exists() and not model_file.is_symlink():
        raise _fail(path, f"its teacher's weights {model_file} are missing", "finish the run first")
    actual = sha256_file(model_file)
    recorded = recorded_teacher_sha256(soft)
    if recorded != actual:
        what = (
            f"made by teacher weights with SHA-256 {recorded[:12]}..., but {model_file} has "
            f"{actual[:12]}... (stale, or copied from another run)"
            if recorded
            else "records no teacher SHA-256"
        )
        raise _fail(path, what, regenerate)
    if dataset is not None:
        check_matches_dataset(soft, dataset)
    return soft


def dataset_name(dataset: Any) -> str:
    return str(getattr(dataset, "name", getattr(dataset, "dataset", "")))


def dataset_labels(dataset: Any) -> Tensor:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = dataset.targets
    return torch.as_tensor(labels).long()


def dataset_num_classes(dataset: Any) -> int:
    c = getattr(dataset, "num_classes", None)
    if c is None:
        c = len(dataset.classes)
    return int(c)


def check_matches_dataset(soft: SoftLabels, dataset: Any) -> None:
    """Raise `SoftLabelsError` unless `soft` belongs to `dataset` (name, classes, labels)."""
    path = soft.path or Path("<memory>")
    name = dataset_name(dataset)
    todo = "generate soft labels for this dataset with `rbkd soft-labels --teacher RUN`"
    if name and soft.dataset != name:
        raise _fail(path, f"made for dataset {soft.dataset!r}, not {name!r}", todo)
    c = dataset_num_classes(dataset)
    if soft.num_classes != c:
        raise _fail(path, f"has {soft.num_classes} classes, dataset {name!r} has {c}", todo)
    split = getattr(dataset, "split", None)
    if isinstance(split, str) and split and soft.split != split:
        raise _fail(path, f"made for the {soft.split} split, not {split}", todo)
    labels = dataset_labels(dataset)
    if len(soft) and int(soft.indices.max()) >= labels.numel():
        raise _fail(
            path,
            f"indices reach {int(soft.indices.max())} but the {name} {split or ''} split "
            f"has {labels.numel()} examples".replace("  ", " "),
            todo,
        )
    # The file's labels say which split and order it was made on; a row the data leaves
    # unlabelled (IGNORE_INDEX: an unlabelled transfer set) has nothing to contradict them.
    theirs = labels[soft.indices]
    wrong = ((theirs != soft.labels) & (theirs != IGNORE_INDEX)).nonzero().flatten()
    if wrong.numel():
        i = int(wrong[0])
        raise _fail(
            path,
            f"labels differ from the dataset's at {wrong.numel()} row(s) (first: index "
            f"{int(soft.indices[i])}, file {int(soft.labels[i])}, dataset {int(labels[soft.indices[i]])})",
            todo,
        )


def soft_labels_from_model(
    model: torch.nn.Module,
    dataset: Any,
    path: str | os.PathLike,
    *,
    teacher_run: str | os.PathLike,
    split: str,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    force: bool = False,
) -> Path:
    """Run the teacher over the whole split and write its logits (`rbkd.engine.predict_logits`).
    `path` must be new or rbkd's soft labels of this run (checked first), unless `force`."""
    from rbkd.engine import predict_logits, resolve_device
    from rbkd.locking import folder_lock

    check_soft_labels_target(
        path,
        dataset=dataset_name(dataset),
        split=split,
        teacher=teacher_id(teacher_run, ""),
        teacher_run=teacher_run,
        force=force,
    )
    dev = resolve_device(device) if isinstance(device, str) else device
    logits = predict_logits(model, dataset, device=dev, batch_size=batch_size)
    labels = dataset_labels(dataset)
    indices = torch.arange(labels.numel(), dtype=torch.int64)
    model_file = Path(teacher_run) / "model.safetensors"
    path = Path(path)
    # One writer per folder: the lock is re-entrant, so this nests inside a caller's lock.
    with folder_lock(path.parent, "soft-label file"):
        return write_soft_labels(
            path,
            logits,
            labels,
            indices,
            dataset=dataset_name(dataset),
            split=split,
            teacher_run=teacher_run,
            teacher_sha256=sha256_file(model_file),
            force=force,
        )
