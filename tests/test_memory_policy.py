"""rbkd.memory_policy: the `rbkd` command keeps freed memory for reuse; RBKD_MALLOC chooses.

Each check runs in a fresh interpreter: the policy changes the whole process, and the test
process must keep glibc's defaults. What is asserted is glibc's own account (mallinfo2): a
64 MB tensor is a mapping of its own under the defaults and a heap block under the policy.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from rbkd import memory_policy

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
ROOT = Path(__file__).resolve().parents[1]

# Allocates, frees and allocates again a 64 MB tensor; prints glibc's bytes in mmapped blocks
# (hblkhd) and in the heap (arena) while the second one is alive, and whether the policy took.
PROBE = """
import ctypes, json, sys
import torch
from rbkd import memory_policy

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
applied = memory_policy.keep_freed_memory() if sys.argv[1] == "call" else None
x = torch.ones(16 * 2**20)
del x
y = torch.ones(16 * 2**20)
m = mallinfo2()
print(json.dumps({"applied": applied, "mmapped": m.hblkhd, "heap": m.arena,
                  "describe": memory_policy.describe()}))
"""


def _probe(call: bool, malloc_env: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RBKD_MALLOC"}
    if malloc_env is not None:
        env["RBKD_MALLOC"] = malloc_env
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "call" if call else "skip"],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
def test_policy_serves_large_tensors_from_the_heap():
    kept = _probe(True, None)
    assert kept["applied"] is True
    assert kept["describe"].startswith("kept for reuse")
    assert kept["mmapped"] < 64 * 2**20  # the 64 MB tensor is no mapping of its own (torch's
    # import mapped a few MB before the call)
    assert kept["heap"] >= 64 * 2**20


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
@pytest.mark.parametrize("call,env", [(False, None), (True, "system"), (True, " System ")])
def test_defaults_without_the_call_or_under_system(call, env):
    info = _probe(call, env)
    assert info["applied"] in (None, False)
    assert info["mmapped"] >= 64 * 2**20  # glibc maps the 64 MB tensor on its own
    assert info["describe"].startswith("glibc's defaults")


def test_bad_policy_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("RBKD_MALLOC", "forever")
    with pytest.raises(ValueError, match="RBKD_MALLOC must be 'keep' or 'system', got 'forever'"):
        memory_policy.keep_freed_memory()


def _rbkd(*args: str, malloc_env: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RBKD_MALLOC"}
    if malloc_env is not None:
        env["RBKD_MALLOC"] = malloc_env
    cmd = [sys.executable, "-c", "from rbkd.cli.app import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
def test_the_rbkd_command_keeps_freed_memory():
    """The user's path: the console entry point applies the policy before any command runs."""
    out = _rbkd("info", "--json", malloc_env=None)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["freed_memory"] == "kept for reuse (RBKD_MALLOC=keep)"
    out = _rbkd("info", "--json", malloc_env="system")
    assert json.loads(out.stdout)["freed_memory"] == "glibc's defaults (RBKD_MALLOC=system)"


def test_the_rbkd_command_refuses_a_bad_policy_in_one_line():
    out = _rbkd("info", malloc_env="sometimes")
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "RBKD_MALLOC must be 'keep' or 'system'" in lines[0]
