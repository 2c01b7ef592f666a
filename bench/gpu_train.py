"""One epoch of the small and large Fashion-MNIST teachers and of the general student, on a GPU,
through the command line a user types (run by bench/gpu.sh).

    python bench/gpu_train.py --work DIR --json train.json --md train.md

Each step is `python -m rbkd ... --device cuda --json` in a fresh process, timed from start to
exit (start-up, data loading, the epoch, the test evaluation and the soft labels all included).
The student distills from the small teacher's soft labels at T = 9.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STEPS = [  # (name, arguments after `rbkd`)
    ("small teacher", ["train-teacher", "--capacity", "small"]),
    ("large teacher", ["train-teacher", "--capacity", "large"]),
    ("general student (T=9, from the small teacher)", ["distill", "--student", "general",
                                                       "--T", "9"]),
]  # fmt: skip


def run_step(args: list[str], log: Path) -> tuple[float, dict | None, str]:
    cmd = [sys.executable, "-P", "-m", "rbkd", *args]
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return seconds, None, f"exit {proc.returncode}: {tail[0][:300]}"
    try:
        return seconds, json.loads(proc.stdout), ""
    except json.JSONDecodeError:
        return seconds, None, "the command printed no JSON document"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the run folders")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    common = ["--dataset", "fashion-mnist", "--epochs", "1", "--batch-size", str(args.batch_size),
              "--seed", "0", "--device", "cuda", "--no-progress", "--json"]  # fmt: skip
    rows = []
    for i, (name, step) in enumerate(STEPS):
        out = args.work / f"step{i}"
        extra = ["--teacher", str(args.work / "step0")] if step[0] == "distill" else []
        seconds, doc, error = run_step([*step, *common, *extra, "--out", str(out)],
                                       args.work / f"step{i}.log")  # fmt: skip
        metrics = (doc or {}).get("metrics", doc or {})
        accuracy = metrics.get("test_accuracy")
        rows.append({"step": name, "seconds": seconds, "test_accuracy": accuracy, "error": error})
        print(f"{name}: {seconds:.1f} s, accuracy {accuracy}, {error or 'ok'}", flush=True)
        args.json.write_text(json.dumps(rows, indent=1))
    lines = [
        "## One epoch through the CLI (bench/gpu_train.py)",
        "",
        f"`rbkd <command> --dataset fashion-mnist --epochs 1 --batch-size {args.batch_size} "
        "--seed 0 --device cuda`, each a fresh process timed from start to exit (start-up, "
        "data, the epoch, the test evaluation and the soft labels included).",
        "",
        "| step | wall s | test accuracy | |",
        "|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['test_accuracy']:.2%}" if isinstance(r["test_accuracy"], float) else "-"
        lines.append(f"| {r['step']} | {r['seconds']:.1f} | {acc} | {r['error'] or 'ok'} |")
    args.md.write_text("\n".join(lines) + "\n")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
