"""Claims (rbkd.locking): one owner per piece of work among processes on any machines.

A claim is exclusive while its claimant lives; a claimant killed on this machine leaves a claim
that the next one takes over at once; a claim from another machine is taken over only after a
whole lease without a heartbeat; the heartbeat keeps a claim alive, and a claimant whose claim
was taken over knows it and never removes the new claimant's file. The tables lock is exclusive
across processes and re-entrant within one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rbkd.locking import (
    LEASE_ENV,
    FolderBusyError,
    claim_holder,
    release_claim,
    tables_lock,
    try_claim,
)

HOLD = """
import sys, time
from rbkd.locking import try_claim, tables_lock
path, how = sys.argv[1], sys.argv[2]
if how == "tables":
    with tables_lock(path):
        print("held", flush=True)
        time.sleep(60)
claim = try_claim(path)
print("held" if claim else "refused", flush=True)
if how == "exit":
    import os
    os._exit(0)  # gone without releasing: the claim stays behind
time.sleep(60)
"""


def holder(path: Path, how: str = "hold") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), how], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


def test_a_claim_is_exclusive_until_released(tmp_path):
    path = tmp_path / "claims" / "cell"
    claim = try_claim(path, "student abc")
    assert claim is not None and not claim.lost and claim.took_over is None
    record = claim_holder(path)
    assert record["token"] == claim.token and record["what"] == "student abc"
    assert {"host", "pid", "time", "beat"} <= set(record)
    assert try_claim(path) is None  # this process already holds it
    release_claim(claim)
    assert not path.exists()
    again = try_claim(path)
    assert again is not None
    release_claim(again)


def test_a_live_claimant_keeps_its_claim_even_past_the_lease(tmp_path, monkeypatch):
    path = tmp_path / "cell"
    proc = holder(path)
    try:
        monkeypatch.setenv(LEASE_ENV, "0.2")
        assert try_claim(path) is None
        time.sleep(0.5)  # alive on this machine: never stale, whatever the lease
        assert try_claim(path) is None
        assert claim_holder(path)["pid"] == proc.pid
    finally:
        stop(proc)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_dead_claimant_on_this_machine_is_taken_over_at_once(tmp_path, how):
    path = tmp_path / "cell"
    proc = holder(path, how)
    if how == "kill":
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert claim_holder(path)["pid"] == proc.pid  # left behind
    claim = try_claim(path)  # no lease to wait for: the pid is gone
    assert claim is not None and claim.took_over["pid"] == proc.pid
    assert claim_holder(path)["token"] == claim.token
    assert [p.name for p in tmp_path.iterdir()] == ["cell"]  # nothing set aside is left
    release_claim(claim)


def forge(path: Path, beat: int = 0) -> None:
    """A claim written on another machine (its pid means nothing here)."""
    record = {"host": "node7", "pid": 1, "machine": "node7|boot|pid:[1]", "token": "t" * 32}
    path.write_text(json.dumps({**record, "beat": beat}).ljust(1023) + "\n")


def test_a_claim_from_another_machine_is_taken_over_after_a_lease_without_a_beat(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(LEASE_ENV, "0.4")
    path = tmp_path / "cell"
    forge(path)
    assert try_claim(path) is None  # first look: its lease starts now, on our clock
    for beat in range(1, 4):  # it beats: alive
        time.sleep(0.2)
        forge(path, beat)
        assert try_claim(path) is None
    time.sleep(0.5)  # no beat for a whole lease
    claim = try_claim(path)
    assert claim is not None and claim.took_over["host"] == "node7"
    release_claim(claim)


def test_the_heartbeat_keeps_a_claim_alive_and_a_lost_claim_is_not_removed(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "0.4")  # a beat every 0.05 s
    path = tmp_path / "cell"
    claim = try_claim(path)
    first = claim_holder(path)["beat"]
    deadline = time.monotonic() + 10
    while claim_holder(path)["beat"] == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert claim_holder(path)["beat"] > first
    forge(path)  # another runner took it over (as after a stall longer than the lease)
    while not claim.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert claim.lost
    release_claim(claim)
    assert claim_holder(path)["host"] == "node7"  # the new claimant's file stays


def test_the_tables_lock_is_exclusive_across_processes_and_reentrant(tmp_path):
    with tables_lock(tmp_path), tables_lock(tmp_path):  # re-entrant in one process
        assert claim_holder(tmp_path / ".rbkd-claims" / "tables") is not None
    assert claim_holder(tmp_path / ".rbkd-claims" / "tables") is None
    proc = holder(tmp_path, "tables")
    try:
        with (
            pytest.raises(FolderBusyError, match=f"pid {proc.pid}"),
            tables_lock(tmp_path, timeout=0.3),
        ):
            pass
    finally:
        stop(proc)
    with tables_lock(tmp_path, timeout=5):  # a killed holder does not block it
        pass
