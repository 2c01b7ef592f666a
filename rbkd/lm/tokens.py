"""A corpus split as tokens: written once as safetensors shards, read memory-mapped, served in
fixed-length blocks for training and capture (docs/lm-data.md).

The stable API (the LM engine, capture and the Trainer integration build on it):

    split = corpus_tokens("train")                        # pydocs, its BPE-8192, tokenised once
    split = corpus_tokens("validation", corpus="my/texts", tokenizer="tok.json")
    split = tokenize_split(corpus, tokenizer, "train")   # the same from loaded objects
    split = TokenSplit(folder)                            # open an existing token folder
    len(split), split.vocab_size, split.eos_id, split.corpus_sha256, split.tokenizer_sha256
    split.positions_sha256       # what a soft-label store records as its corpus hash
    split.tokens(start, end)     # int64 [end - start], from the memory map
    split.doc_offsets(start, end)  # int64: each position's offset in its document (0 starts one)
    split.head(n)                # the first n tokens (a --limit), a split of its own

    blocks = TokenBlocks(split, context=256)
    len(blocks); blocks[i]       # int64 [context + 1] = tokens [i * context, i * context + context + 1)
    blocks.start(i)              # i * context: the store row of the block's first input token
    blocks.order(seed=0, epoch=0, rank=r, world_size=w)   # this rank's block indices
    for batch in blocks.batches(16, seed=0, epoch=0, rank=r, world_size=w):
        batch.starts [B], batch.input_ids [B, context], batch.labels [B, context]   # all int64

The token stream of a split is its documents (rbkd.lm.corpus, in order) each followed by the
tokenizer's end-of-text token. Position p's label is token p + 1. Blocks lie on a fixed grid from
position 0, so block i's inputs are store rows [i * context, (i + 1) * context) of a soft-label
store captured at that context (rbkd.lm.capture): the teacher saw exactly those inputs. A block
ignores document boundaries (GPT-2's packing); the last partial block is left out.

Storage: `<root>/<split>-<key>/` (root defaults to the cache, `~/.cache/rbkd/lm/tokens`), key =
SHA-256 of (corpus SHA-256, tokenizer SHA-256, split), so a rerun reuses the folder, and another
corpus or tokenizer gets another. It holds `tokens-NNNNNN.safetensors` shards (`tokens` [n],
uint16 when the vocabulary fits, else int32; 2^24 tokens each), `documents.safetensors`
(`doc_starts` int64 [D + 1]: document d is tokens [doc_starts[d], doc_starts[d + 1])) and
`index.json`, written last: each file is written atomically, the folder under an flock (torchrun
ranks wait for the one that tokenises), and the index records every file's size and SHA-256,
checked when the split is opened. Tokenising holds one shard of tokens in memory; reading maps
the files (numpy.memmap), so no process ever holds the whole corpus.

Shuffling is by a seeded torch.Generator (seed, epoch): the same order on every machine. With
world_size w, the order is cut to a multiple of w and rank r takes every w-th block from r, so
every rank runs the same number of steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from rbkd.io import read_json_file, safetensors_canonical, sha256_file, write_bytes, write_json

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "TOKENS_FORMAT",
    "TokenBatch",
    "TokenBlocks",
    "TokenSplit",
    "TokensError",
    "corpus_tokens",
    "default_tokens_root",
    "tokenize_split",
    "tokens_folder",
    "torchrun_rank",
]

TOKENS_FORMAT = "rbkd-lm-tokens/1"
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MB of uint16 per shard, 64 MB as the int32 buffer
_DTYPES = {"U16": np.uint16, "I32": np.int32, "I64": np.int64}
_ENCODE_BATCH = 64  # documents per encode_batch call (the Rust encoder's threads share them)


class TokensError(ValueError):
    """A token folder that is missing, damaged, or not the one asked for (one line)."""


def default_tokens_root() -> Path:
    from rbkd.data.locate import cache_dir

    return cache_dir() / "lm" / "tokens"


def tokens_folder(corpus_sha256: str, tokenizer_sha256: str, split: str, root=None) -> Path:
    """Where the split's tokens live: content-addressed by corpus, tokenizer and split."""
    text = f"{TOKENS_FORMAT}\0{corpus_sha256}\0{tokenizer_sha256}\0{split}"
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    return Path(root if root is not None else default_tokens_root()) / f"{split}-{key}"


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) of this process: the process group's, else torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def _folder_flock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _save(path: Path, name: str, array: np.ndarray, meta: dict[str, str]) -> dict:
    from safetensors.numpy import save

    data = safetensors_canonical(save({name: np.ascontiguousarray(array)}, metadata=meta))
    write_bytes(path, data)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def tokenize_split(
    corpus,
    tokenizer,
    split: str,
    *,
    root: str | os.PathLike[str] | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = False,
) -> TokenSplit:
    """The split's tokens (rbkd.lm.corpus.Corpus, rbkd.lm.tokenizer.LMTokenizer), tokenised into
    their folder on first use, reused after. `progress` shows a bar in files."""
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}")
    files = corpus.splits.get(split)
    if files is None:
        raise ValueError(f"split must be one of {', '.join(corpus.splits)}, got {split!r}")
    if not files:
        raise TokensError(
            f"corpus {corpus.root} has no {split} files (it has {len(corpus.files)} file(s); the "
            "split is by file): give a corpus of more files"
        )
    folder = tokens_folder(corpus.sha256, tokenizer.sha256, split, root)
    with _folder_flock(folder):
        if (folder / "index.json").is_file():
            with contextlib.suppress(TokensError):  # a damaged folder is written again
                return TokenSplit(folder, corpus_sha256=corpus.sha256,
                                  tokenizer_sha256=tokenizer.sha256, split=split)  # fmt: skip
        _write_split(folder, corpus, tokenizer, split, shard_tokens, progress)
    return TokenSplit(
        folder,
        corpus_sha256=corpus.sha256,
        tokenizer_sha256=tokenizer.sha256,
        split=split,
        verify=False,
    )  # fmt: skip  (just written and hashed)


