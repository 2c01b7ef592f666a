"""Torch's threads, set once before a computing command's work (`start_compute`):
--threads N, else $OMP_NUM_THREADS, else the physical cores (README, "Threads")."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from rbkd.cli.usage import check_command_options


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's vector units, so a
    second torch thread on one rarely helps): distinct (physical id, core id) pairs of
    /proc/cpuinfo among the CPUs in our affinity mask; else the CPUs we may use."""
    try:
        allowed: set[int] | None = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = None
    cores: set[tuple[str, str]] = set()
    with contextlib.suppress(OSError):
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (line.partition(":") for line in block.splitlines())
            )
            if "core id" not in fields or "processor" not in fields:
                continue
            if allowed is None or int(fields["processor"]) in allowed:
                cores.add((fields.get("physical id", "0"), fields["core id"]))
    if cores:
        return len(cores)
    return len(allowed) if allowed else os.cpu_count() or 1


def default_threads() -> int:
    """The thread count when --threads is not given: $OMP_NUM_THREADS if the user set it (a
    positive integer), else the physical cores."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else physical_cores()


def start_compute(threads: int | None) -> int:
    """What every computing command does before its work: check the values of its options that
    have a rule (rbkd.config.OPTION_RULES; a usage error, exit code 2, naming the flag or the
    --config file), set the threads (`apply_threads`) and print each epoch's line even with
    --no-progress, which only drops the live bars."""
    # Here, not at the top: the rbkd.engine package imports torch, and the commands' modules
    # import this one (their --help must not load torch).
    from rbkd.engine.progress import print_epoch_lines

    check_command_options()
    print_epoch_lines()
    return apply_threads(threads)


def apply_threads(n: int | None) -> int:
    """Set torch's intra-op threads (which rbkd's CPU kernels follow too) before any work:
    --threads N, else $OMP_NUM_THREADS, else the physical cores. Returns the count used."""
    import torch  # here: the commands' modules import this one, and their --help stays torch-free

    n = default_threads() if n is None else n
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    # The inter-op pool can be sized once per process, before it first runs; rbkd queues no
    # inter-op work, so a pool that already exists (a second command in one process) is fine.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    return n
