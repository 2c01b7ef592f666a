"""Training speed of rbkd.lm.train's loop on the pydocs corpus: tokens/s per optimizer step.

    python bench/lm_train_speed.py --model teacher --precision fp32 --steps 4

Each step is timed by the loop itself (a metrics row per step, no validation); the first step
(allocations, kernel choice) is left out and the median of the rest printed as one JSON line,
with the load average and thread count, since this CPU is often shared. Freed memory is kept
for reuse as in the `rbkd` command (rbkd/memory_policy.py); RBKD_MALLOC=system measures without.
Numbers from this machine are in docs/lm-training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from rbkd import memory_policy
from rbkd.lm.tokens import corpus_tokens
from rbkd.lm.train.config import LMTrainConfig
from rbkd.lm.train.loop import fit_lm
from rbkd.lm.train.models import build_model, model_config, parameter_count
from rbkd.lm.train.objectives import HardLabels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="teacher")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    memory_policy.keep_freed_memory()  # as the `rbkd` command does; RBKD_MALLOC=system: glibc's
    train = corpus_tokens("train")
    cfg = LMTrainConfig(steps=args.steps, batch_size=args.batch_size, context=args.context,
                        warmup_steps=1, eval_every=1, precision=args.precision, device="cpu")  # fmt: skip
    model = build_model(model_config(args.model, train.vocab_size, args.context), 0)
    rows: list[dict] = []
    fit_lm(model, train, None, cfg, HardLabels(), progress=False, on_row=rows.append)
    rates = [r["tokens_per_s"] for r in rows[1:]]  # the first step warms up
    print(json.dumps({
        "model": args.model, "parameters": parameter_count(model), "precision": args.precision,
        "context": args.context, "batch_size": args.batch_size, "steps_timed": len(rates),
        "tokens_per_s_median": statistics.median(rates), "tokens_per_s": [round(r) for r in rates],
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "freed_memory": memory_policy.describe(),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
