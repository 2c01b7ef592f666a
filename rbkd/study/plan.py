"""A study's runs: the grid of every experiment expanded into teacher and student tasks.

Tasks with the same content (a teacher used by several experiments, the same student asked for
by two grids) collapse into one, so each trains once. A student's key uses its teacher's key,
not the teacher's soft labels, so the whole plan, and what of it is done, is known before any
teacher has trained.

No torch here: rbkd.study.schema counts a study's runs (count_runs) while it reads the file. The
two functions that read a teacher run made elsewhere import rbkd.engine (torch) where they need
it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from rbkd.config import (
    DIVERGENCE_OPTIONS,
    LOSS_OPTIONS,
    DistillSpec,
    LossSpec,
    TeacherSpec,
    TrainConfig,
)
from rbkd.data.registry import get_info
from rbkd.io import sha256_file
from rbkd.study.keys import run_key, student_dir_name, student_key, teacher_dir_name, teacher_key
from rbkd.study.schema import StudyFileError

# Experiments whose students learn from teachers, and their grids' extra dimensions.
STUDENT_EXPERIMENTS = ("missing_class", "transfer_set", "temperature", "noise")


@dataclass
class TeacherTask:
    names: list[str]  # study names of this run ("small", "large-b4096-e2", ...)
    roles: list[str]  # "teacher" and/or "sweep"
    spec: TeacherSpec
    cfg: TrainConfig
    key: str
    run_dir: Path
    external: bool = False  # trained elsewhere (a `run = "..."` teacher): used, never trained


@dataclass
class StudentTask:
    experiments: list[str]
    teacher: str | None  # study name of the teacher; None for label smoothing
    spec: DistillSpec
    cfg: TrainConfig
    key: str
    run_dir: Path
    missing_class: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Plan:
    teachers: list[TeacherTask]
    students: list[StudentTask]

    def teacher(self, name: str) -> TeacherTask:
        return next(t for t in self.teachers if name in t.names)


def _cfg(train: dict, device: str, **changes) -> TrainConfig:
    fields = {
        k: train[k] for k in ("epochs", "batch_size", "lr", "optimizer", "seed") if k in train
    }
    fields.update(changes)
    return TrainConfig(device=device, **fields)


def _teacher_tasks(study: dict, out: Path, fingerprint: str, device: str) -> list[TeacherTask]:
    wanted: list[tuple[str, str, TeacherSpec, TrainConfig]] = []
    external: list[TeacherTask] = []
    for i, t in enumerate(study["teachers"]):
        if "run" in t:
            _check_external_limit(study, i)
            external.append(_external_teacher(t, study["dataset"], fingerprint, device))
            continue
        spec = TeacherSpec(dataset=study["dataset"], capacity=t["capacity"])
        wanted.append((t["name"], "teacher", spec, _cfg(t, device)))
    sweep = study["experiments"].get("batch_sweep")
    if sweep:
        spec = TeacherSpec(dataset=study["dataset"], capacity=sweep["capacity"])
        for epochs in sweep["epochs"]:
            for batch in sweep["batch_sizes"]:
                cfg = _cfg(sweep, device, epochs=epochs, batch_size=batch)
                name = f"{sweep['capacity']}-b{batch}-e{epochs}"
                wanted.append((name, "sweep", spec, cfg))
    tasks: dict[str, TeacherTask] = {t.key: t for t in external}
    for name, role, spec, cfg in wanted:
        key = teacher_key(spec, cfg, fingerprint)
        if key in tasks:
            tasks[key].names.append(name)
            tasks[key].roles.append(role)
        else:
            run_dir = out / "teachers" / teacher_dir_name(spec, cfg, key)
            tasks[key] = TeacherTask([name], [role], spec, cfg, key, run_dir)
    return list(tasks.values())


def _check_external_limit(study: dict, i: int) -> None:
    """A teacher run made elsewhere on fewer training examples than the study uses has soft
    labels for only part of the study's transfer set: refuse it before anything trains (its
    config.json records the examples it saw), in the study's own terms."""
    from rbkd.engine import read_config

    t = study["teachers"][i]
    run_dir = Path(t["run"])
    if not (run_dir / "soft_labels_train.safetensors").is_file():
        return  # its soft labels are computed now, on the study's own data
    try:
        config = read_config(run_dir)
    except Exception:  # not a run folder: _external_teacher says so
        return
    seen = (config.get("train_data") or {}).get("size")
    cut = (config.get("extra_config") or {}).get("limit")
    if not isinstance(seen, int) or not isinstance(cut, int) or seen < cut:
        return  # trained on its whole training split
    limit = study.get("limit")
    if limit is None:
        try:
            wanted = get_info(study["dataset"]).split_sizes["train"]
        except Exception:
            return
    else:
        wanted = limit
    if wanted <= seen:
        return
    path = getattr(study, "path", None)
    where = f"{path}: " if path is not None else ""
    uses = f"limit = {limit}" if limit is not None else "no limit (the whole training split)"
    raise StudyFileError(
        f"{where}teacher[{i}].run: teacher {t['name']!r} ({run_dir}) was trained on the first "
        f"{seen} training examples (its run's limit), but the study uses {uses}, so it has no "
        f"soft labels for the rest; set limit = {seen} or less in [study] (or run with "
        f"--limit {seen}), or give a teacher run trained on at least {wanted} examples"
    )


