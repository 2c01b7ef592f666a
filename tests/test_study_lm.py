"""Language-model studies (`[study] kind = "lm"`, rbkd.study.lm_*): a quick study end to end on a
tiny text folder with tiny GPT-2 teachers and students (teachers, one store per teacher read at
a smaller k, sampled stores, every student mode, two seeds), its tables and report; a rerun trains
nothing; the KL to the teacher against a float64 oracle; bytes per token; bad files in one line."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers import shipped_studies
from lm_fixtures import write_tiny_corpus

pytest.importorskip("transformers")

from rbkd.study.lm_cells import mode_bytes, validation_kl  # noqa: E402
from rbkd.study.lm_runner import run_lm_study  # noqa: E402
from rbkd.study.schema import StudyFileError, load_study  # noqa: E402

STUDY = """
[study]
name = "tiny-lm"
kind = "lm"
corpus = "texts"
vocab_size = 300
seeds = [0]

[data]
context = 16
student_tokens = 1200
eval_tokens = 128

[capture]
k = 8
T = [1, 2, 4]
batch_size = 8

[student]
model = { n_layer = 1, n_embd = 16, n_head = 2 }
steps = 3
batch_size = 4
lr = 3e-3
warmup_steps = 1
eval_every = 3

[[teacher]]
name = "long"
model = { n_layer = 1, n_embd = 32, n_head = 2 }
steps = 12
batch_size = 8
warmup_steps = 2
eval_every = 12

[[teacher]]
name = "short"
model = { n_layer = 1, n_embd = 32, n_head = 2 }
steps = 3
batch_size = 8
warmup_steps = 1
eval_every = 3

