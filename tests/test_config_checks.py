"""Issue 13, items 11, 13 and 16 through the command line: every value is checked before a run
folder exists (exit code 2, naming the flag or the --config file and key); config files that
nest too deeply or give one option twice are refused; `rbkd rerun` exits non-zero when the rerun
differs and checks the original's weights before training anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rbkd.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()
QUICK = ["--epochs", "1", "--batch-size", "50", "--limit", "60", "--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def usage_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ item 11: flags
@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--seed", "-5", "--seed must be >= 0, got -5"),
        ("--epochs", "0", "--epochs must be >= 1"),
        ("--batch-size", "0", "--batch-size must be >= 1"),
        ("--lr", "0", "--lr must be > 0"),
        ("--lr", "nan", "--lr must be > 0"),
        ("--limit", "0", "--limit must be >= 1"),
    ],
)
def test_train_teacher_checks_every_value_before_the_run_folder(
    tiny_data, tmp_path, flag, value, fragment
):
    out = tmp_path / "r"
    args = _replace(QUICK, flag, value) if flag in QUICK else [*QUICK, flag, value]
    usage_error(invoke("train-teacher", *args, "--out", out), fragment)
    assert not out.exists()


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i], flag, value, *args[i + 2 :]]


def test_the_corrected_command_then_trains_into_the_same_folder(tiny_data, tmp_path):
    out = tmp_path / "r"
    usage_error(invoke("train-teacher", *QUICK, "--seed", "-5", "--out", out), "--seed")
    result = invoke("train-teacher", *QUICK, "--seed", "5", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--per-class", "0"], "--per-class must be >= 1"),
        (["--T", "150"], "--T = 150 is above 100"),
        (["--alpha", "2"], "--alpha must be in [0, 1]"),
    ],
)
def test_distill_checks_every_value_before_the_run_folder(tiny_data, tmp_path, args, fragment):
    out = tmp_path / "s"
    result = invoke("distill", "--teacher", tmp_path / "no-run", *args, *QUICK, "--out", out)
    usage_error(result, fragment)
    assert not out.exists()


# ------------------------------------------------------------------ item 16: config files
@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("seed = -2\n", ("seed must be >= 0, got -2",)),
        ("lr = 0.0\n", ("lr must be > 0",)),
        ('lr = "nan"\n', ("lr must be a number",)),
        ("batch_size = 0\n", ("batch_size must be >= 1",)),
        ("epochs = 0\n", ("epochs must be >= 1",)),
        ("batch-size = 32\nbatch_size = 64\n", ("'batch-size' and 'batch_size'", "keep one")),
    ],
)
def test_bad_values_in_a_config_file_name_the_file_and_exit_2(tiny_data, tmp_path, text, fragments):
    path = tmp_path / "options.toml"
    path.write_text(text)
    out = tmp_path / "r"
    usage_error(invoke("train-teacher", "--config", path, "--out", out), str(path), *fragments)
    assert not out.exists()


def test_a_json_config_with_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "options.json"
    path.write_text('{"batch_size": 32, "batch-size": 64}')
    usage_error(invoke("train-teacher", "--config", path), str(path), "keep one")
    path.write_text('{"lr": 0.1, "lr": 0.2}')
    usage_error(invoke("train-teacher", "--config", path), str(path), "'lr' is given twice")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000),
        ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ("deep2.json", '{"epochs": ' + "[" * 50 + "1" + "]" * 50 + "}"),
        ("deep2.toml", "epochs = " + "[" * 50 + "1" + "]" * 50 + "\n"),
    ],
)
def test_deeply_nested_config_files_are_refused_naming_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    line = usage_error(invoke("train-teacher", "--config", path), str(path), "nested more than")
    assert "recursion" not in line


def test_a_distill_value_from_the_file_names_the_file(tiny_data, tmp_path):
    path = tmp_path / "student.toml"
    path.write_text("T = 150\n")
    result = invoke("distill", "--config", path, "--teacher", tmp_path / "no-run")
    usage_error(result, str(path), "above 100")


def test_a_runs_config_json_still_works_as_a_config_file(tiny_data, tmp_path):
    """The depth limit leaves room for what rbkd itself writes (provenance, resumes)."""
    out = tmp_path / "t"
    result = invoke("train-teacher", *QUICK, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    again = invoke("train-teacher", "--config", out / "config.json", "--out", out)
    assert again.exit_code == 0, again.output


# ------------------------------------------------------------------ item 13: rerun
@pytest.fixture
def teacher_run(tiny_data, tmp_path):
    out = tmp_path / "t1"
    result = invoke("train-teacher", *QUICK, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    return out


def test_rerun_that_differs_exits_3(teacher_run, tmp_path):
    from rbkd.cli.rerun import EXIT_NOT_REPRODUCED

    config = json.loads((teacher_run / "config.json").read_text())
    config["final_metrics"]["test_accuracy"] = -1.0  # as if the original had scored otherwise
    (teacher_run / "config.json").write_text(json.dumps(config))
    result = invoke("rerun", teacher_run, "--out", tmp_path / "again", "--no-progress")
    assert "not reproduced" in result.output
    assert result.exit_code == EXIT_NOT_REPRODUCED == 3
    as_json = invoke("rerun", teacher_run, "--out", tmp_path / "again2", "--json", "--no-progress")
    assert as_json.exit_code == 3
    assert json.loads(as_json.stdout)["reproduced"] is False


def test_rerun_help_documents_its_exit_codes():
    result = invoke("rerun", "--help")
    assert "Exit code" in result.output and "3" in result.output


@pytest.mark.parametrize("how", ["missing", "dangling"])
def test_rerun_without_the_weights_trains_nothing(teacher_run, tmp_path, how):
    (teacher_run / "model.safetensors").unlink()
    if how == "dangling":
        (teacher_run / "model.safetensors").symlink_to(tmp_path / "nowhere")
    out = tmp_path / "again"
    result = invoke("rerun", teacher_run, "--out", out, "--no-progress")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.safetensors" in lines[0], result.output
    assert not out.exists()  # nothing was trained


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["soft-labels", "--teacher", "t", "--limit", "0", "--out", "x.safetensors"], ["--limit"]),
        (["analyze", "entropy", "--soft-labels", "x.safetensors", "--T", "0"], ["T must be > 0"]),
        (["analyze", "projection", "--teacher", "t", "--classes", "a,b"], ["--classes"]),
        (["experiment", "missing-class", "--teacher", "t", "--T", "-1"], ["T must be > 0"]),
        (["experiment", "batch-sweep", "--capacity", "small", "--batch-sizes", "x"],
         ["--batch-sizes"]),
        (["experiment", "transfer-set", "--teacher", "t", "--lr", "0"], ["--lr"]),
    ],
)  # fmt: skip
def test_every_command_reports_a_bad_value_as_a_usage_error(tmp_path, args, fragments):
    """One rule (README, the command line): a value wrong in what was typed is exit code 2,
    whatever the command, before anything is read or written."""
    usage_error(invoke(*args), *fragments)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ issue 15: no torch below
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "code",
    [
        "import rbkd.config",
        "import rbkd.study.schema",
        "import rbkd.ops.args",
        # reading and checking a study file, a distillation's options and a noise spec
        "from pathlib import Path\n"
        "from rbkd.config import DistillSpec, parse_noise\n"
        "from rbkd.study.schema import load_study\n"
        f"load_study({str(ROOT / 'studies' / 'fashion-mnist-quick.toml')!r})\n"
        "DistillSpec(teacher=Path('runs/t1'), noise='normal:0.05').check()\n"
        "assert parse_noise('uniform:0.1') == ('uniform', 0.1)",
        f"from rbkd.study.schema import load_study\n"
        f"load_study({str(ROOT / 'studies' / 'pydocs-lm.toml')!r})",
    ],
    ids=["config", "schema", "ops-args", "check-a-study", "check-an-lm-study"],
)
def test_the_config_layer_imports_no_torch(code):
    """rbkd.config and the study files are read by the command line before any work: they
    import no torch (nor numpy), in a fresh interpreter."""
    code += "\nimport sys\nprint([m for m in ('torch', 'numpy') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_the_ops_own_the_temperature_limit_and_the_engine_reads_noise_from_the_config():
    import rbkd.config as config
    import rbkd.engine.noise as noise
    import rbkd.ops as ops
    import rbkd.ops.args as args
    import rbkd.ops.validation as validation

    assert config.KD_MAX_TEMPERATURE is args.KD_MAX_TEMPERATURE
    assert ops.KD_MAX_TEMPERATURE is validation.KD_MAX_TEMPERATURE is args.KD_MAX_TEMPERATURE
    assert config.DIVERGENCES == tuple(args.DIVERGENCES)
    assert noise.parse_noise is config.parse_noise
    with pytest.raises(ValueError, match="above 100"):
        config.check_kd_temperature(100.5, "--T")