def _external_teacher(t: dict, dataset: str, fingerprint: str, device: str) -> TeacherTask:
    """A teacher run made elsewhere, keyed by its weights and the data its soft labels cover."""
    from rbkd.engine import read_config

    run_dir = Path(t["run"])
    config = read_config(run_dir)
    if config["dataset"] != dataset:
        raise ValueError(
            f"teacher {t['name']} ({run_dir}) was trained on {config['dataset']}, the study "
            f"is on {dataset}"
        )
    model = run_dir / "model.safetensors"
    if not model.is_file():
        raise FileNotFoundError(f"{model} not found: the teacher run {run_dir} did not finish")
    key = run_key("external-teacher", {"model": sha256_file(model), "data": fingerprint})
    capacity = (config.get("extra_config") or {}).get("capacity") or config["arch"]
    train = dict(config.get("train_config") or {})
    cfg = (
        TrainConfig.from_dict({**train, "device": device}) if train else TrainConfig(device=device)
    )
    spec = TeacherSpec(dataset=dataset, capacity=capacity)
    return TeacherTask([t["name"]], ["teacher"], spec, cfg, key, run_dir, external=True)


def _loss_lists(e: dict) -> dict[str, list]:
    """The experiment's loss grid (an experiment from an older study.json has none: forward KL)."""
    default = LossSpec()
    return {k: list(e.get(k) or [getattr(default, k)]) for k in LOSS_OPTIONS}


def count_losses(e: dict) -> int:
    """How many distinct losses an experiment's grid asks for, without expanding it: each
    divergence times the values of the options it uses (jsd's beta, ...), times standardize."""
    grid = _loss_lists(e)
    per = sum(
        math.prod(len(grid[o]) for o in DIVERGENCE_OPTIONS.get(d, ())) for d in grid["divergence"]
    )
    return per * len(grid["standardize"])


def loss_specs(e: dict) -> list[LossSpec]:
    """The experiment's distinct losses, in the order of its lists (an option a divergence does
    not use takes no part: [kl, jsd] x beta [0.1, 0.9] is kl, jsd 0.1 and jsd 0.9)."""
    grid = _loss_lists(e)
    out: list[LossSpec] = []
    for standardize in grid["standardize"]:
        for d in grid["divergence"]:
            used = DIVERGENCE_OPTIONS.get(d, ())
            for values in itertools.product(*(grid[o] for o in used)):
                spec = LossSpec(
                    divergence=d, standardize=standardize, **dict(zip(used, values, strict=True))
                )
                if spec not in out:
                    out.append(spec)
    return out


def count_runs(study: dict) -> tuple[int, int]:
    """(teachers, students) a study asks for, counted from the grid's sizes without expanding it
    (a million-cell grid is counted at once). Runs that two experiments share are counted once
    per experiment, so the plan may hold fewer, never more."""
    ex = study["experiments"]
    sweep = ex.get("batch_sweep")
    teachers = len(study["teachers"])
    if sweep:
        teachers += len(sweep["epochs"]) * len(sweep["batch_sizes"])
    students = 0
    for name in STUDENT_EXPERIMENTS:
        e = ex.get(name)
        if e is None:
            continue
        taught = len(e["teachers"]) * len(e["T"]) * len(e["t_squared"]) * count_losses(e)
        taught *= len(transfer_labels(e))
        smoothed = len(e.get("label_smoothing") or [])  # once, not per t_squared
        if name == "missing_class":
            cells = (taught + smoothed) * len(e["classes"])
        elif name == "transfer_set":
            cells = taught * (1 + len(e["select"]) * len(e["per_class"]))
        elif name == "temperature":
            cells = taught
        else:  # noise
            cells = (taught + smoothed) * len(e["noise"])
        students += cells * len(e["seeds"])
    return teachers, students


