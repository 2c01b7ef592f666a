"""What the training loop reads of a token stream, and the order it reads its windows in.

A split is anything shaped like rbkd.lm.tokens.TokenSplit (the corpus's memory-mapped tokens):
len(split), split.tokens(start, end) -> int64, split.vocab_size, split.split, and its identity
split.positions_sha256 / tokenizer_sha256 / corpus_sha256 (what a run's key and a store's
check compare). MemoryTokens gives the same for ids held in memory (tests, synthetic data, a
user's own ids).

Windows are rbkd.lm.tokens.TokenBlocks' grid: window w holds tokens [w C, w C + C + 1), its
first C tokens the inputs and its last C the labels; its input at offset i is stream position
w C + i, which is that position's row in a store captured at context C. Optimizer step s takes
the GLOBAL batch order[s B : (s + 1) B] of an endless sequence of permutations, one per pass
over the W windows, each drawn from (seed, pass), and each rank takes its contiguous share of
it: any step's batch is known without replaying the steps before it (a resume needs no data
state), and the batch means the same for any number of ranks.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import Tensor

from rbkd.engine.seeds import make_generator

_ORDER_STREAM = 0


class MemoryTokens:
    """A token split held in memory, with TokenSplit's interface and a content hash."""

    def __init__(self, ids, *, split: str = "train", vocab_size: int | None = None,
                 tokenizer_sha256: str | None = None) -> None:  # fmt: skip
        ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, Tensor) else ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point:
            raise ValueError(
                f"token ids must be a 1-D integer sequence, got {ids.dtype} {list(ids.shape)}"
            )
        self.ids = ids.to(torch.int64).contiguous()
        if len(self.ids) and int(self.ids.min()) < 0:
            raise ValueError(f"the {split} tokens hold a negative id ({int(self.ids.min())})")
        high = int(self.ids.max()) if len(self.ids) else -1
        self.vocab_size = int(vocab_size if vocab_size is not None else high + 1)
        if high >= self.vocab_size:
            raise ValueError(
                f"the {split} tokens hold id {high}, outside the vocabulary of {self.vocab_size}"
            )
        self.split = split
        self.corpus_sha256 = hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()
        self.tokenizer_sha256 = (
            tokenizer_sha256
            or hashlib.sha256(f"memory tokens, vocabulary {self.vocab_size}".encode()).hexdigest()
        )

    @property
    def positions_sha256(self) -> str:
        text = json.dumps({"corpus_sha256": self.corpus_sha256, "split": self.split,
                           "num_tokens": len(self)}, sort_keys=True)  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, start: int, end: int) -> Tensor:
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"token range [{start}, {end}) is outside [0, {len(self)})")
        return self.ids[start:end]


def split_identity(split) -> dict:
    """What names a split's exact token positions (a run's key, config.json)."""
    return {"split": split.split, "tokens": len(split), "positions_sha256": split.positions_sha256,
            "tokenizer_sha256": split.tokenizer_sha256}  # fmt: skip


def num_windows(split, context: int) -> int:
    return max((len(split) - 1) // context, 0)


def check_windows(split, context: int) -> int:
    n = num_windows(split, context)
    if n < 1:
        raise ValueError(
            f"the {split.split} split holds {len(split)} tokens, fewer than one sequence of "
            f"context {context} plus its next token: use more text or a shorter --context"
        )
    return n


def read_windows(split, windows: Tensor, context: int) -> Tensor:
    """[len(windows), context + 1] int64: each window's inputs and, shifted by one, its labels."""
    rows = [split.tokens(int(w) * context, int(w) * context + context + 1) for w in windows]
    return torch.stack(rows) if rows else torch.empty(0, context + 1, dtype=torch.int64)


class WindowOrder:
    """The global batch of windows at each step (see the module docstring)."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._cached: tuple[int, Tensor] | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if self._cached is None or self._cached[0] != epoch:
            gen = make_generator(self.seed, epoch, _ORDER_STREAM)
            self._cached = (epoch, torch.randperm(self.count, generator=gen))
        return self._cached[1]

    def batch(self, step: int, batch_size: int) -> Tensor:
        positions = range(step * batch_size, (step + 1) * batch_size)
        return torch.stack([self._permutation(p // self.count)[p % self.count] for p in positions])
