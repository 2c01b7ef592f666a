"""Distil from a sparse soft-label store inside Hugging Face Trainer or Lightning (issue 17 item 3;
docs/lm-hf-trainer.md).

    data = StoreDataset(store, tokens, context=256, T=2.0)   # blocks of store rows + their targets
    batch = StoreCollator()([data[0], data[1]])              # padded to [B, S, ...]
    loss = batch_sparse_kd_loss(student(input_ids=batch["input_ids"]).logits, batch, alpha=0.5)
    SparseKDTrainer(model=student, args=args, train_dataset=data, alpha=0.5).train()

Alignment. Row p of a store holds the teacher's soft label at token position p of the corpus: its
prediction of token p + 1 after reading tokens [.., p] (`input_ids` [p] is token p). Example i is
the block of rows [i context, (i + 1) context), the grid rbkd.lm.tokens.TokenBlocks and
rbkd.lm.capture use, so the student reads exactly what the teacher read. Its `labels` are ALREADY
SHIFTED: labels[j] is the token after input_ids[j] (HF's `shift_labels`), so the loss compares
logits[:, j] with labels[:, j] and the stored targets at [:, j]; do not pass them to the model's
own forward, which would shift them once more. A position with no next token in the tokens given
(the end of the corpus) gets -100 and counts nowhere.

The dataset checks, once, that the store's input_ids are the tokens given (a store captured from
another tokenisation is one line, not a silently misaligned distillation), then reads each
example's rows through safetensors slices of the memory-mapped shards: a worker never holds more
than the example. The temperature is chosen from the store's grid, where logz is exact; the
batch carries it, and the loss refuses another.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rbkd.lm.store import SparseStore, StoreError

__all__ = ["SparseKDTrainer", "StoreCollator", "StoreDataset", "batch_sparse_kd_loss"]  # noqa: F822

_ROW_TARGETS = ("topk_ids", "topk_logits", "logz")
_SAMPLED = ("sample_ids", "sample_counts", "sample_logits")


def _grid_index(grid: Sequence[float], T: float, what: str) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, float)):
        raise TypeError(f"{what} must be a float, got {type(T).__name__}")
    for j, t in enumerate(grid):
        if math.isclose(t, float(T), rel_tol=1e-9):
            return j
    shown = ", ".join(f"{t:g}" for t in grid)
    raise ValueError(
        f"{what} = {T:g} is not in the store's temperature grid ({shown}): logz is exact only "
        "there; pick one of them, or capture the store with this T in its grid"
    )


class _Tokens:
    """The tokens given: an rbkd.lm.tokens TokenSplit (anything with .tokens(start, end) and a
    length) or a 1-D sequence, tensor or array of ids; read(start, end) is int64. Picklable, for
    DataLoader workers started by spawn."""

    def __init__(self, tokens: Any) -> None:
        if callable(getattr(tokens, "tokens", None)):
            self.split, self.flat = tokens, None
        else:
            flat = torch.as_tensor(tokens)
            if flat.dim() != 1 or flat.dtype.is_floating_point or flat.dtype == torch.bool:
                raise ValueError(
                    f"tokens must be a 1-D sequence of token ids (or a TokenSplit), got "
                    f"{str(flat.dtype)[6:]} of shape {list(flat.shape)}"
                )
            self.split, self.flat = None, flat

    def __len__(self) -> int:
        return len(self.flat if self.split is None else self.split)

    def read(self, start: int, end: int) -> Tensor:
        if self.split is None:
            return self.flat[start:end].long()
        return torch.as_tensor(self.split.tokens(start, end)).long()


class StoreDataset(torch.utils.data.Dataset):
    """Blocks of `context` store rows with their next-token labels and the store's sparse targets.

    store: a SparseStore or its folder (opened without identity checks: open it yourself with
    teacher_sha256=..., tokenizer_sha256=..., corpus_sha256=... to have them checked).
    tokens: the token stream the store was captured from (an rbkd.lm.tokens.TokenSplit or a 1-D
    sequence of ids); checked against the store's input_ids once, row by row (one read of the
    store, each shard's SHA-256 checked on the way), and giving the label of the last row. None: the store's own input_ids are the tokens (its last row then has
    no label). T: a temperature of the store's grid; logz is read at it. samples=True also yields
    sample_ids, sample_counts, sample_logits (tail="sampled"), sample_T and sample_logz (the
    log-partition at sample_T, which must be in the grid). drop_last=False keeps a last block shorter than `context` (the
    collator pads it).

    Item i: input_ids, labels (int64 [S]), topk_ids (int32 [S, k]), topk_logits ([S, k], the
    store's dtype), logz (float32 [S]), T (a float), and with samples the sampled tensors.
    """

    def __init__(
        self,
        store: SparseStore | str | os.PathLike,
        tokens: Any = None,
        *,
        context: int,
        T: float = 1.0,
        samples: bool = False,
        drop_last: bool = True,
    ) -> None:
        self.store = store if isinstance(store, SparseStore) else SparseStore(store)
        spec = self.store.spec
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ValueError(f"context must be an int >= 1, got {context!r}")
        if not self.store.complete:
            raise StoreError(
                f"store {self.store.folder} is incomplete (shards missing from its index): "
                "finish the capture before training on it"
            )
        self._t = _grid_index(spec.temperatures, T, "T")
        self.context, self.T = context, float(T)
        self.samples = bool(samples)
        self.sample_T: float | None = None
        self._sample_t: int | None = None
        if self.samples:
            if not spec.samples:
                raise ValueError(
                    f"store {self.store.folder} holds no samples (captured with samples=0): "
                    "use samples=False (tail='bucket' or 'renormalize')"
                )
            self.sample_T = float(getattr(spec, "sample_T", 1.0))
            grid = spec.temperatures
            hit = [j for j, t in enumerate(grid) if math.isclose(t, self.sample_T, rel_tol=1e-9)]
            if not hit:  # T is in the grid, so T != sample_T: the weights need logz there
                raise ValueError(
                    f"the store's samples were drawn at sample_T = {self.sample_T:g}, which is "
                    f"not in its temperature grid: their importance weights at T = {self.T:g} "
                    "need the log-partition at sample_T; capture with sample_T in the grid"
                )
            self._sample_t = hit[0]
        n = spec.num_tokens
        self._blocks = n // context if drop_last else -(-n // context)
        if self._blocks == 0:
            raise ValueError(
                f"store {self.store.folder} holds {n} token positions, fewer than one block of "
                f"context {context}: use a shorter context or drop_last=False"
            )
        self._tokens = None
        if tokens is not None:
            self._tokens = _Tokens(tokens)
            length = len(self._tokens)
            if length < n:
                raise ValueError(
                    f"the tokens given are {length:,} long but store {self.store.folder} holds "
                    f"{n:,} positions: give the token stream the store was captured from"
                )
            self._check_tokens()

    def _check_tokens(self) -> None:
        """Every store row's input_ids against the tokens, shard by shard (one line at the first
        difference)."""
        spec = self.store.spec
        for i in range(spec.num_shards):
            s0, s1 = spec.shard_range(i)
            have = self.store.rows(s0, s1, ("input_ids",))["input_ids"].long()
            self._compare(have, self._tokens.read(s0, s1), s0)

    def _compare(self, store_ids: Tensor, tokens: Tensor, start: int) -> None:
        if torch.equal(store_ids, tokens):
            return
        j = int((store_ids != tokens).nonzero()[0, 0])
        raise StoreError(
            f"store {self.store.folder}'s input_ids differ from the tokens given at position "
            f"{start + j:,} (store {int(store_ids[j])}, tokens {int(tokens[j])}): it was "
            "captured from other tokens (another corpus, tokenizer or split); give the tokens it "
            "was captured from, or capture it again"
        )

    def __len__(self) -> int:
        return self._blocks

    def start(self, i: int) -> int:
        """The store row of example i's first position."""
        return i * self.context

    def __getitem__(self, i: int) -> dict[str, Any]:
        if isinstance(i, bool) or not isinstance(i, int):
            i = int(i)  # a numpy or tensor index from a sampler
        if not -self._blocks <= i < self._blocks:
            raise IndexError(f"example {i} is outside [0, {self._blocks})")
        i %= self._blocks
        spec = self.store.spec
        start, end = i * self.context, min((i + 1) * self.context, spec.num_tokens)
        names = ("input_ids", *_ROW_TARGETS) + (_SAMPLED if self.samples else ())
        rows = self.store.rows(start, end, names)
        input_ids = rows["input_ids"].long()
        labels = torch.full_like(input_ids, -100)
        if self._tokens is not None:
            stop = min(end + 1, len(self._tokens))
            following = self._tokens.read(start, stop)
            self._compare(input_ids, following[: end - start], start)
            labels[: stop - start - 1] = following[1:]
        else:  # the store's next row is the next token; its last row has none
            stop = min(end + 1, spec.num_tokens)
            if stop > start + 1:
                following = self.store.rows(start + 1, stop, ("input_ids",))["input_ids"]
                labels[: stop - start - 1] = following.long()
        item: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "topk_ids": rows["topk_ids"],
            "topk_logits": rows["topk_logits"],
            "logz": rows["logz"][:, self._t].contiguous(),
            "T": self.T,
        }
        if self.samples:
            for name in _SAMPLED:
                item[name] = rows[name]
            item["sample_T"] = self.sample_T
            item["sample_logz"] = rows["logz"][:, self._sample_t].contiguous()
        return item


