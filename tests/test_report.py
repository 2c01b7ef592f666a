"""rbkd.study.report.write_report on synthetic study folders (the contract of
docs/.study-output-draft.md): the tables hold the right numbers (mean ± sample std over seeds),
every figure is a real file of the asked format and is linked, and a section whose experiment or
rows are missing is skipped with a note."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import statistics
from pathlib import Path

import pytest

from rbkd.analysis.entropy import label_smoothing_entropy
from rbkd.analysis.plots import SIGNATURES
from rbkd.study.report import format_cell, markdown_table, mean_std, write_report

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
ENTROPY_T = [float(t) for t in range(1, 21)]
SEEDS = [0, 1, 2]


def _load_examples_module():
    path = Path(__file__).with_name("test_examples.py")
    spec = importlib.util.spec_from_file_location("rbkd_test_examples_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ a synthetic study folder
def entropy_curve(level: float) -> list[float]:
    """A made-up mean entropy rising with T towards ln 10, scaled by `level` in (0, 1)."""
    return [math.log(10) * level * (1 - math.exp(-t / 4)) for t in ENTROPY_T]


def teacher_row(name, role, capacity, batch, epochs, level, run_dir="teachers/none"):
    curve = entropy_curve(level)
    return {
        "study": "synthetic",
        "dataset": "fashion-mnist",
        "class_names": CLASS_NAMES,
        "name": name,
        "role": role,
        "key": f"{abs(hash(name)):x}",
        "capacity": capacity,
        "batch_size": batch,
        "epochs": epochs,
        "lr": 0.001,
        "seed": 0,
        "test_accuracy": 0.8 + level / 10,
        "per_class_accuracy": [0.8] * 10,
        "entropy_T": ENTROPY_T,
        "mean_entropy": curve,
        "per_class_entropy": [[h * (0.9 + 0.02 * k) for k in range(10)] for h in curve],
        "wall_time_s": 12.0,
        "samples_per_s": 1000.0,
        "run_dir": run_dir,
    }


def student_row(rng, experiments, **kw):
    row = {
        "study": "synthetic",
        "dataset": "fashion-mnist",
        "key": f"{rng.getrandbits(48):x}",
        "experiments": experiments,
        "teacher": None,
        "teacher_key": None,
        "teacher_capacity": None,
        "teacher_batch_size": None,
        "teacher_epochs": None,
        "teacher_lr": None,
        "teacher_seed": None,
        "teacher_accuracy": None,
        "teacher_entropy_at_T": None,
        "student": "general",
        "T": None,
        "alpha": 0.9,
        "t_squared": True,
        "label_smoothing": None,
        "noise": None,
        "missing_class": None,
        "missing_class_name": None,
        "per_class": None,
        "select": "all",
        "transfer_size": 200,
        "seed": 0,
        "epochs": 1,
        "batch_size": 64,
        "lr": 0.001,
        "test_accuracy": round(rng.uniform(0.5, 0.9), 4),
        "per_class_accuracy": [0.7] * 10,
        "missing_class_accuracy": None,
        "class_names": CLASS_NAMES,
        "wall_time_s": 1.0,
        "samples_per_s": 100.0,
        "device": "cpu",
        "run_dir": "students/x",
    }
    row.update(kw)
    if row["missing_class"] is not None:
        row["missing_class_name"] = CLASS_NAMES[row["missing_class"]]
        row.setdefault("missing_class_accuracy", None)
        if row["missing_class_accuracy"] is None:
            row["missing_class_accuracy"] = round(rng.uniform(0.0, 0.95), 4)
    return row


def make_study(folder: Path, *, runs: dict[str, Path] | None = None, seeds=SEEDS) -> dict:
    """study.json, teachers.jsonl and results.jsonl of a study with every experiment."""
    rng = random.Random(7)
    runs = runs or {}
    spec = {
        "name": "synthetic",
        "dataset": "fashion-mnist",
        "description": "A made-up study.",
        "limit": None,
        "seeds": list(seeds),
        "loss": {"T": [3.0, 9.0], "alpha": 0.9, "t_squared": True},
        "student": {"epochs": 1, "batch_size": 64, "lr": 0.001, "optimizer": "adam"},
        "teachers": [
            {
                "name": "small",
                "capacity": "small",
                "batch_size": 64,
                "epochs": 2,
                "lr": 0.001,
                "optimizer": "adam",
                "seed": 0,
            },
            {
                "name": "large",
                "capacity": "large",
                "batch_size": 64,
                "epochs": 12,
                "lr": 0.001,
                "optimizer": "adam",
                "seed": 0,
            },
        ],
        "experiments": {
            "missing_class": {
                "teachers": ["small", "large"],
                "student": "general",
                "classes": [0, 1],
                "T": [3.0, 9.0],
                "label_smoothing": [0.1, 0.5],
                "epochs": 1,
            },
            "transfer_set": {
                "teachers": ["small", "large"],
                "student": "baseline",
                "per_class": [5, 10, 50],
                "select": ["entropy", "random"],
                "T": [9.0],
                "epochs": 1,
            },
            "temperature": {
                "teachers": ["small", "large"],
                "student": "baseline",
                "T": [3.0, 9.0],
                "epochs": 1,
            },
            "batch_sweep": {
                "capacity": "large",
                "batch_sizes": [16, 64, 4096],
                "epochs": [1, 3],
                "lr": 0.001,
                "seed": 0,
                "T": 9.0,
            },
            "noise": {
                "teachers": ["large"],
                "student": "general",
                "noise": ["normal:0.05"],
                "T": [9.0],
                "label_smoothing": [0.5],
                "epochs": 1,
            },
            "examples": {"teachers": ["small"], "T": 9.0, "count": 3},
            "projection": {"teachers": ["small", "large"], "classes": [0, 1, 2], "per_class": 5},
        },
    }
    teachers = [
        teacher_row(
            "small", "teacher", "small", 64, 2, 0.8, str(runs.get("small", "teachers/none"))
        ),
        teacher_row(
            "large", "teacher", "large", 64, 12, 0.2, str(runs.get("large", "teachers/none"))
        ),
    ]
    for b in (16, 64, 4096):
        for e in (1, 3):
            level = 0.1 + 0.2 * math.log2(b) / 12 - 0.05 * e
            teachers.append(teacher_row(f"large-b{b}-e{e}", "sweep", "large", b, e, level))
    rows = []
    for seed in seeds:
        for t in ("small", "large"):
            tk = {"teacher": t, "teacher_capacity": t, "seed": seed}
            for T in (3.0, 9.0):
                for k in (0, 1):
                    rows.append(student_row(rng, ["missing_class"], T=T, missing_class=k, **tk))
                rows.append(
                    student_row(rng, ["temperature", "transfer_set"], T=T, student="baseline", **tk)
                )
            for n in (5, 10, 50):
                for sel in ("entropy", "random"):
                    rows.append(
                        student_row(
                            rng,
                            ["transfer_set"],
                            T=9.0,
                            student="baseline",
                            per_class=n,
                            select=sel,
                            **tk,
                        )
                    )
        for a in (0.1, 0.5):
            for k in (0, 1):
                rows.append(
                    student_row(
                        rng,
                        ["missing_class"],
                        label_smoothing=a,
                        missing_class=k,
                        seed=seed,
                        missing_class_accuracy=0.0,
                    )
                )
        rows.append(
            student_row(rng, ["noise"], teacher="large", T=9.0, noise="normal:0.05", seed=seed)
        )
        rows.append(student_row(rng, ["noise"], teacher="large", T=9.0, seed=seed))
        # its clean counterpart comes from another experiment (the temperature sweep)
        rows.append(
            student_row(
                rng,
                ["noise"],
                teacher="small",
                T=9.0,
                student="baseline",
                noise="normal:0.05",
                seed=seed,
            )
        )
        rows.append(
            student_row(rng, ["noise"], label_smoothing=0.5, noise="normal:0.05", seed=seed)
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.json").write_text(json.dumps(spec))
    (folder / "teachers.jsonl").write_text("".join(json.dumps(t) + "\n" for t in teachers))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"spec": spec, "teachers": teachers, "results": rows}


def expected_cell(values, seeds=3) -> str:
    xs = [v * 100 for v in values]
    text = f"{statistics.fmean(xs):.1f}"
    if len(xs) > 1:
        text += f" ± {statistics.stdev(xs):.1f}"
    if len(xs) < seeds:
        text += f" (n={len(xs)})"
    return text


def table_row(md: str, first_cell: str, after: str) -> list[str]:
    """The cells of the first Markdown table row starting with `first_cell` after `after`."""
    start = md.index(after)
    for line in md[start:].splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip().strip("|").split(" | ")]
    raise AssertionError(f"no row {first_cell!r} after {after!r}")


def linked_files(md: str) -> list[str]:
    return re.findall(r"\]\(([^)#]+)\)", md)


# ------------------------------------------------------------------ the full study
@pytest.fixture(scope="module")
def full_report(tiny_data_root, tmp_path_factory):
    """A study with every experiment and two real (tiny) teacher runs, reported once."""
    helpers = _load_examples_module()
    folder = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBKD_DATA", str(tiny_data_root))
        runs = {
            "small": helpers.make_teacher_run(
                folder / "teachers" / "small", capacity="small", epochs=0
            ),
            "large": helpers.make_teacher_run(
                folder / "teachers" / "large", capacity="small", seed=1, epochs=0
            ),
        }
        rel = {k: v.relative_to(folder) for k, v in runs.items()}
        data = make_study(folder, runs=rel)
        path = write_report(folder, labels={"small": "small teacher (b64, e2)"})
    return path, path.read_text(), data


def test_report_path_and_every_figure_linked_and_real(full_report):
    path, md, _ = full_report
    assert path.name == "report.md" and path.parent.name == "report"
    links = linked_files(md)
    figures = sorted(
        p.name for p in path.parent.iterdir() if not p.name.startswith(("report.md", "."))
    )
    assert sorted(set(links)) == figures, "every figure is linked, every link exists"
    for name in figures:
        assert (path.parent / name).read_bytes().startswith(SIGNATURES["png"]), name
    for stem in (
        "missing_class_small",
        "missing_class_large",
        "missing_class_label_smoothing",
        "entropy_vs_T",
        "entropy_per_class_small",
        "label_smoothing_entropy",
        "entropy_hypothesis",
        "transfer_set_T9",
        "sweep_entropy_vs_batch_size",
        "sweep_entropy_vs_epochs",
        "sweep_entropy_vs_T",
        "student_accuracy_vs_T",
        "examples_small",
        "projections",
    ):
        assert f"{stem}.png" in figures, stem
    assert "_Skipped" not in md


def test_missing_class_tables_hold_mean_and_std_over_seeds(full_report):
    _, md, data = full_report
    rows = data["results"]
    for teacher, title in (("small", "small teacher (b64, e2)"), ("large", "large")):
        after = f"teacher {title}: accuracy (%) on the missing class**"
        header = table_row(md, "missing class", after)
        assert header == ["missing class", "T=3", "T=9"]
        for k in (0, 1):
            cells = table_row(md, CLASS_NAMES[k], after)
            for col, T in ((1, 3.0), (2, 9.0)):
                values = [
                    r["missing_class_accuracy"]
                    for r in rows
                    if r["teacher"] == teacher and r["T"] == T and r["missing_class"] == k
                ]
                assert len(values) == 3
                assert cells[col] == expected_cell(values), (teacher, k, T)
    ls = table_row(md, "missing class", "label smoothing: accuracy (%) on the missing class")
    assert ls == ["missing class", "A=0.1", "A=0.5"]
    assert table_row(md, "Trouser", "label smoothing: accuracy")[1:] == ["0.0 ± 0.0"] * 2


def test_transfer_set_table_and_full_data_reference(full_report):
    _, md, data = full_report
    rows = data["results"]
    after = "## Entropy-selected transfer sets"
    header = table_row(md, "examples per class", after)
    assert header[1:] == [
        "small teacher (b64, e2), entropy",
        "small teacher (b64, e2), random",
        "large, entropy",
        "large, random",
    ]
    got = dict(zip(header, table_row(md, "10", after), strict=True))
    entropy_10 = [
        r["test_accuracy"]
        for r in rows
        if r["teacher"] == "large" and r["per_class"] == 10 and r["select"] == "entropy"
    ]
    assert got["large, entropy"] == expected_cell(entropy_10)
    full = [
        r["test_accuracy"]
        for r in rows
        if r["teacher"] == "large"
        and r["T"] == 9.0
        and r["per_class"] is None
        and r["student"] == "baseline"
        and r["missing_class"] is None
        and r["noise"] is None
    ]
    assert len(full) == 3
    last = dict(zip(header, table_row(md, "all", after), strict=True))
    assert last["large, entropy"] == last["large, random"] == expected_cell(full)


def test_temperature_noise_and_sweep_tables(full_report):
    _, md, data = full_report
    rows = data["results"]
    cells = table_row(md, "3", "## Student accuracy vs temperature")
    small_T3 = [
        r["test_accuracy"]
        for r in rows
        if r["teacher"] == "small" and r["T"] == 3.0 and "temperature" in r["experiments"]
    ]
    assert cells[1] == expected_cell(small_T3)

    noise = table_row(md, "large", "## Noise in soft labels")
    assert noise[:3] == ["large", "9", "general"]
    clean = [
        r["test_accuracy"]
        for r in rows
        if "noise" in r["experiments"] and r["teacher"] == "large" and r["noise"] is None
    ]
    noisy = [
        r["test_accuracy"]
        for r in rows
        if "noise" in r["experiments"] and r["teacher"] == "large" and r["noise"]
    ]
    assert noise[3:] == [expected_cell(clean), expected_cell(noisy)]
    small = table_row(md, "small teacher (b64, e2)", "## Noise in soft labels")
    assert small[:3] == ["small teacher (b64, e2)", "9", "baseline"]
    clean_small = [
        r["test_accuracy"]
        for r in rows
        if "temperature" in r["experiments"] and r["teacher"] == "small" and r["T"] == 9.0
    ]
    assert small[3] == expected_cell(clean_small)
    ls_noise = table_row(md, "label smoothing A=0.5", "## Noise in soft labels")
    assert ls_noise[3] == "–"

    sweep = {t["name"]: t for t in data["teachers"]}
    cells = table_row(md, "4096", "Mean entropy at T=9")
    assert cells[1] == f"{sweep['large-b4096-e1']['mean_entropy'][8]:.4f}"
    assert cells[2] == f"{sweep['large-b4096-e3']['mean_entropy'][8]:.4f}"


def test_entropy_tables_and_hypothesis(full_report):
    _, md, data = full_report
    small = data["teachers"][0]
    cells = table_row(md, "9", "## Soft-label entropy vs temperature")
    assert cells[1] == f"{small['mean_entropy'][8]:.4f}"
    assert table_row(md, "0.5", "label smoothing A")[1] == f"{label_smoothing_entropy(0.5, 10):.4f}"
    assert table_row(md, "ln C", "label smoothing A")[1] == f"{math.log(10):.4f}"
    hyp = table_row(md, "small teacher (b64, e2)", "## Entropy form of the soft-label hypothesis")
    mc = [
        r["missing_class_accuracy"]
        for r in data["results"]
        if r["teacher"] == "small" and r["missing_class"] is not None and r["T"] == 9.0
    ]
    assert hyp[4] == f"{small['mean_entropy'][8]:.4f}"
    assert hyp[5] == f"{statistics.fmean(mc) * 100:.1f}"
    assert "large-b16-e1" in md  # sweep teachers on the categorical axis too


def test_report_reads_well_on_github(full_report):
    _, md, _ = full_report
    assert md.startswith("# synthetic: reproduction report\n")
    assert "**Contents:**" in md and "(#missing-class-tables-51-57)" in md
    assert "## Missing class (tables 5.1-5.7)" in md
    assert md.count("<details>") == md.count("</details>") == 4  # one per experiment with students
    for line in md.splitlines():  # every table row has as many cells as its header
        assert not line.startswith("|") or line.endswith("|"), line


# ------------------------------------------------------------------ partial studies
def _only(folder: Path, experiments: set[str], *, seeds=SEEDS, drop_rows=None) -> None:
    """A study with only `experiments`; its teachers have no entropies (fewer figures to draw)."""
    data = make_study(folder, seeds=seeds)
    teachers = [{**t, "entropy_T": [], "mean_entropy": []} for t in data["teachers"][:2]]
    (folder / "teachers.jsonl").write_text("".join(json.dumps(t) + "\n" for t in teachers))
    spec = data["spec"]
    spec["experiments"] = {k: v for k, v in spec["experiments"].items() if k in experiments}
    rows = [r for r in data["results"] if set(r["experiments"]) & experiments]
    if drop_rows:
        rows = [r for r in rows if not drop_rows(r)]
    (folder / "study.json").write_text(json.dumps(spec))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_absent_experiments_are_skipped_with_a_note_and_svg_figures(tmp_path):
    _only(tmp_path, {"temperature"})
    (tmp_path / "teachers.jsonl").unlink()
    path = write_report(tmp_path, out=tmp_path / "out", fmt="svg")
    md = path.read_text()
    assert path == tmp_path / "out" / "report.md"
    for note in (
        "_Skipped: the study has no missing_class experiment._",
        "_Skipped: the study has no transfer_set experiment._",
        "_Skipped: the study has no batch_sweep experiment._",
        "_Skipped: the study has no noise experiment._",
        "_Skipped: the study has no examples experiment._",
        "_Skipped: the study has no projection experiment._",
        "_Skipped: teachers.jsonl has no study teacher yet._",
    ):
        assert note in md, note
    figures = [p for p in path.parent.iterdir() if p.suffix == ".svg"]
    assert [p.name for p in figures] == ["student_accuracy_vs_T.svg"]
    assert figures[0].read_bytes().startswith(SIGNATURES["svg"])
    assert "![" in md and "(student_accuracy_vs_T.svg)" in md


def test_a_new_report_removes_the_figures_of_the_last_one_and_nothing_else(tmp_path):
    _only(tmp_path, {"temperature", "transfer_set"})
    out = tmp_path / "report"
    mine = out / "notes.png"
    out.mkdir()
    mine.write_bytes(b"the user's own file")
    write_report(tmp_path)
    assert (out / "transfer_set_T9.png").exists()
    _only(tmp_path, {"temperature"})
    md = write_report(tmp_path, fmt="svg").read_text()
    left = sorted(p.name for p in out.iterdir())
    assert left == [".report-figures.json", "notes.png", "report.md", "student_accuracy_vs_T.svg"]
    assert linked_files(md) == ["student_accuracy_vs_T.svg"]


def test_declared_experiment_without_rows_yet_and_missing_seeds(tmp_path):
    # missing-class declared, no row yet; temperature rows of seed 2 not there yet
    _only(
        tmp_path,
        {"missing_class", "temperature"},
        drop_rows=lambda r: "missing_class" in r["experiments"] or r["seed"] == 2,
    )
    path = write_report(tmp_path, fmt="pdf")
    md = path.read_text()
    assert "_Skipped: results.jsonl has no missing-class student yet._" in md
    assert "(n=2)" in table_row(md, "3", "## Student accuracy vs temperature")[1]
    assert "[" in md and "(student_accuracy_vs_T.pdf)" in md and "![" not in md
    pdf = path.parent / "student_accuracy_vs_T.pdf"
    assert pdf.read_bytes().startswith(SIGNATURES["pdf"])


def test_missing_class_both_loss_conventions_get_a_table_each(tmp_path):
    # the same teacher distilled with and without the T^2 factor (issue: "show one table both ways")
    _only(tmp_path, {"missing_class"})
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    flipped = [
        {**r, "t_squared": False, "missing_class_accuracy": 0.25}
        for r in rows
        if r["teacher"] == "large"
    ]
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in flipped))
    md = write_report(tmp_path).read_text()
    after = "teacher large (t_squared=false): accuracy (%) on the missing class**"
    assert table_row(md, "Trouser", after)[1:] == ["25.0 ± 0.0", "25.0 ± 0.0"]
    assert "teacher large (t_squared=true): accuracy" in md
    assert "(missing_class_large_t_squared-false.png)" in md


def test_examples_and_projection_without_runs_say_why(tmp_path, tiny_data, capsys):
    # a copy of the study folder without its teachers/: report.md says what it left out where,
    # and so does stderr, one line each, after report.md is written (exit status stays 0)
    _only(tmp_path, {"examples", "projection"})
    capsys.readouterr()
    path = write_report(tmp_path)
    md = path.read_text()
    assert "_Skipped: teacher small:" in md and "not a run directory" in md
    err = capsys.readouterr().err.splitlines()
    left_out = [line for line in err if line.startswith(f"report: left out of {path}: ")]
    assert len(left_out) == 3, err  # examples: small; projection: small and large
    sections = ("Highest-entropy training images", "Penultimate-layer projections")
    for line, (section, teacher) in zip(
        left_out,
        [(sections[0], "small"), (sections[1], "small"), (sections[1], "large")],
        strict=True,
    ):
        assert f": {section} (figures " in line and f": teacher {teacher}: " in line, line
        assert "not a run directory" in line, line
    seen = []
    write_report(tmp_path, warn=seen.append)  # a caller of its own takes the lines instead
    assert len(seen) == 3 and not capsys.readouterr().err.count("left out")


def test_a_complete_report_says_nothing_on_stderr(tmp_path, capsys):
    _only(tmp_path, {"temperature"})
    capsys.readouterr()
    write_report(tmp_path)
    assert "left out" not in capsys.readouterr().err


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="study.json not found: pass the folder"):
        write_report(tmp_path)
    make_study(tmp_path)
    with pytest.raises(ValueError, match="figure format must be png, pdf or svg, got 'jpg'"):
        write_report(tmp_path, fmt="jpg")
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"study": "synthetic", "experi\n')
    with pytest.raises(ValueError, match=r"results.jsonl line \d+ is not valid JSON") as err:
        write_report(tmp_path)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ the small pieces
def test_mean_std_and_cells():
    assert mean_std([0.5, None, float("nan"), 0.7]) == pytest.approx((0.6, math.sqrt(0.02), 2))
    assert mean_std([]) == (None, None, 0)
    assert format_cell([0.919]) == "91.9"
    assert format_cell([0.9, 0.8]) == f"85.0 ± {statistics.stdev([90, 80]):.1f}"
    assert format_cell([0.9, 0.8], seeds=3) == "85.0 ± 7.1 (n=2)"
    assert format_cell([None]) == "–"
    assert markdown_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n| --- | ---: |\n| x\\|y | 1 |"


def test_without_matplotlib_the_report_keeps_its_tables_and_names_the_missing_figures(
    tmp_path, monkeypatch, capsys
):
    from rbkd.study.report import document

    _only(tmp_path, {"temperature", "transfer_set"})
    monkeypatch.setattr(document, "_have_matplotlib", lambda: False)
    path = write_report(tmp_path)
    md = path.read_text()
    assert "±" in table_row(md, "3", "## Student accuracy vs temperature")[1]
    assert "not drawn, matplotlib is not installed (pip install 'rbkd[plots]')" in md
    assert capsys.readouterr().err.count("every figure: not drawn, matplotlib") == 1
    assert linked_files(md) == []
    assert not [p for p in path.parent.iterdir() if p.suffix == ".png"]


# ------------------------------------------------------------------ what the figures show
@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib Figure behind every figure file the report draws, by file name."""
    from rbkd.analysis import plots

    figures = {}
    save = plots._save

    def capture(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def _titles(fig) -> list[str]:
    return [fig.get_suptitle(), *[ax.get_title() for ax in fig.axes]]


def test_transfer_set_figure_tells_the_selections_apart_and_says_its_axis_is_log(tmp_path, drawn):
    _only(tmp_path, {"transfer_set", "temperature"})
    md = write_report(tmp_path).read_text()
    ax = drawn["transfer_set_T9.png"].axes[0]
    assert ax.get_xlabel() == "training examples per class (log scale)"  # 5, 10, 50
    lines = {line.get_label(): line for line in ax.get_lines()}
    for teacher in ("small", "large"):
        entropy, random_ = lines[f"{teacher}, entropy"], lines[f"{teacher}, random"]
        assert (entropy.get_linestyle(), random_.get_linestyle()) == ("-", "--")
        assert entropy.get_marker() != random_.get_marker()  # apart even where lines overlap
    assert "(solid, circles)" in md and "(dashed, squares)" in md


def test_entropy_figures_of_a_collapsed_teacher_keep_the_zero_to_ln_c_axis(tmp_path, drawn):
    _only(tmp_path, {"temperature"})
    ln_c = math.log(10)
    flat = teacher_row("large", "teacher", "large", 4096, 1, 1.0)
    flat["mean_entropy"] = [ln_c - 0.0015 / t for t in ENTROPY_T]  # 2.3011 ... 2.3025
    flat["per_class_entropy"] = [[h] * 10 for h in flat["mean_entropy"]]
    (tmp_path / "teachers.jsonl").write_text(json.dumps(flat) + "\n")
    write_report(tmp_path)
    for name in ("entropy_per_class_large.png", "entropy_vs_T.png"):
        low, high = drawn[name].axes[0].get_ylim()
        assert low == 0.0 and ln_c < high <= 1.06 * ln_c, (name, low, high)


def test_a_sweep_with_one_epoch_value_draws_no_one_point_line_and_says_1_epoch(tmp_path, drawn):
    data = make_study(tmp_path)
    spec = data["spec"]
    spec["experiments"] = {"batch_sweep": {**spec["experiments"]["batch_sweep"], "epochs": [1]}}
    teachers = [t for t in data["teachers"] if t["role"] == "teacher" or t["epochs"] == 1]
    (tmp_path / "study.json").write_text(json.dumps(spec))
    (tmp_path / "teachers.jsonl").write_text("".join(json.dumps(t) + "\n" for t in teachers))
    (tmp_path / "results.jsonl").write_text("")
    path = write_report(tmp_path)
    md = path.read_text()
    assert "sweep_entropy_vs_epochs.png" not in drawn
    assert not (path.parent / "sweep_entropy_vs_epochs.png").exists()
    assert "_No entropy-vs-epochs figure: the sweep has one number of epochs (1 epoch)._" in md
    assert {"sweep_entropy_vs_batch_size.png", "sweep_entropy_vs_T.png"} <= set(drawn)
    assert "1 epochs" not in md
    for name, fig in drawn.items():
        for title in _titles(fig):
            assert "1 epochs" not in title, (name, title)
    assert (
        "large teacher, 1 epoch: entropy vs T"
        in drawn["sweep_entropy_vs_T.png"].axes[0].get_title()
    )
    low, high = drawn["sweep_entropy_vs_batch_size.png"].axes[0].get_ylim()
    assert low == 0.0 and high == pytest.approx(1.05 * math.log(10))


def test_projection_panel_titles_count_epochs_in_words(tmp_path, tiny_data, drawn):
    run = _load_examples_module().make_teacher_run(tmp_path / "teachers" / "t", epochs=0)
    _only(tmp_path, {"projection"})
    rows = [json.loads(line) for line in (tmp_path / "teachers.jsonl").read_text().splitlines()]
    rows = [{**t, "epochs": 1, "run_dir": str(run.relative_to(tmp_path))} for t in rows]
    (tmp_path / "teachers.jsonl").write_text("".join(json.dumps(t) + "\n" for t in rows))
    write_report(tmp_path)
    titles = [ax.get_title() for ax in drawn["projections.png"].axes]
    assert titles[0].startswith("small (small, batch 64, 1 epoch)\n"), titles
    assert not any("1 epochs" in t for t in titles)


def test_study_report_command_says_on_stderr_what_it_left_out(tmp_path, tiny_data):
    from rbkd.cli.app import app
    from typer.testing import CliRunner

    _only(tmp_path, {"examples", "projection", "temperature"})
    result = CliRunner().invoke(app, ["study", "report", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = tmp_path / "report" / "report.md"
    assert f"report: {report}" in result.stdout.replace("\n", "")
    left_out = [line for line in result.stderr.splitlines() if "left out of" in line]
    assert len(left_out) == 3, result.stderr
    assert all("teacher " in line and "not a run directory" in line for line in left_out)
    assert "left out" not in result.stdout
