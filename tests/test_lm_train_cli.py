"""`rbkd lm train-teacher` and `rbkd lm distill` on a tiny corpus: the run folders they leave,
one line for bad input, and torchrun with 2 ranks (gloo, CPU) against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lm_fixtures import write_tiny_corpus
from rbkd.cli.app import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from rbkd.lm.corpus import load_corpus
from rbkd.lm.tokenizer import train_tokenizer

pytest.importorskip("transformers")
runner = CliRunner()
RANK_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
LR = 3e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmcli")
    corpus_dir = write_tiny_corpus(root / "texts", files=8, sentences=12)
    train_tokenizer(load_corpus(corpus_dir), 300, out=root / "tokenizer.json")
    return {"root": root, "common": ["--corpus", str(corpus_dir), "--tokenizer",
            str(root / "tokenizer.json"), "--context", "16", "--batch-size", "4", "--lr", str(LR),
            "--warmup", "1", "--eval-every", "2", "--eval-tokens", "64", "--device", "cpu",
            "--no-progress"]}  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(data, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(data["root"] / "cache"))
    for name in RANK_ENV:
        monkeypatch.delenv(name, raising=False)


def _invoke(*args):
    return runner.invoke(app, ["lm", *args])


def test_train_teacher_then_distill_from_it_online(data, tmp_path):
    out = tmp_path / "teacher"
    done = _invoke("train-teacher", "--model", "tiny", "--steps", "4", *data["common"], "--out",
                   str(out), "--json")  # fmt: skip
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    m = result["metrics"]
    assert m["steps"] == 4 and m["val_perplexity"] > 1 and m["unigram_perplexity"] > 1
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / "model" / name).is_file(), name
    assert json.loads((out / "result.json").read_text())["key"] == result["key"]
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["invocation"]["command"]  # the command line is recorded
    assert [f["split"] for f in config["provenance"]["data_files"]] == ["train", "validation"]
    again = _invoke("train-teacher", "--model", "tiny", "--steps", "4", *data["common"], "--out",
                    str(out))  # fmt: skip
    assert again.exit_code == 0 and "nothing to do" in again.output
    student = _invoke("distill", "--teacher", str(out), "--T", "2", "--alpha", "0.5",
                      "--model", "tiny", "--steps", "2", *data["common"], "--out",
                      str(tmp_path / "student"), "--json")  # fmt: skip
    assert student.exit_code == 0, student.output
    assert json.loads(student.stdout)["source"]["kind"] == "online_teacher"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--alpha", "0.5"], "alpha = 0.5 needs a teacher"),
        (["--store", "nowhere", "--alpha", "0.5"], "is not a sparse soft-label store"),
        (["--alpha", "0", "--steps", "0"], "--steps"),
    ],
)
def test_bad_input_is_one_line(data, args, message):
    done = _invoke("distill", "--model", "tiny", *data["common"], *args)
    assert done.exit_code in (1, 2) and message in done.output, done.output
    assert len([line for line in done.output.splitlines() if line.strip()]) <= 3  # usage + line


def _torchrun(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("rbkd")
    entry = [str(script)] if script.exists() else ["-m", "rbkd"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc-per-node", "2", *entry, *args]


@pytest.mark.slow
def test_two_ranks_match_one_process(data, tmp_path):
    args = ["lm", "train-teacher", "--model", "tiny", "--steps", "4", "--micro-batch", "1",
            *data["common"]]  # fmt: skip
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(XDG_CACHE_HOME=str(data["root"] / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(_torchrun(*args, "--out", str(tmp_path / "two")), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # Adam's allreduce tolerance (tests/test_cli_torchrun.py says why)
        worst = float((a[key] - b[key]).abs().max())
        agree = float(torch.isclose(a[key], b[key], atol=1e-5, rtol=1e-5).float().mean())
        assert worst <= LR and agree >= 0.99, (key, worst, agree)
    rows = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("one", "two")]  # fmt: skip
    for ra, rb in zip(*rows, strict=True):
        assert ra["step"] == rb["step"]
        for k in ("train_objective_loss", "val_ce_loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), (k, ra, rb)
    two = json.loads((tmp_path / "two" / "config.json").read_text())
    assert two["world_size"] == 2


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_bit_identical(data, tmp_path):
    """SIGKILL after the second checkpoint; the same command again resumes and ends with the
    weights of a run never killed, bit for bit (one thread each: the same sums in the same order)."""
    from rbkd.engine.checkpoint import read_checkpoint_info

    args = ["lm", "train-teacher", "--model", "tiny", "--steps", "40", "--checkpoint-every", "2",
            *data["common"], "--threads", "1"]  # fmt: skip
    whole = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(XDG_CACHE_HOME=str(data["root"] / "cache"), OMP_NUM_THREADS="1")
    script = Path(sys.executable).with_name("rbkd")
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "rbkd"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*entry, *args, "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (cut / "checkpoint.safetensors").exists():
                try:
                    if read_checkpoint_info(cut)["epoch"] >= 4:
                        break
                except ValueError:
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = read_checkpoint_info(cut)["epoch"]
    assert 4 <= killed_at < 40 and not (cut / "result.json").exists()
    again = runner.invoke(app, [*args, "--out", str(cut), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["resumed_from_step"] == killed_at
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
