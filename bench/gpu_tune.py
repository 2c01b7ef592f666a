"""Block-size and warp-count sweep of the Triton kernels on a GPU (run by bench/gpu.sh).

For each op and shape, times every (BLOCK, num_warps) in a small grid with
triton.testing.do_bench (median of CUDA-event timings over ~100 ms, after warm-up), checks each
variant's output against torch in float32 (a variant that computes something else is reported,
not timed), and prints the best against the launch heuristic rbkd uses today.

    python bench/gpu_tune.py --json tune.json --md tune.md

Inputs are fresh random logits (never zeros: they can run faster than real data). Bytes are the
op's minimum traffic, as in bench/test_bench_ops.py; GB/s over that is what the report shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

T = 4.0
ALPHA = 0.9
TEMPS = [float(k) for k in range(1, 21)]

# (op, N, C, dtype, blocks, warps). The grids bracket today's heuristic on both sides.
GRID = [
    ("kd_loss", 8192, 128256, torch.bfloat16, [1024, 2048, 4096, 8192], [4, 8, 16, 32]),
    ("kd_loss", 16384, 32000, torch.bfloat16, [1024, 2048, 4096, 8192], [4, 8, 16, 32]),
    # The divergence kernel (three passes, four with standardize) shares kd_loss's heuristic.
    ("kd_jsd", 8192, 128256, torch.bfloat16, [512, 1024, 2048], [4, 8, 16]),
    ("softmax", 8192, 128256, torch.bfloat16, [2048, 4096, 8192, 16384], [4, 8, 16, 32]),
    ("entropy", 8192, 128256, torch.bfloat16, [256, 512, 1024, 2048], [1, 2, 4, 8]),
    ("entropy", 16384, 32000, torch.bfloat16, [256, 512, 1024, 2048], [1, 2, 4, 8]),
]


def min_bytes(op: str, n: int, c: int, itemsize: int) -> int:
    if op.startswith("kd_"):  # read student + teacher, write the gradient
        return 3 * n * c * itemsize
    if op == "softmax":
        return 2 * n * c * itemsize
    return n * c * itemsize + len(TEMPS) * n * 4


def make_call(op: str, x, teacher, labels, temps, block: int | None, warps: int | None):
    from rbkd import kernels as K
    from rbkd.ops.args import EntropyOptions

    if op.startswith("kd_"):
        opts = kd_options(op)
        return lambda: K.kd_loss_forward(
            x, teacher, labels, T, ALPHA, 1.0 / x.shape[0], True, opts,
            block_size=block, num_warps=warps,
        )  # fmt: skip
    if op == "softmax":
        return lambda: K.temperature_softmax_forward(x, T, False, block_size=block, num_warps=warps)
    return lambda: K.soft_label_entropy_forward(
        x, temps, EntropyOptions(), block_size=block, num_warps=warps
    )


def kd_options(op: str):
    """kd_loss's options for op "kd_loss" (kl) or "kd_<divergence>"."""
    from rbkd.ops.args import DIVERGENCES, KDOptions

    return KDOptions() if op == "kd_loss" else KDOptions(divergence=DIVERGENCES[op[3:]])


def reference(op: str, x, teacher, labels, temps):
    """float32 torch result of the op, computed in row chunks to bound the memory."""
    outs = []
    for lo in range(0, x.shape[0], 1024):
        z = x[lo : lo + 1024].float()
        if op == "kd_loss":
            t, y = teacher[lo : lo + 1024].float(), labels[lo : lo + 1024]
            kl = F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(t / T, -1), log_target=True,
                          reduction="none").sum(-1)  # fmt: skip
            ce = F.cross_entropy(z, y, reduction="none")
            outs.append(ALPHA * T * T * kl + (1 - ALPHA) * ce)
        elif op.startswith("kd_"):  # another divergence: the reference backend's rows
            from rbkd.ops.backends.torch_twin import kd_loss_rows

            t, y = teacher[lo : lo + 1024].float(), labels[lo : lo + 1024]
            outs.append(kd_loss_rows(z, t, y, T, ALPHA, kd_options(op)).float())
        elif op == "softmax":
            outs.append(F.softmax(z / T, -1))
        else:
            rows = [-(F.softmax(z / s, -1) * F.log_softmax(z / s, -1)).sum(-1) for s in TEMPS]
            outs.append(torch.stack(rows))
    return torch.cat(outs, dim=-1 if op == "entropy" else 0)


def check(op: str, out, ref) -> float:
    """Relative L2 error of the variant's output against the float32 torch reference."""
    got = out[0] if op.startswith("kd_") else out
    got = got.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm())