class StoreCollator:
    """Stacks StoreDataset items into a batch [B, S, ...], S the longest item (rounded up to
    `pad_to_multiple_of`). Padding: input_ids `pad_token_id`, attention_mask 0, labels
    `ignore_index` (rows counting nowhere in the loss), and stand-in targets that are valid
    (distinct ids 0..k-1, logits 0, logz = log k, no samples), so no check trips on them. The
    batch also holds `shift_labels` (the same tensor as labels): Hugging Face Trainer counts the
    tokens of a gradient-accumulation step from it, where it would drop labels[:, 0] of a
    causal LM's `labels`, and `attention_mask`."""

    def __init__(
        self, pad_token_id: int = 0, ignore_index: int = -100, pad_to_multiple_of: int | None = None
    ) -> None:
        self.pad_token_id, self.ignore_index = int(pad_token_id), int(ignore_index)
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        for key in ("T", "sample_T"):
            values = {f.get(key) for f in features}
            if len(values) > 1:
                raise ValueError(f"one batch mixes {key} = {sorted(values, key=str)}: use one")
        lengths = [int(f["input_ids"].shape[0]) for f in features]
        s = max(lengths)
        if self.pad_to_multiple_of:
            s = -(-s // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b, k = len(features), int(features[0]["topk_ids"].shape[-1])
        first = features[0]
        out: dict[str, Any] = {
            "input_ids": torch.full((b, s), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(b, s, dtype=torch.long),
            "labels": torch.full((b, s), self.ignore_index, dtype=torch.long),
            "topk_ids": torch.arange(k, dtype=first["topk_ids"].dtype).expand(b, s, k).clone(),
            "topk_logits": torch.zeros(b, s, k, dtype=first["topk_logits"].dtype),
            "logz": torch.full((b, s), math.log(k), dtype=first["logz"].dtype),
        }
        pads = {"sample_ids": -1, "sample_counts": 0, "sample_logits": 0.0}
        for name, value in pads.items():
            if name in first:
                out[name] = torch.full(
                    (b, s, first[name].shape[-1]), value, dtype=first[name].dtype
                )
        if "sample_logz" in first:
            out["sample_logz"] = torch.zeros(b, s, dtype=first["sample_logz"].dtype)
        for r, (f, n) in enumerate(zip(features, lengths, strict=True)):
            out["attention_mask"][r, :n] = 1
            for name, t in out.items():
                if name != "attention_mask" and name in f:
                    t[r, :n] = f[name]
        out["shift_labels"] = out["labels"]
        out["T"] = first["T"]
        if "sample_T" in first:
            out["sample_T"] = first["sample_T"]
        return out


def batch_sparse_kd_loss(
    logits: Tensor,
    batch: Mapping[str, Any],
    *,
    T: float | None = None,
    alpha: float = 0.5,
    tail: str = "bucket",
    divergence: str = "kl",
    ignore_index: int = -100,
    reduction: str = "mean",
    **options: Any,
) -> Tensor:
    """rbkd.ops.sparse_kd_loss of student logits [B, S, V] against a StoreCollator batch:
    (1 - alpha) CE(logits, labels) + alpha T^2 D(teacher, student) per position, positions
    whose label is ignore_index counting nowhere; reduction "mean" is over the counted positions
    (pass "sum" and divide by Trainer's num_items_in_batch to accumulate exactly).

    T defaults to the batch's (the dataset's: logz was read there); another T is refused.
    tail "bucket" (exact tail from logz), "renormalize" (the teacher over its k ids) or
    "sampled" (the dataset's samples=True; the unbiased estimator). `options` go to
    sparse_kd_loss (beta, skew, t_squared)."""
    from rbkd.ops import sparse_kd_loss

    stored_T = float(batch["T"])
    if T is None:
        T = stored_T
    elif not math.isclose(float(T), stored_T, rel_tol=1e-9):
        raise ValueError(
            f"T = {T:g} but the batch's logz is the teacher's at T = {stored_T:g} (the "
            "dataset's T): build the StoreDataset with T=... of the temperature you distil at"
        )
    labels = batch["labels"]
    common = dict(T=T, alpha=alpha, divergence=divergence, ignore_index=ignore_index,
                  reduction=reduction, **options)  # fmt: skip
    if tail == "sampled":
        if "sample_ids" not in batch:
            raise ValueError("tail='sampled' needs StoreDataset(..., samples=True)")
        extra = {"sample_logz": batch["sample_logz"]} if "sample_logz" in batch else {}
        return sparse_kd_loss(
            logits, batch["sample_ids"], batch["sample_logits"], labels, logz=batch["logz"],
            tail="sampled", sample_counts=batch["sample_counts"], sample_T=batch["sample_T"],
            **extra, **common,
        )  # fmt: skip
    logz = batch["logz"] if tail == "bucket" else None
    return sparse_kd_loss(
        logits, batch["topk_ids"], batch["topk_logits"], labels, logz=logz, tail=tail, **common
    )


def _trainer_class():
    from transformers import Trainer

    class SparseKDTrainer(Trainer):
        """transformers.Trainer distilling from a StoreDataset: compute_loss runs the student
        on input_ids (and attention_mask) and returns batch_sparse_kd_loss. Keyword arguments
        T, alpha, tail, divergence and loss_options (a dict for sparse_kd_loss) set the loss;
        the data collator defaults to StoreCollator(). TrainingArguments must say
        remove_unused_columns=False (the stored targets are no arguments of the model's
        forward, and Trainer would drop them)."""

        def __init__(self, *args, T=None, alpha=0.5, tail="bucket", divergence="kl",
                     loss_options=None, **kwargs):  # fmt: skip
            kwargs.setdefault("data_collator", StoreCollator())
            super().__init__(*args, **kwargs)
            if self.args.remove_unused_columns:
                raise ValueError(
                    "SparseKDTrainer needs TrainingArguments(remove_unused_columns=False): "
                    "otherwise Trainer drops the stored targets from every batch"
                )
            self.kd = dict(T=T, alpha=alpha, tail=tail, divergence=divergence,
                           **(loss_options or {}))  # fmt: skip

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            if num_items_in_batch is None:  # the mean over this batch's counted positions
                loss = batch_sparse_kd_loss(outputs.logits, inputs, **self.kd)
            else:  # Trainer counted the whole accumulated step's positions: exact accumulation
                loss = batch_sparse_kd_loss(outputs.logits, inputs, reduction="sum", **self.kd)
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:  # the count is every rank's
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return SparseKDTrainer


def __getattr__(name: str):
    # SparseKDTrainer subclasses transformers.Trainer, an optional dependency (the `examples`
    # extra): built on first use, so that the dataset and the loss work without transformers.
    if name == "SparseKDTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
