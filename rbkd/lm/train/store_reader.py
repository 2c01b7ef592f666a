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

from rbkd.lm.store import SparseStore, StoreError, shard_name

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
    if tail == "bucket" and temperature_column(store, T) is None:
        grid = ", ".join(f"{t:g}" for t in spec.temperatures)
        raise StoreError(
            f"T = {T:g} is not in the store's temperature grid ({grid}): its exact tail is known "
            "only there; use one of them, or --tail renormalize (exact at any T over the kept ids)"
        )
    if tail == "sampled" and not spec.samples:
        raise StoreError(
            f"store {folder} holds no samples: --tail sampled needs a capture with samples"
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

    def __init__(self, store: SparseStore, T: float, k: int | None):
        self.store, self.k = store, k or store.spec.k
        self.column = temperature_column(store, T)
        self._handles: dict[int, object] = {}

    def _handle(self, i: int):
        if i not in self._handles:
            self.store.shard(i)  # size, SHA-256 and spec verified once (raises StoreError)
            from safetensors import safe_open

            path = Path(self.store.folder) / shard_name(i)
            self._handles[i] = safe_open(str(path), framework="pt")
        return self._handles[i]

    def _rows(self, name: str, start: int, end: int, cols: slice | None) -> Tensor:
        m = self.store.spec.shard_tokens
        parts = []
        for i in range(start // m, -(-end // m)):
            s0 = i * m
            view = self._handle(i).get_slice(name)
            a, b = max(start, s0) - s0, min(end, s0 + m) - s0
            parts.append(view[a:b] if cols is None else view[a:b, cols])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def batch(self, starts: Tensor, context: int, inputs: Tensor) -> dict[str, Tensor]:
        """topk_ids, topk_logits [b, C, k], logz [b, C] (None off the grid), samples when held;
        the store's input token at every position must be the student's (else StoreError)."""
        out: dict[str, list[Tensor]] = {}
        spec = self.store.spec
        names = ["input_ids", "topk_ids", "topk_logits"]
        if self.column is not None:
            names.append("logz")
        if spec.samples:
            names += ["sample_ids", "sample_counts"]
        for s in starts.tolist():
            for name in names:
                cols = {"topk_ids": slice(0, self.k), "topk_logits": slice(0, self.k),
                        "logz": slice(self.column, self.column + 1)}.get(name)  # fmt: skip
                out.setdefault(name, []).append(self._rows(name, s, s + context, cols))
        rows = {name: torch.stack(parts) for name, parts in out.items()}
        if not torch.equal(rows["input_ids"].to(torch.int64), inputs.cpu()):
            bad = int(starts[(rows["input_ids"].to(torch.int64) != inputs.cpu()).any(1)][0])
            raise StoreError(
                f"store {self.store.folder} holds other tokens than the student's data at "
                f"positions {bad}..{bad + context - 1}: it was captured over another token "
                "stream (corpus, split or tokenizer); capture it over this one"
            )
        if "logz" in rows:
            rows["logz"] = rows["logz"][..., 0]
        return rows
