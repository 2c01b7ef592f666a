"""Shared pieces of the benchmarks: quick mode, the copy-bandwidth yardstick, the timing loop.

Benchmarks time, they never assert a speed: the targets are judged afterwards by bench/report.py
from the pytest-benchmark JSON. Set RBKD_BENCH_QUICK=1 for a smoke run (small shapes, few rounds).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import torch

from rbkd import memory_policy


def quick_mode() -> bool:
    """RBKD_BENCH_QUICK=1: small shapes and few rounds (a smoke run, not a measurement)."""
    return os.environ.get("RBKD_BENCH_QUICK", "0").strip().lower() not in ("", "0", "false", "no")


QUICK = quick_mode()

# Seconds of timed rounds per case (after the warm-up), and the bounds on the round count: big
# shapes get MIN_ROUNDS (a 1024 x 32000 eager fwd+bwd is ~0.7 s on 2 cores), small ones more.
ROUND_BUDGET_S = float(os.environ.get("RBKD_BENCH_ROUND_S") or (0.15 if QUICK else 1.5))
MIN_ROUNDS = 2 if QUICK else 3
MAX_ROUNDS = 10 if QUICK else 100
MIN_ROUND_S = 1e-3  # calls faster than this are repeated inside a round (timer + sync overhead)

# Bytes copied by the bandwidth yardstick: far beyond any last-level cache, as are the big cases.
COPY_BYTES = (32 if QUICK else 256) * 2**20
COPY_REPEATS = 10

_copy_gbps: dict[str, float] = {}  # device type -> GB/s, filled once per session
_load_at_start = os.getloadavg()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_copy(device: torch.device) -> float:
    """Best-of-COPY_REPEATS `dst.copy_(src)` on `device`, in GB/s counting read + write bytes."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first touch of dst's pages is not a copy
    sync(device)
    best = float("inf")
    for _ in range(COPY_REPEATS):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * COPY_BYTES / best / 1e9


def measure_copy_bandwidth(device: torch.device) -> float:
    """The copy bandwidth of `device` (GB/s), measured on first use and cached for the session.

    It is measured again when the JSON is written (machine_info "copy_gbps_end"); report.py
    divides by the higher of the two, so a busy moment cannot flatter the ops."""
    key = str(device.type)
    if key not in _copy_gbps:
        _copy_gbps[key] = _time_copy(device)
    return _copy_gbps[key]


@pytest.fixture(scope="session")
def copy_bandwidth() -> Callable[[torch.device], float]:
    """Memory-copy bandwidth (GB/s, read + write) of a device, measured once in this run."""
    return measure_copy_bandwidth


@pytest.fixture(scope="session")
def eager_medians() -> dict[tuple, float]:
    """Median seconds of the torch-eager (and torch.compile) run of each case, keyed by
    (op, device, N, C, dtype, backend): the cases are ordered so that eager and compile come
    first, and the later backends of the same case divide by them."""
    return {}


def time_case(benchmark, fn: Callable[[], object], device: torch.device, *, warmup: int = 1):
    """Warm `fn` up, pick rounds/iterations for the time budget, and run benchmark.pedantic.

    The last warm-up call calibrates: calls under MIN_ROUND_S are repeated within a round, and
    the round count is ROUND_BUDGET_S / round time within [MIN_ROUNDS, MAX_ROUNDS].
    Returns the median seconds per call (None under --benchmark-disable).
    """

    def timed() -> None:
        fn()
        sync(device)

    elapsed = 0.0
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        timed()
        elapsed = time.perf_counter() - start
    iterations = max(1, int(MIN_ROUND_S / max(elapsed, 1e-9)))
    rounds = int(ROUND_BUDGET_S / max(elapsed * iterations, 1e-9))
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, rounds))
    benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        return None
    return float(stats.stats.median)


@pytest.fixture(scope="session")
def bench_timer() -> Callable:
    """time_case(benchmark, fn, device, warmup=1) -> median seconds per call."""
    return time_case


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_configure(config) -> None:
    # RBKD_BENCH_MALLOC=keep: freed memory kept for reuse, as the `rbkd` command does
    # (rbkd/memory_policy.py), for every backend of a case. The default is glibc's, under which
    # every earlier result in bench/results was measured and a user's own torch code runs: each
    # fresh [N, C] buffer (eager's temporaries, every gradient) is then faulted in per call.
    if memory_policy.malloc_policy("RBKD_BENCH_MALLOC", default="system") == "keep":
        memory_policy.keep_freed_memory()
    threads = os.environ.get("RBKD_BENCH_THREADS")
    if threads:  # e.g. 1 on a shared machine, where 2 OpenMP threads wait on each other's cores
        torch.set_num_threads(int(threads))


def pytest_report_header(config) -> list[str]:
    import rbkd.ops

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"rbkd bench: quick={QUICK} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"backends={rbkd.ops.available_backends()} cuda={torch.cuda.is_available()} load=[{load}]"
    ]


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """What bench/report.py prints about the machine, stored in the JSON."""
    import rbkd.ops

    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "rbkd_backends": rbkd.ops.available_backends(),
        "quick": QUICK,
        "copy_gbps": dict(_copy_gbps),
        "copy_gbps_end": {key: _time_copy(torch.device(key)) for key in _copy_gbps},
        "copy_bytes": COPY_BYTES,
        "freed_memory": memory_policy.describe(),
        "loadavg_start": list(_load_at_start),
        "loadavg_end": list(os.getloadavg()),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    machine_info["rbkd"] = info
