"""Capture overhead on a tiny GPT-2's forward (issue 16, item 7): goal <= 20% of the forward.

Each case times, on one batch of `batch` blocks of `context` tokens at vocabulary 8192:

- `forward`: the teacher's forward pass, `model(input_ids).logits` (what a capture cannot avoid);
- `capture-<backend>`: rbkd.ops.capture_soft_labels on those logits (top-k = 32, logz and entropy
  at T = 1, 2, 4), the extra work of a capture, with the torch twin and the C++ backend where it
  is built.

The models are the issue's two measured GPT-2 sizes: 2 layers x 192 (2.5M parameters, the
student-sized one, where the vocabulary is the largest share and the overhead the largest) and
6 layers x 384 (13.9M). extra_info carries the overhead, capture / forward, computed against the
forward timed in the same run, and the store's bytes per token at these settings. Nothing here
asserts a speed: bench/report.py reads the JSON.
"""

from __future__ import annotations

import os

import pytest
import torch

import rbkd.ops
from rbkd.lm.store import bytes_per_token
from rbkd.ops import use_backend

transformers = pytest.importorskip("transformers")
QUICK = os.environ.get("RBKD_BENCH_QUICK", "0").strip().lower() not in ("", "0", "false", "no")

VOCAB, K, TEMPS = 8192, 32, [1.0, 2.0, 4.0]
CONTEXT, BATCH = (64, 2) if QUICK else (256, 8)
MODELS = {"gpt2-2x192": (2, 192, 4), "gpt2-6x384": (6, 384, 6)}  # layers, width, heads
BACKENDS = [b for b in ("torch", "cpu") if b in rbkd.ops.available_backends()]
_forward_median: dict[str, float] = {}


def _model(name: str):
    layers, width, heads = MODELS[name]
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=width,
                                     n_layer=layers, n_head=heads)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def models():
    return {name: _model(name) for name in MODELS}


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("part", ["forward", *(f"capture-{b}" for b in BACKENDS)])
def test_capture_overhead(benchmark, bench_timer, models, name, part):
    model, x = models[name], _batch()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        logits = model(input_ids=x, use_cache=False).logits
    if part == "forward":

        def fn():
            with torch.inference_mode():
                return model(input_ids=x, use_cache=False).logits

        median = bench_timer(benchmark, fn, cpu)
        if median is not None:
            _forward_median[name] = median
    else:
        backend = part.removeprefix("capture-")

        def fn():
            with use_backend(backend):
                return rbkd.ops.capture_soft_labels(logits, K, TEMPS)

        median = bench_timer(benchmark, fn, cpu)
        forward = _forward_median.get(name)
        if median is not None and forward:
            benchmark.extra_info["overhead_vs_forward"] = median / forward
    tokens = BATCH * CONTEXT
    benchmark.extra_info.update(
        model=name, part=part, tokens=tokens, vocab=VOCAB, k=K, temperatures=TEMPS,
        parameters=sum(p.numel() for p in model.parameters()),
        store_bytes_per_token=bytes_per_token(K, len(TEMPS), "float32"),
        threads=torch.get_num_threads(),
    )  # fmt: skip
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / stats.stats.median
