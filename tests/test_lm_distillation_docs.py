"""The language-model study's committed record (docs/lm-distillation/, docs/lm-distillation.md):
the stored soft labels kept there (an excerpt of each teacher's top-128 store) recompute from the
teacher weights kept there, in float64 from the teacher's own forward pass; and the report's
tables are the committed results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from oracle_sparse import capture as oracle_capture

pytest.importorskip("transformers")

from rbkd.lm.capture import load_teacher, teacher_identity  # noqa: E402
from rbkd.lm.store import TOPK_DTYPES, SparseStore  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "lm-distillation"
TEACHERS = (
    sorted(p.name for p in (DOCS / "teachers").iterdir()) if (DOCS / "teachers").is_dir() else []
)
WINDOWS = 4  # windows of the context recomputed per teacher


def test_the_record_holds_both_teachers_and_their_excerpts():
    assert TEACHERS == ["long", "short"]
    for name in TEACHERS:
        assert (DOCS / "stores" / f"{name}-k128-excerpt" / "index.json").is_file(), name


@pytest.mark.parametrize("name", TEACHERS)
def test_stored_soft_labels_recompute_from_the_committed_teacher(name):
    model = load_teacher(DOCS / "teachers" / name)
    config, sha = teacher_identity(model)
    store = SparseStore(DOCS / "stores" / f"{name}-k128-excerpt", teacher_sha256=sha,
                        teacher_config=config)  # fmt: skip
    spec = store.spec
    context = json.loads((store.folder / "capture.json").read_text())["context"]
    n = min(spec.num_tokens, WINDOWS * context)
    rows = store.tokens(0, n)
    x = rows["input_ids"].long().reshape(-1, context)
    with torch.inference_mode():  # as the capture: the logits in the store's top-k dtype
        logits = model(input_ids=x, use_cache=False).logits.to(TOPK_DTYPES[spec.topk_dtype])
    logits = logits.reshape(n, -1)
    want = oracle_capture(logits, spec.k, spec.temperatures)
    # logz and entropy at every stored T, in float64 from the recomputed logits
    torch.testing.assert_close(rows["logz"].double(), want["logz"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows["entropy"].double(), want["entropy"], rtol=1e-3, atol=1e-3)
    # the stored ids point at the recomputed top-k values (a different thread count may move a
    # logit by one rounding of the top-k dtype, so a tie at the k-th place may swap)
    at_ids = logits.gather(-1, rows["topk_ids"].long()).double()
    ulp = 2.0**-7 * want["topk_logits"].abs().clamp_min(1.0)
    assert bool(((at_ids - rows["topk_logits"].double()).abs() <= ulp).all())
    assert bool(((rows["topk_logits"].double() - want["topk_logits"]).abs() <= ulp).all())


def test_the_report_is_drawn_from_the_committed_tables():
    """Every student row of the report (mean over seeds) is the mean of results.csv's rows."""
    with open(DOCS / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len({r["key"] for r in rows}) == 82  # every student of studies/pydocs-lm.toml
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["mode"], r["T"], r["k"]), []).append(
            float(r["val_perplexity"])
        )
    report = (DOCS / "report" / "report.md").read_text()
    for key, values in groups.items():
        mean = sum(values) / len(values)
        assert f"{mean:,.1f} ± " in report, key
