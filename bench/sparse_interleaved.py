"""Dense kd_loss against sparse_kd_loss (k = 32, 128), call after call in one process.

    python bench/sparse_interleaved.py --rounds 20 [--threads 2]

pytest-benchmark times one case after another, so a busy minute can land on one case alone;
here each round runs dense, k = 32 and k = 128 back to back (forward + backward at 1024 x
128256 float32, T = 1, alpha = 0.9 with labels, a fresh gradient each call, the same calls as
bench/test_bench_sparse.py) and the ratios come from the same rounds. Prints one JSON line:
min, 25th percentile and median ms per case, and dense / sparse at each. The memory policy is
the `rbkd` command's (rbkd/memory_policy.py; RBKD_MALLOC=system for glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rbkd.ops
from rbkd import memory_policy
from rbkd.ops import use_backend

N, V, T, ALPHA = 1024, 128256, 1.0, 0.9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    kept = memory_policy.keep_freed_memory()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(N, V, generator=g)).requires_grad_(True)
    t = 2 * torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    logz = torch.logsumexp(t / T, -1)
    top = {k: t.topk(k, -1) for k in (32, 128)}

    def dense() -> torch.Tensor:
        return rbkd.ops.kd_loss(z, t, y, T=T, alpha=ALPHA)

    def sparse(k: int):
        values, ids = top[k]
        return lambda: rbkd.ops.sparse_kd_loss(z, ids, values, y, logz=logz, T=T, alpha=ALPHA)

    cases = {"dense": dense, "k32": sparse(32), "k128": sparse(128)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with use_backend("cpu"):
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for name, loss in cases.items():
                z.grad = None
                start = time.perf_counter()
                loss().backward()
                if rnd:
                    times[name].append(time.perf_counter() - start)

    def stats(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {
            "min_ms": xs[0] * 1e3,
            "q25_ms": xs[len(xs) // 4] * 1e3,
            "median_ms": statistics.median(xs) * 1e3,
        }

    out = {name: stats(xs) for name, xs in times.items()}
    for k in ("k32", "k128"):
        out[f"dense_over_{k}"] = {
            key: out["dense"][key] / out[k][key] for key in ("min_ms", "q25_ms", "median_ms")
        }
    out.update(rounds=args.rounds, threads=args.threads, freed_memory=memory_policy.describe())
    out["kept_freed_memory"] = kept
    print(json.dumps(out))


if __name__ == "__main__":
    main()