def transfer_labels(e: dict) -> list[str]:
    """Whether the experiment's students see the transfer set's labels: "labelled" and/or
    "unlabelled" (an experiment from an older study.json has no such list: labelled)."""
    return list(e.get("transfer_labels") or ["labelled"])


def _student_specs(study: dict):
    """(experiment, teacher name or None, DistillSpec fields, epochs, missing class, seeds) per
    cell, for every t_squared value, every loss and each of labelled and unlabelled transfer
    an experiment asks for."""
    for experiment, teacher, fields, epochs, missing in _cells(study):
        e = study["experiments"][experiment]
        # Label smoothing has no temperature to square and no divergence to choose, and its
        # targets are the labels: its cells run once, labelled, not per t_squared or per loss
        taught = teacher is not None
        for t_squared in e["t_squared"] if taught else e["t_squared"][:1]:
            for loss in loss_specs(e) if taught else [LossSpec()]:
                for labels in transfer_labels(e) if taught else ["labelled"]:
                    # Unlabelled transfer is pure distillation: alpha 1 whatever [loss] says
                    hidden = {"unlabelled": True, "alpha": 1.0} if labels == "unlabelled" else {}
                    yield (
                        experiment,
                        teacher,
                        {**fields, "t_squared": t_squared, "loss": loss, **hidden},
                        epochs,
                        missing,
                        e["seeds"],
                    )


def _cells(study: dict):
    common = {"alpha": study["loss"]["alpha"]}
    ex = study["experiments"]
    if "missing_class" in ex:
        e = ex["missing_class"]
        for teacher in e["teachers"]:
            for T in e["T"]:
                for k in e["classes"]:
                    fields = {**common, "T": T, "student": e["student"], "exclude_classes": [k]}
                    yield "missing_class", teacher, fields, e["epochs"], k
        for A in e["label_smoothing"]:
            for k in e["classes"]:
                fields = {**common, "label_smoothing": A, "student": e["student"]}
                yield "missing_class", None, {**fields, "exclude_classes": [k]}, e["epochs"], k
    if "transfer_set" in ex:
        e = ex["transfer_set"]
        for teacher in e["teachers"]:
            for T in e["T"]:
                base = {**common, "T": T, "student": e["student"]}
                yield "transfer_set", teacher, base, e["epochs"], None  # the full-data reference
                for select in e["select"]:
                    for n in e["per_class"]:
                        fields = {**base, "per_class": n, "select": select}
                        yield "transfer_set", teacher, fields, e["epochs"], None
    if "temperature" in ex:
        e = ex["temperature"]
        for teacher in e["teachers"]:
            for T in e["T"]:
                fields = {**common, "T": T, "student": e["student"]}
                yield "temperature", teacher, fields, e["epochs"], None
    if "noise" in ex:
        e = ex["noise"]
        for noise in e["noise"]:
            for teacher in e["teachers"]:
                for T in e["T"]:
                    fields = {**common, "T": T, "student": e["student"], "noise": noise}
                    yield "noise", teacher, fields, e["epochs"], None
            for A in e["label_smoothing"]:
                fields = {**common, "label_smoothing": A, "student": e["student"], "noise": noise}
                yield "noise", None, fields, e["epochs"], None


def make_plan(study: dict, out: Path, fingerprint: str, device: str = "auto") -> Plan:
    """Every run of `study`, deduplicated, with its key and run folder under `out`."""
    out = Path(out)
    teachers = _teacher_tasks(study, out, fingerprint, device)
    by_name = {name: t for t in teachers for name in t.names}
    students: dict[str, StudentTask] = {}
    for experiment, teacher, fields, epochs, missing, seeds in _student_specs(study):
        for seed in seeds:
            spec = DistillSpec(dataset=study["dataset"], **fields)
            cfg = _cfg(study["student"], device, epochs=epochs, seed=seed)
            if teacher is None:
                source = {"label_smoothing": spec.label_smoothing}
            else:
                source = {"teacher": by_name[teacher].key}
            key = student_key(spec, cfg, fingerprint, source)
            if key in students:
                if experiment not in students[key].experiments:
                    students[key].experiments.append(experiment)
                continue
            run_dir = out / "students" / student_dir_name(spec, study["dataset"], cfg, key)
            students[key] = StudentTask(
                [experiment], teacher, spec, cfg, key, run_dir, missing_class=missing
            )
    return Plan(teachers, list(students.values()))
