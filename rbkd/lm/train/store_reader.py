"""A sparse soft-label store read at a batch's token positions, checked against the student's run.

rbkd.lm.store.SparseStore verifies each shard (size, SHA-256, spec) on its first read; after that
the rows a batch needs are sliced from the memory-mapped shard (safetensors' get_slice), so a
step reads k ids and logits for its own B x C positions, never a whole shard.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from rbkd.lm.store import SparseStore, StoreError

_T_MATCH = 1e-6  # relative: a T within this of a grid temperature is that temperature


def temperature_column(store: SparseStore, T: float) -> int | None:
    """The grid column of T, or None when T is not in the store's grid."""
    for j, t in enumerate(store.spec.temperatures):
        if math.isclose(t, T, rel_tol=_T_MATCH, abs_tol=0.0):
            return j
    return None


def open_store(folder: Path, *, T: float, k: int | None, tail: str, vocab_size: int,
               tokens_needed: int, tokenizer_sha256: str | None = None,
               corpus_sha256: str | None = None, teacher_sha256: str | None = None) -> SparseStore:  # fmt: skip
    """The store, refused in one line (StoreError) where it cannot teach this student: another
    tokenizer, corpus or teacher; a teacher vocabulary other than the student's; a T outside its
    grid (tail="bucket" needs the exact log-partition at T); k above its k; too few positions."""
    store = SparseStore(folder, tokenizer_sha256=tokenizer_sha256, corpus_sha256=corpus_sha256,
                        teacher_sha256=teacher_sha256)  # fmt: skip
    spec = store.spec
    teacher_vocab = spec.teacher_config.get("vocab_size")
    if teacher_vocab is not None and teacher_vocab != vocab_size:
        raise StoreError(
            f"store {folder} holds a teacher of vocabulary {teacher_vocab}, the student's is "
            f"{vocab_size}: distill with the tokenizer the teacher was captured with"
        )
    if k is not None and k > spec.k:
        raise StoreError(f"--k {k} is more than the store's k = {spec.k}: use --k {spec.k} or less")
    if tail in ("bucket", "sampled") and temperature_column(store, T) is None:
        grid = ", ".join(f"{t:g}" for t in spec.temperatures)
        raise StoreError(
            f"T = {T:g} is not in the store's temperature grid ({grid}): its exact tail is known "
            "only there; use one of them, or --tail renormalize (exact at any T over the kept ids)"
        )
    if tail == "sampled":
        sample_T = getattr(spec, "sample_T", None)
        if not spec.samples:
            raise StoreError(
                f"store {folder} holds no samples: --tail sampled needs a capture with --samples"
            )
        if sample_T is None or (T != sample_T and temperature_column(store, sample_T) is None):
            raise StoreError(
                f"T = {T:g} is not the temperature the samples were drawn at ({sample_T}), whose "
                f"log-partition the importance weights need is not in the store: use --T {sample_T}"
            )
    if spec.num_tokens < tokens_needed:
        raise StoreError(
            f"store {folder} covers {spec.num_tokens} token positions, the student's training "
            f"split needs {tokens_needed}: capture the whole split"
        )
    missing = [i for i in range(spec.num_shards) if i not in store.entries]
    if missing:
        raise StoreError(
            f"store {folder} lacks {len(missing)} of its {spec.num_shards} shards (first: "
            f"{missing[0]}): finish the capture (rerun it) first"
        )
    return store


class StoreRows:
    """Rows [start, start + C) of the store for each window start of a batch."""

    def __init__(self, store: SparseStore, T: float, k: int | None, *, samples: bool = False):
        self.store, self.k = store, k or store.spec.k
        self.column = temperature_column(store, T)
        self.samples = samples
        self.sample_T = getattr(store.spec, "sample_T", None)
        self.sample_column = (
            temperature_column(store, self.sample_T) if samples and self.sample_T else None
        )

    def _reads(self) -> list[tuple[str, str, slice | None]]:
        """(name in the batch, tensor in the shard, columns) of everything a batch needs."""
        kept = slice(0, self.k)
        reads = [("input_ids", "input_ids", None), ("topk_ids", "topk_ids", kept),
                 ("topk_logits", "topk_logits", kept)]  # fmt: skip
        if self.column is not None:
            reads.append(("logz", "logz", slice(self.column, self.column + 1)))
        if self.samples:
            reads += [(n, n, None) for n in ("sample_ids", "sample_counts", "sample_logits")]
            if self.sample_column is not None:
                col = slice(self.sample_column, self.sample_column + 1)
                reads.append(("sample_logz", "logz", col))
        return reads

    def batch(self, starts: Tensor, context: int, inputs: Tensor) -> dict[str, Tensor]:
        """topk_ids, topk_logits [b, C, k] and logz [b, C] (at T, when on the grid); with samples
        also sample_ids, sample_counts, sample_logits [b, C, s] and sample_logz (at sample_T).
        The store's input token at every position must be the student's (else StoreError)."""
        out: dict[str, list[Tensor]] = {}
        for s in starts.tolist():
            for name, source, cols in self._reads():
                out.setdefault(name, []).append(
                    self.store.rows(s, s + context, [source], cols)[source]
                )
        rows = {name: torch.stack(parts) for name, parts in out.items()}
        stored = rows["input_ids"].to(torch.int64)
        if not torch.equal(stored, inputs.cpu()):
            bad = int(starts[(stored != inputs.cpu()).any(1)][0])
            raise StoreError(
                f"store {self.store.folder} holds other tokens than the student's data at "
                f"positions {bad}..{bad + context - 1}: it was captured over another token "
                "stream (corpus, split or tokenizer); capture it over this one"
            )
        for name in ("logz", "sample_logz"):
            if name in rows:
                rows[name] = rows[name][..., 0]
        return rows