def sweep(op, n, c, dtype, blocks, warps_list) -> dict:
    import triton.testing
    from rbkd.kernels import _launch
    from rbkd.kernels.soft_label_entropy import temperature_chunk

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (2 * torch.randn(n, c, device="cuda", generator=gen)).to(dtype)
    teacher = (2 * torch.randn(n, c, device="cuda", generator=gen)).to(dtype)
    labels = torch.randint(0, c, (n,), device="cuda", generator=gen)
    temps = torch.tensor(TEMPS, device="cuda")
    ref = reference(op, x, teacher, labels, temps)
    nbytes = min_bytes(op, n, c, x.element_size())
    tol = 2e-2 if op == "softmax" else 1e-4  # softmax is written back in bf16

    def measure(block, warps) -> dict:
        call = make_call(op, x, teacher, labels, temps, block, warps)
        try:
            err = check(op, call(), ref)
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result
            return {"block": block, "warps": warps, "error": f"{type(exc).__name__}: {exc}"[:200]}
        row = {"block": block, "warps": warps, "rel_err": err}
        if not err <= tol:
            row["error"] = f"relative error {err:.2e} above {tol:g}"
            return row
        ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
        row.update(ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9)
        return row

    default = measure(None, None)
    if op == "entropy":
        kc = temperature_chunk(len(TEMPS))
        default["block"] = _launch.pick_block(c, max(16, _launch.MAX_TILE_ENTROPY // kc))
        default["warps"] = _launch.pick_num_warps(kc * default["block"], _launch.ENTROPY_COLS)
    elif op.startswith("kd_"):
        default["block"] = _launch.pick_block(c, _launch.MAX_BLOCK_KD)
        default["warps"] = _launch.pick_num_warps(default["block"], _launch.KD_COLS)
    else:
        default["block"] = _launch.pick_block(c, _launch.MAX_BLOCK_SOFTMAX)
        default["warps"] = _launch.pick_num_warps(default["block"])
    rows = [measure(b, w) for b in blocks for w in warps_list]
    timed = [r for r in rows if "ms" in r]
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    print(
        f"{op:8s} {n}x{c} {str(dtype)[6:]}: heuristic {default.get('ms', float('nan')):.3f} ms "
        f"(BLOCK {default['block']}, {default['warps']} warps)"
        + (
            f", best {best['ms']:.3f} ms (BLOCK {best['block']}, {best['warps']} warps)"
            if best
            else ""
        ),
        flush=True,
    )
    return {"op": op, "N": n, "C": c, "dtype": str(dtype)[6:], "bytes": nbytes,
            "heuristic": default, "best": best, "variants": rows}  # fmt: skip


def markdown(results: list[dict], copy_gbps: float | None) -> str:
    lines = [
        "## Block-size sweep (bench/gpu_tune.py)",
        "",
        "Median of `triton.testing.do_bench` per variant; every variant's output was checked "
        "against torch in float32 before it was timed.",
        "",
        "| op | shape | heuristic (BLOCK, warps) | ms | GB/s | best (BLOCK, warps) | ms | GB/s |"
        + (" best % of copy BW |" if copy_gbps else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if copy_gbps else ""),
    ]
    for r in results:
        h, b = r["heuristic"], r["best"] or {}
        cells = [
            r["op"], f"{r['N']}x{r['C']} {r['dtype']}",
            f"{h['block']}, {h['warps']}", f"{h.get('ms', float('nan')):.3f}",
            f"{h.get('gbps', float('nan')):.0f}",
            f"{b.get('block')}, {b.get('warps')}", f"{b.get('ms', float('nan')):.3f}",
            f"{b.get('gbps', float('nan')):.0f}",
        ]  # fmt: skip
        if copy_gbps:
            cells.append(f"{100 * b.get('gbps', float('nan')) / copy_gbps:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [(r, v) for r in results for v in r["variants"] if "error" in v]
    if failed:
        lines += ["", "Variants not timed:"]
        lines += [
            f"- {r['op']} BLOCK {v['block']} warps {v['warps']}: {v['error']}" for r, v in failed
        ]
    lines.append("")
    lines.append("Full grid: the JSON beside this report.")
    return "\n".join(lines) + "\n"


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, read + write bytes, median of do_bench."""
    import triton.testing

    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--only", help="comma-separated ops to sweep (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_tune: no CUDA device; this sweep needs one", file=sys.stderr)
        return 3
    only = set(args.only.split(",")) if args.only else None
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    results = []
    for op, n, c, dtype, blocks, warps in GRID:
        if only and op not in only:
            continue
        results.append(sweep(op, n, c, dtype, blocks, warps))
        torch.cuda.empty_cache()
        # Written after every op: a run stopped at its time limit keeps what it measured.
        args.json.write_text(json.dumps({"copy_gbps": copy_gbps, "results": results}, indent=1))
        args.md.write_text(markdown(results, copy_gbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