def _write_split(folder, corpus, tokenizer, split, shard_tokens, progress) -> None:
    vocab = tokenizer.vocab_size
    dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    meta = {"format": TOKENS_FORMAT, "corpus_sha256": corpus.sha256,
            "tokenizer_sha256": tokenizer.sha256, "split": split}  # fmt: skip
    shards: list[dict] = []
    pending: list[np.ndarray] = []
    buffered = total = 0
    doc_starts = [0]

    def flush(final: bool) -> None:
        nonlocal pending, buffered
        joined = np.concatenate(pending) if pending else np.empty(0, dtype)
        while len(joined) >= shard_tokens or (final and len(joined)):
            part, joined = joined[:shard_tokens], joined[shard_tokens:]
            start = sum(s["end"] - s["start"] for s in shards)
            path = folder / f"tokens-{len(shards):06d}.safetensors"
            entry = _save(path, "tokens", part, {**meta, "start": str(start)})
            shards.append({**entry, "start": start, "end": start + len(part)})
        pending, buffered = [joined], len(joined)

    bar = _Bar(len(corpus.splits[split]), f"tokenising {split}") if progress else None
    docs = corpus.documents(split)
    with bar if bar is not None else contextlib.nullcontext():
        while batch := [text for _, text in _take(docs, _ENCODE_BATCH)]:
            for ids in tokenizer.encode_batch(batch):
                ids.append(tokenizer.eos_id)
                pending.append(np.asarray(ids, dtype=dtype))
                buffered += len(ids)
                total += len(ids)
                doc_starts.append(total)
            if buffered >= shard_tokens:
                flush(False)
            if bar is not None:
                bar.advance(len(batch))
    flush(True)
    docs_entry = _save(folder / "documents.safetensors", "doc_starts",
                       np.asarray(doc_starts, np.int64), meta)  # fmt: skip
    write_json(folder / "index.json", {
        "format": TOKENS_FORMAT, **{k: v for k, v in meta.items() if k != "format"},
        "vocab_size": vocab, "eos_id": tokenizer.eos_id, "dtype": np.dtype(dtype).name,
        "num_tokens": total, "num_documents": len(doc_starts) - 1, "shard_tokens": shard_tokens,
        "shards": shards, "documents": docs_entry,
    })  # fmt: skip


def _take(it, n):
    for _, item in zip(range(n), it, strict=False):
        yield item


