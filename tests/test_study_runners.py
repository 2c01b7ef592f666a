"""Several runners of one study (docs/studies.md, "Several runners"), on the tiny dataset.

Three `rbkd study run` processes started together on one folder train every run exactly once
between them and leave the tables a single runner leaves; a runner SIGKILLed in the middle of a
run leaves that run to the next runner, which completes it; a claim left by a dead process, or by
a machine whose heartbeat stopped, is taken over; a student waits for the teacher another
runner is training. Every runner here uses one thread, so that the numbers of all of them, and
of the single-runner reference, are the same to the last bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_study import MINI, quiet_run, write_study

from rbkd.locking import CLAIMS_DIR, LEASE_ENV, claim_holder
from rbkd.study.results import read_jsonl
from rbkd.study.study_folder import STUDY_MARKER

TIMING = ("wall_time_s", "samples_per_s")  # the only columns two runs of a cell may differ in


def command(path: Path, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "rbkd.cli.app", "study", "run", str(path), "--out", str(out)),
        *("--device", "cpu", "--threads", "1", "--no-progress", "--no-report", "--json"),
    ]


def start(path: Path, out: Path, data_root: Path) -> subprocess.Popen:
    env = {**os.environ, "RBKD_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command(path, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return json.loads(stdout), stderr


def tables(out: Path) -> tuple[list[dict], list[dict]]:
    """results.jsonl and teachers.jsonl, row for row, without the timing columns."""

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    return strip(read_jsonl(out / "results.jsonl")), strip(read_jsonl(out / "teachers.jsonl"))


def claims(out: Path) -> list[str]:
    folder = out / CLAIMS_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def single(tiny_data_root, tmp_path_factory):
    """The mini study by one runner, in a process like the others: the reference."""
    folder = tmp_path_factory.mktemp("single")
    summary, _ = finish(start(write_study(folder), folder / "out", tiny_data_root))
    assert summary["ran"] == summary["total"] == 6
    return folder / "out", summary


def test_three_runners_train_every_run_once_and_leave_a_single_runners_tables(
    single, tiny_data_root, tmp_path
):
    reference, ref_summary = single
    path, out = write_study(tmp_path), tmp_path / "out"
    procs = [start(path, out, tiny_data_root) for _ in range(3)]
    results = [finish(p) for p in procs]
    ran = [[r["key"] for r in s["runs"] if r["status"] == "ran"] for s, _ in results]
    every = sorted(r["key"] for r in ref_summary["runs"])
    assert sorted(k for keys in ran for k in keys) == every  # each run trained by one runner
    for summary, stderr in results:
        assert summary["to_do"] == 0 and summary["ran"] + summary["ran_elsewhere"] == 6
        if summary["ran_elsewhere"]:
            assert "other runners of the study ran" in stderr
    for metrics in out.glob("*/*/metrics.jsonl"):  # trained once: one line per epoch
        config = json.loads((metrics.parent / "config.json").read_text())
        assert len(metrics.read_text().splitlines()) == config["train_config"]["epochs"]
    assert tables(out) == tables(reference)
    assert (out / "results.csv").read_text().splitlines()[0] == (
        (reference / "results.csv").read_text().splitlines()[0]
    )
    assert claims(out) == []  # every claim given back


def test_a_runner_killed_in_a_run_leaves_it_to_the_next(single, tiny_data_root, tmp_path):
    reference, _ = single
    path, out = write_study(tmp_path), tmp_path / "out"
    first = start(path, out, tiny_data_root)
    deadline = time.monotonic() + 300
    killed = None
    while killed is None and time.monotonic() < deadline and first.poll() is None:
        # a teacher in training: claimed, its config.json written, its result.json not yet
        for teacher in out.glob("teachers/*/config.json"):
            key = json.loads(teacher.read_text())["extra_config"]["key"]
            if (out / CLAIMS_DIR / key).exists() and not (teacher.parent / "result.json").exists():
                killed = key
                break
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert killed is not None, "the runner was not caught training a teacher"
    assert claim_holder(out / CLAIMS_DIR / killed)["pid"] == first.pid  # left behind
    summary, stderr = finish(start(path, out, tiny_data_root))
    assert killed in [r["key"] for r in summary["runs"] if r["status"] == "ran"]
    assert f"pid {first.pid}) stopped before finishing it" in stderr
    assert tables(out) == tables(reference)
    assert claims(out) == []


LEFT_BEHIND = """
import os, sys
from rbkd.locking import try_claim
try_claim(sys.argv[1])
os._exit(0)  # killed, in effect: the claim stays
"""


@pytest.mark.parametrize("by", ["a dead process", "another machine"])
def test_a_stale_claim_on_a_student_is_taken_over(tiny_data, tmp_path, monkeypatch, by):
    path, out = write_study(tmp_path), tmp_path / "out"
    planned = quiet_run(path, out, dry_run=True)
    student = planned.plan.students[0]
    claim = out / CLAIMS_DIR / student.key
    claim.parent.mkdir(parents=True)
    (out / STUDY_MARKER).write_text('{"study": "mini"}')  # as the runner that claimed wrote it
    if by == "a dead process":
        dead = subprocess.run([sys.executable, "-c", LEFT_BEHIND, str(claim)], check=True)
        assert dead.returncode == 0 and claim_holder(claim)["pid"] != os.getpid()
    else:  # a claim whose heartbeat stopped (its machine went away)
        monkeypatch.setenv(LEASE_ENV, "1")
        record = {"host": "node7", "pid": 1, "machine": "node7|b|p", "token": "t", "beat": 3}
        claim.write_text(json.dumps(record).ljust(1023) + "\n")
    notes = []
    run = quiet_run(path, out, note=notes.append)
    assert student.key in run.trained and len(run.trained) == 6
    assert len(notes) == 1 and "stopped before finishing it" in notes[0]
    assert ("node7" in notes[0]) == (by == "another machine")
    assert len(read_jsonl(out / "results.jsonl")) == 4 and claims(out) == []


HOLD_TEACHER = """
import sys
from rbkd.locking import release_claim, try_claim
claim = try_claim(sys.argv[1])
print("held" if claim else "refused", flush=True)
sys.stdin.readline()  # until the test says
release_claim(claim)
"""


def test_students_wait_for_the_teacher_another_runner_holds(tiny_data, tmp_path):
    path, out = write_study(tmp_path, MINI), tmp_path / "out"
    planned = quiet_run(path, out, dry_run=True)
    teacher = planned.plan.teachers[0]  # the teacher of every taught student
    claim = out / CLAIMS_DIR / teacher.key
    claim.parent.mkdir(parents=True)
    (out / STUDY_MARKER).write_text('{"study": "mini"}')  # as the other runner wrote it
    hold = subprocess.Popen(
        [sys.executable, "-c", HOLD_TEACHER, str(claim)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hold.stdout.readline().strip() == "held"
        labels, notes = [], []

        def on_run(label, done, total):
            labels.append(label)
            if label.startswith("waiting for") and hold.poll() is None:
                hold.communicate("go\n", timeout=60)  # the other runner gives the teacher back

        run = quiet_run(path, out, on_run=on_run, note=notes.append)
        waited = next(i for i, label in enumerate(labels) if label.startswith("waiting for"))
        # the other teacher and the label-smoothing student needed no held teacher: they ran
        # first; the taught students waited until the teacher was given back
        assert "teacher small-b100-e1" in labels[0] and "LS A=0.5" in labels[waited - 1]
        assert "teacher small/" in labels[waited + 1]
        assert len(run.trained) == 6 and run.elsewhere == [] and notes == []
        assert len(read_jsonl(out / "results.jsonl")) == 4 and claims(out) == []
    finally:
        hold.kill()
        hold.wait()