[grid]
k = [4]
T = [2]
"""


def _write(folder, text=STUDY):
    write_tiny_corpus(folder / "texts", files=16, sentences=20)
    path = folder / "study.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmstudy")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root / "cache"))  # the tokenizer and tokens: this test's own
    path = _write(root)
    study = load_study(path)
    out = root / "out"
    first = run_lm_study(study, out, device="cpu", source=path, log=lambda line: None)
    tables = {n: (out / n).read_bytes() for n in ("results.csv", "results.jsonl", "stores.jsonl")}
    second = run_lm_study(load_study(path), out, device="cpu", source=path, log=lambda line: None)
    yield {"root": root, "out": out, "study": study, "first": first, "second": second,
           "tables": tables}  # fmt: skip
    mp.undo()


def _rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_every_cell_runs_once_and_a_rerun_trains_nothing(ran):
    # 2 teachers; per teacher a top-8 store and a 4-sample store (its own: 4 is not the captured
    # k); students: hard + per teacher (online + 3 store modes at k = 4) at one T, one seed
    assert len(ran["first"].cells) == 2 + 4 + (1 + 2 * (1 + 3))
    assert len(ran["first"].trained) == len(ran["first"].cells)
    # teacher by teacher: its training, its stores, its students; the hard-label one last
    kinds = [(c.kind, c.teacher) for c in ran["first"].cells]
    assert kinds[:4] == [
        ("teacher", "long"),
        ("store", "long"),
        ("store", "long"),
        ("student", "long"),
    ]
    assert kinds[-1] == ("student", None) and ran["first"].trained == [
        c.key for c in ran["first"].cells
    ]
    assert ran["second"].trained == []
    assert all(s.status == "done" for s in ran["second"].states.values())
    for name, data in ran["tables"].items():
        assert (ran["out"] / name).read_bytes() == data, name


def test_a_cell_needs_every_cell_it_reads(ran):
    """What a runner waits for before it claims a cell: a store its teacher, a store student its
    store, an online student its teacher, and a hard-label student every teacher (its KL to
    each is measured), so that a second runner never starts one early."""
    cells = ran["first"].cells
    teachers = {c.teacher: c.key for c in cells if c.kind == "teacher"}
    for c in cells:
        if c.kind == "store" or (c.kind == "student" and c.inputs["mode"] == "online"):
            assert c.needs == [teachers[c.teacher]], c.name
        elif c.kind == "student" and c.inputs["mode"] == "hard":
            assert sorted(c.needs) == sorted(teachers.values()), c.name
        elif c.kind == "student":
            assert len(c.needs) == 1 and c.needs[0] == c.inputs["source"], c.name


def test_the_table_has_every_student_and_its_numbers(ran):
    rows = _rows(ran["out"])
    # a hard-label student appears under each teacher (its KL to each); the others once
    assert len(rows) == 2 + 2 * (1 + 3)
    for r in rows:
        for col in ("val_ce_loss", "val_perplexity", "kl_to_teacher", "distill_tokens_per_s",
                    "wall_s"):  # fmt: skip
            assert math.isfinite(float(r[col])), (col, r)
        assert math.isclose(
            float(r["val_perplexity"]), math.exp(float(r["val_ce_loss"])), rel_tol=1e-6
        )
        assert float(r["kl_to_teacher"]) >= 0
        if r["mode"] in ("renormalize", "bucket", "sampled"):
            assert float(r["capture_tokens_per_s"]) > 0
            assert int(r["bytes_per_token"]) == mode_bytes(r["mode"], int(r["k"]), "bfloat16")
    modes = {(r["teacher"], r["mode"], r["k"]) for r in rows}
    assert ("short", "sampled", "4") in modes and ("long", "bucket", "4") in modes
    hard = [r for r in rows if r["mode"] == "hard"]
    assert {r["teacher"] for r in hard} == {"long", "short"}
    assert hard[0]["val_ce_loss"] == hard[1]["val_ce_loss"]  # one run, two KLs
    assert hard[0]["kl_to_teacher"] != hard[1]["kl_to_teacher"]


def test_the_smaller_k_is_read_from_the_one_top_k_store(ran):
    import json

    stores = [json.loads(line) for line in (ran["out"] / "stores.jsonl").read_text().splitlines()]
    assert sorted((s["teacher"], s["k"], s["samples"]) for s in stores) == [
        ("long", 1, 4), ("long", 8, 0), ("short", 1, 4), ("short", 8, 0)]  # fmt: skip
    for s in stores:
        if s["k"] == 8:
            # the entropy of softmax(z / T) does not decrease with T, and stays below ln V
            h = s["mean_entropy"]
            assert h == sorted(h) and h[-1] <= s["max_entropy"] + 1e-6
            mass = s["topk_mass"][0]  # [T][k], T = 1: nondecreasing in k, at most 1
            assert mass == sorted(mass) and 0 < mass[0] and mass[-1] <= 1 + 1e-6
    students = [
        json.loads(line) for line in (ran["out"] / "results.jsonl").read_text().splitlines()
    ]
    bucket4 = [s for s in students if s["mode"] == "bucket" and s["k"] == 4]
    top = {s["key"] for s in stores if s["k"] == 8}
    assert bucket4 and all(s["store_key"] in top for s in bucket4)


def test_the_report_is_drawn_from_the_tables(ran):
    report = (ran["out"] / "report" / "report.md").read_text()
    for figure in ("quality_vs_bytes", "entropy_vs_T", "topk_mass_vs_k"):
        assert f"({figure}.png)" in report
        assert (ran["out"] / "report" / f"{figure}.png").stat().st_size > 1000
    assert "top-k + exact tail" in report and "sampled (unbiased)" in report
    assert f"{len(ran['first'].cells)} of {len(ran['first'].cells)} cells finished" in report


def test_the_kl_is_the_float64_oracle(ran, tmp_path):
    from rbkd.lm.train.models import build_model, model_config, save_hf_folder
    from rbkd.study.lm_data import load_lm_data

    data = load_lm_data(ran["study"])
    a = build_model(model_config({"n_layer": 1, "n_embd": 16, "n_head": 2}, 300, 16), 1)
    b = build_model(model_config({"n_layer": 1, "n_embd": 16, "n_head": 2}, 300, 16), 2)
    save_hf_folder(a, tmp_path / "a")
    save_hf_folder(b, tmp_path / "b")
    got = validation_kl(tmp_path / "a", tmp_path / "b", data.validation, 16, 48, "cpu")
    same = validation_kl(tmp_path / "a", tmp_path / "a", data.validation, 16, 48, "cpu")
    x = torch.stack([data.validation.tokens(i * 16, i * 16 + 17) for i in range(3)])
    with torch.no_grad():
        ls = torch.log_softmax(a.double()(input_ids=x[:, :-1]).logits, -1)
        lt = torch.log_softmax(b.double()(input_ids=x[:, :-1]).logits, -1)
    want = torch.nn.functional.kl_div(ls.flatten(0, 1), lt.flatten(0, 1), log_target=True,
                                      reduction="sum") / 48  # fmt: skip
    assert got["tokens"] == 48
    assert math.isclose(got["kl"], float(want), rel_tol=1e-4)
    ce = -ls.flatten(0, 1)[torch.arange(48), x[:, 1:].reshape(-1)].mean()
    assert math.isclose(got["student_ce"], float(ce), rel_tol=1e-4)
    assert abs(same["kl"]) < 1e-6 and math.isclose(same["student_ce"], same["teacher_ce"])


def test_bytes_per_token_per_mode():
    # ids int32 + bf16 logits = 6 bytes per kept id; bucket adds logz at T (4); sampled keeps
    # ids, counts and logits (10 bytes) and logz at T and at the sampling T (8); every row 8
    assert mode_bytes("renormalize", 32, "bfloat16") == 32 * 6 + 8
    assert mode_bytes("bucket", 128, "bfloat16") == 128 * 6 + 4 + 8
    assert mode_bytes("sampled", 8, "float32") == 8 * 12 + 8 + 8
    assert (
        mode_bytes("hard", None, "bfloat16") == 0 and mode_bytes("online", None, "bfloat16") is None
    )


def test_a_limit_gives_other_cells(ran):
    from rbkd.study.lm_runner import prepare_lm

    study = load_study(ran["root"] / "study.toml")
    study["limit"] = 600
    quick, _ = prepare_lm(study, ran["root"] / "quick", "cpu")
    assert not {c.key for c in quick.cells} & {c.key for c in ran["first"].cells}
    # the student tokens halved (1200 -> 600): every run's steps halved, teachers keep their ratio
    steps = {
        c.teacher: c.inputs["train_config"]["steps"] for c in quick.cells if c.kind == "teacher"
    }
    assert steps == {"long": 6, "short": 2}  # 12 and 3 steps; at least 2
    teacher = quick.cells[0]
    assert teacher.inputs["train"]["tokens"] == 600
    student = next(c for c in quick.cells if c.kind == "student")
    assert (
        student.inputs["tokens"]["tokens"] == 600 and student.inputs["train_config"]["steps"] == 2
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("k = [4]", "k = [4, 16]"), "larger than the captured k = 8"),
        (("T = [2]", "T = [3]"), "not in the captured grid"),
        (("eval_tokens = 128", "eval_token = 128"), "data.eval_token: unknown key"),
        (('name = "short"', 'name = "long"'), "two teachers are named 'long'"),
        (("[grid]", '[grid]\nmodes = ["hard", "distilled"]'), "no mode 'distilled'"),
        (("lr = 3e-3", "lr = -1.0"), "student.lr: lr must be a finite number > 0"),
    ],
)
def test_a_bad_study_file_is_one_line(tmp_path, change, message):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.replace(*change, 1))
    with pytest.raises(StudyFileError) as e:
        load_study(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(path) in str(e.value)


def test_the_command_line_runs_nothing_again_and_redraws_the_report(ran):
    from rbkd.cli.app import app
    from typer.testing import CliRunner

    path, out = ran["root"] / "study.toml", ran["out"]
    cli = CliRunner()
    dry = cli.invoke(app, ["study", "run", str(path), "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    total = len(ran["first"].cells)
    assert f"0 of {total} runs to do" in dry.output
    assert "[done] teacher long: 12 steps x 8 x 16" in dry.output
    again = cli.invoke(app, ["study", "run", str(path), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert f"nothing to run: all {total} runs of tiny-lm are done" in again.output
    report = cli.invoke(app, ["study", "report", str(out), "--format", "svg"])
    assert report.exit_code == 0, report.output
    assert (out / "report" / "quality_vs_bytes.svg").is_file()
    assert "(quality_vs_bytes.svg)" in (out / "report" / "report.md").read_text()


def test_a_cell_without_its_mark_is_finished_again_without_retraining(ran):
    import json

    cell = next(
        c for c in ran["first"].cells if c.kind == "student" and c.inputs["mode"] == "bucket"
    )
    mark = cell.folder / "cell.json"
    before = json.loads(mark.read_text())
    weights = cell.folder / "run" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    mark.unlink()  # a kill after the distillation, before its KL was recorded
    path = ran["root"] / "study.toml"
    again = run_lm_study(
        load_study(path), ran["out"], device="cpu", source=path, log=lambda line: None
    )
    assert again.trained == [cell.key]
    assert weights.stat().st_mtime_ns == stamp  # the distillation was reused, not redone
    after = json.loads(mark.read_text())
    for name in ("val_ce_loss", "kl_to_teacher", "bytes_per_token"):
        assert after[name] == before[name], name


def test_two_runners_share_the_study_and_run_every_cell_once(ran, tmp_path):
    """Two `rbkd study run` processes on one folder: each cell trained by one of them, stores and
    students only after what they read, the tables those of a single runner (up to timing and
    the last bits of a thread count), every claim given back."""
    import json
    import os
    import subprocess
    import sys

    from rbkd.locking import CLAIMS_DIR

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "rbkd.cli.app", "study", "run", str(ran["root"] / "study.toml"),
           "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress",
           "--no-report", "--json"]  # fmt: skip
    env = {**os.environ, "XDG_CACHE_HOME": str(ran["root"] / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ran["root"]) for _ in range(2)]  # fmt: skip
    summaries = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr
        summaries.append(json.loads(stdout))
    every = sorted(c.key for c in ran["first"].cells)
    ran_here = [[r["key"] for r in s["runs"] if r["status"] == "ran"] for s in summaries]
    assert sorted(k for keys in ran_here for k in keys) == every  # each cell trained once
    for s in summaries:
        assert s["to_do"] == 0 and s["ran"] + s["ran_elsewhere"] == len(every)
    ref, got = _rows(ran["out"]), _rows(out)
    assert [(r["teacher"], r["mode"], r["key"]) for r in got] == [
        (r["teacher"], r["mode"], r["key"]) for r in ref
    ]
    for a, b in zip(ref, got, strict=True):
        for col in ("val_ce_loss", "kl_to_teacher", "bytes_per_token"):
            if a[col] == "" or b[col] == "":  # no bytes for hard labels and the online teacher
                assert a[col] == b[col], col
            else:
                assert float(b[col]) == pytest.approx(float(a[col]), rel=1e-3, abs=1e-5), col
    claims = out / CLAIMS_DIR
    assert not claims.is_dir() or sorted(p.name for p in claims.iterdir()) == []


def test_the_schema_spells_the_stores_dtypes():
    """lm_schema names the store's top-k dtypes without importing torch; they must agree."""
    from rbkd.lm.store import TOPK_DTYPES
    from rbkd.study.lm_schema import TOPK_DTYPE_NAMES

    assert set(TOPK_DTYPE_NAMES) == set(TOPK_DTYPES)


@pytest.mark.parametrize("path", shipped_studies("lm"), ids=lambda p: p.name)
def test_shipped_lm_studies_hold_issue_17s_grid(path):
    """Students from hard labels, the teacher online, and the three stores at k = 8, 32, 128 and
    T = 1, 2, from two teachers, over at least two seeds; pydocs-lm.toml's 90 cells are what
    docs/lm-distillation.md describes (2 teachers, 6 stores, 82 students)."""
    from rbkd.study.lm_plan import count_cells

    study = load_study(path)
    grid = study["grid"]
    assert {"hard", "online", "renormalize", "bucket", "sampled"} <= set(grid["modes"])
    assert {8, 32, 128} <= set(grid["k"]) and {1.0, 2.0} <= set(grid["T"])
    assert len(study["teachers"]) == len(grid["teachers"]) == 2 and len(study["seeds"]) >= 2
    if path.name == "pydocs-lm.toml":
        assert count_cells(study) == 2 + 6 + 2 * (1 + 2 * 2 * (1 + 3 * 3))