class _Bar:
    """A rich progress bar in files (when asked for, on a terminal, on stderr)."""

    def __init__(self, total: int, what: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        console = Console(stderr=True, highlight=False)  # stdout carries a command's result
        self.progress = None
        if console.is_terminal:  # a bar redrawn into a log file is noise
            self.progress = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=console, transient=True)  # fmt: skip
            self.task = self.progress.add_task(what, total=total)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)


def _memmap(path: Path, name: str) -> np.ndarray:
    """The 1-D tensor `name` of a safetensors file as a read-only numpy memory map."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if size > 8 << 20:
            raise TokensError(f"token shard {path} declares a {size}-byte header: damaged")
        try:
            header = json.loads(handle.read(size))
            entry = header[name]
            dtype = _DTYPES[entry["dtype"]]
            (count,) = entry["shape"]
            begin, end = entry["data_offsets"]
        except (ValueError, KeyError, TypeError) as e:
            raise TokensError(f"token shard {path} is unreadable ({e!r:.80}): damaged") from None
    if end - begin != count * np.dtype(dtype).itemsize:
        raise TokensError(f"token shard {path}: {name}'s size disagrees with its shape: damaged")
    if count == 0:
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + size + begin, shape=(count,))


class TokenSplit:
    """A tokenised corpus split, read memory-mapped (see the module's docstring)."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        corpus_sha256: str | None = None,
        tokenizer_sha256: str | None = None,
        split: str | None = None,
        verify: bool = True,
    ) -> None:
        self.folder = Path(folder)
        try:
            index = read_json_file(self.folder / "index.json", "token index")
        except FileNotFoundError:
            raise TokensError(f"{self.folder} holds no tokens (no index.json)") from None
        except (OSError, ValueError) as e:
            raise TokensError(str(e).splitlines()[0]) from None
        if not isinstance(index, dict) or index.get("format") != TOKENS_FORMAT:
            raise TokensError(f"{self.folder}/index.json is not an rbkd token index")
        asked = {"corpus_sha256": corpus_sha256, "tokenizer_sha256": tokenizer_sha256,
                 "split": split}  # fmt: skip
        for key, want in asked.items():
            if want is not None and index.get(key) != want:
                raise TokensError(
                    f"tokens {self.folder} are of another {key.removesuffix('_sha256')} "
                    f"({str(index.get(key))[:64]!r}, asked for {want[:64]!r})"
                )
        self.corpus_sha256: str = index["corpus_sha256"]
        self.tokenizer_sha256: str = index["tokenizer_sha256"]
        self.split: str = index["split"]
        self.vocab_size: int = int(index["vocab_size"])
        self.eos_id: int = int(index["eos_id"])
        self.num_tokens: int = int(index["num_tokens"])
        self._index = index
        files = [*index["shards"], index["documents"]]
        for entry in files:
            path = self.folder / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise TokensError(
                    f"token file {path} is missing or truncated: delete {self.folder}"
                )
            if verify and sha256_file(path) != entry["sha256"]:
                raise TokensError(
                    f"token file {path} does not match its SHA-256: delete the folder"
                )
        self._shards = [(s["start"], s["end"], _memmap(self.folder / s["file"], "tokens"))
                        for s in index["shards"]]  # fmt: skip
        self._starts = np.array([s[0] for s in self._shards] + [self.num_tokens], np.int64)
        self._doc_starts = _memmap(self.folder / index["documents"]["file"], "doc_starts")
        self._limit = self.num_tokens

    def __len__(self) -> int:
        return self._limit

    @property
    def num_documents(self) -> int:
        """Documents that start before this split's end."""
        return int(np.searchsorted(self._doc_starts, self._limit, side="left"))

    @property
    def positions_sha256(self) -> str:
        """SHA-256 naming the token positions: corpus, split and length (a head(n) is another).
        A soft-label store records it as its corpus hash; the tokenizer is recorded apart."""
        text = json.dumps({"corpus_sha256": self.corpus_sha256, "split": self.split,
                           "num_tokens": len(self)}, sort_keys=True)  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()

    def head(self, n: int) -> TokenSplit:
        """The first n tokens (n >= 2) as a split of its own (its positions_sha256 differs)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n:
            raise ValueError(f"a split's head needs n >= 2 tokens, got {n!r}")
        out = object.__new__(TokenSplit)
        out.__dict__.update(self.__dict__)
        out._limit = min(n, self._limit)
        return out

    def _check(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"token range [{start}, {end}) is outside [0, {len(self)})")

    def tokens(self, start: int, end: int) -> Tensor:
        """Tokens [start, end) as int64 (read from the memory maps; a copy of that range only)."""
        self._check(start, end)
        out = np.empty(end - start, np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < end:
            s0, s1, data = self._shards[i]
            stop = min(end, s1)
            out[pos - start : stop - start] = data[pos - s0 : stop - s0]
            pos, i = stop, i + 1
        return torch.from_numpy(out)

    def doc_offsets(self, start: int, end: int) -> Tensor:
        """Each position's offset in its document, int64 [end - start] (0 where one starts)."""
        self._check(start, end)
        positions = np.arange(start, end, dtype=np.int64)
        doc = np.searchsorted(self._doc_starts, positions, side="right") - 1
        return torch.from_numpy(positions - np.asarray(self._doc_starts[doc], np.int64))

    def document_starts(self) -> Tensor:
        """int64 [D + 1]: document d is tokens [starts[d], starts[d + 1]) (the whole split)."""
        return torch.from_numpy(np.array(self._doc_starts, np.int64))

    def __repr__(self) -> str:
        return f"TokenSplit({self.split!r}, {len(self):,} tokens, vocab {self.vocab_size})"


