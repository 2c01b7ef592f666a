"""Where the slow rounds of the CPU benchmarks come from (bench/results/cpu-2026-12-05-slow-mode.md).

    python bench/slow_mode.py [--rounds 150] [--divergence jsd]

Times kd_loss fwd+bwd at 1024 x 32000 (the C++ backend) round after round, with a 128 MB copy
between rounds, and splits each round's CPU time by thread (user / system, from
/proc/self/task) and the machine's /proc/vmstat counters. It prints, for the fast rounds
(< 1.3x the fastest) and the slow ones (> 1.8x), the mean wall time, the per-thread CPU ticks
and the vmstat deltas per round. On this project's VM the slow rounds show the same page
faults and transparent huge pages as the fast ones but many times the system time in the
thread that first touches the gradient: the host faulting in memory the guest had reported free.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import torch

import rbkd.ops
from rbkd.ops import use_backend


def vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def thread_ticks() -> dict[str, tuple[int, int]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]), int(fields[12]))  # utime, stime in clock ticks
        except OSError:
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--divergence", default="jsd")
    args = ap.parse_args()
    torch.manual_seed(0)
    n, c = 1024, 32000
    x = (2 * torch.randn(n, c)).requires_grad_(True)
    t, y = 2 * torch.randn(n, c), torch.randint(0, c, (n,))
    a, b = torch.empty(32 << 20), torch.randn(32 << 20)
    rounds = []
    with use_backend("cpu"):
        for _ in range(args.rounds):
            v0, s0, w = vmstat(), thread_ticks(), time.perf_counter()
            x.grad = None
            rbkd.ops.kd_loss(x, t, y, T=4.0, alpha=0.9, divergence=args.divergence).backward()
            wall, s1, v1 = time.perf_counter() - w, thread_ticks(), vmstat()
            a.copy_(b)
            ticks = {
                k: (s1[k][0] - s0.get(k, (0, 0))[0], s1[k][1] - s0.get(k, (0, 0))[1]) for k in s1
            }
            rounds.append((wall, ticks, {k: v1[k] - v0[k] for k in v1 if v1[k] != v0[k]}))
    best = min(r[0] for r in rounds)
    hz = os.sysconf("SC_CLK_TCK")
    for label, keep in (("fast", lambda w: w < 1.3 * best), ("slow", lambda w: w > 1.8 * best)):
        chosen = [r for r in rounds if keep(r[0])]
        if not chosen:
            print(f"{label}: no rounds")
            continue
        per = len(chosen)
        cpu: collections.Counter = collections.Counter()
        vm: collections.Counter = collections.Counter()
        for _, ticks, delta in chosen:
            for tid, (u, s) in ticks.items():
                cpu[f"{tid} user"] += u
                cpu[f"{tid} sys"] += s
            vm.update(delta)
        mean = sum(r[0] for r in chosen) / per
        print(f"{label}: {per} rounds, mean {mean * 1e3:.1f} ms (fastest {best * 1e3:.1f} ms)")
        print("  CPU ms per round by thread:",
              {k: round(v / per * 1000 / hz, 1) for k, v in cpu.items() if v})  # fmt: skip
        keys = (
            "pgfault",
            "thp_fault_alloc",
            "thp_fault_fallback",
            "compact_stall",
            "pgalloc_normal",
        )
        print("  vmstat per round:", {k: round(vm[k] / per) for k in keys})


if __name__ == "__main__":
    main()