class TokenBatch(NamedTuple):
    starts: Tensor  # [B] int64: position of each block's first input token (its store row)
    input_ids: Tensor  # [B, context] int64
    labels: Tensor  # [B, context] int64: the next token of each input


class TokenBlocks:
    """Fixed-length blocks of a split on a grid from position 0; a map-style dataset:
    blocks[i] is int64 [context + 1], the inputs and, shifted by one, the labels."""

    def __init__(self, split: TokenSplit, context: int) -> None:
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ValueError(f"context must be an int >= 1, got {context!r}")
        if len(split) < context + 1:
            raise TokensError(
                f"the {split.split} split has {len(split)} tokens, fewer than one block of "
                f"context {context} + 1: give a larger corpus or a shorter context"
            )
        self.split, self.context = split, context

    def __len__(self) -> int:
        return (len(self.split) - 1) // self.context

    def start(self, i: int) -> int:
        return i * self.context

    def __getitem__(self, i: int) -> Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block {i} is outside [0, {n})")
        s = (i % n) * self.context
        return self.split.tokens(s, s + self.context + 1)

    def order(
        self, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, rank: int = 0,
        world_size: int = 1,
    ) -> Tensor:  # fmt: skip
        """This rank's block indices for an epoch: a seeded permutation (or 0..n-1), cut to a
        multiple of world_size, every world_size-th from rank."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
        n = len(self)
        if shuffle:
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        return order[: n - n % world_size][rank::world_size]

    def batches(
        self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
        rank: int = 0, world_size: int = 1, drop_last: bool = False,
    ) -> Iterator[TokenBatch]:  # fmt: skip
        """This rank's batches of `batch_size` blocks (per rank) for an epoch, read lazily."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        order = self.order(seed=seed, epoch=epoch, shuffle=shuffle, rank=rank,
                           world_size=world_size).tolist()  # fmt: skip
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            rows = torch.stack([self[i] for i in chunk])
            starts = torch.tensor([self.start(i) for i in chunk], dtype=torch.int64)
            yield TokenBatch(starts, rows[:, :-1], rows[:, 1:])


def corpus_tokens(
    split: str = "train",
    *,
    corpus: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    vocab_size: int | None = None,
    root: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> TokenSplit:
    """The split's tokens from a corpus folder (default: pydocs) and a tokenizer.json (default:
    the corpus's byte-level BPE of `vocab_size` = 8192, trained on first use)."""
    from rbkd.lm.corpus import load_corpus
    from rbkd.lm.tokenizer import DEFAULT_VOCAB_SIZE, tokenizer_for

    if tokenizer is not None and vocab_size is not None:
        raise ValueError("give a tokenizer or a vocab_size to train one, not both")
    loaded = load_corpus(corpus)
    tok = tokenizer_for(loaded, vocab_size or DEFAULT_VOCAB_SIZE, tokenizer)
    return tokenize_split(loaded, tok, split, root=root, progress=progress)
