"""A causal language model's soft labels over a token split, written to a sparse soft-label store.

    from rbkd.lm.capture import capture, load_teacher
    from rbkd.lm.tokens import corpus_tokens
    model = load_teacher("runs/lm-teacher")          # an HF folder, or a run folder with model/
    result = capture(model, corpus_tokens("train"), "stores/t-train-k32", k=32,
                     temperatures=[1, 2, 4])

The teacher is any Hugging Face causal LM: loaded from a local folder (config.json and
model.safetensors; AutoModelForCausalLM.from_pretrained with local_files_only) or given as a
module (a model built from a config, e.g. a tiny GPT2LMHeadModel in tests). Its vocabulary must be
the tokenizer's (the token split's), and the context no longer than its positions; either is one
line otherwise.

Which positions see what: the split's token stream is cut into blocks of `context` tokens on a
grid from position 0 (rbkd.lm.tokens.TokenBlocks' grid; the last block may be shorter), and the
teacher reads each block on its own, so store row p holds the teacher's next-token distribution
after reading tokens [context * (p // context), p]. The store's shards hold whole blocks
(shard_tokens is a multiple of the context), and each is computed from its own token range only:
any rank, any rerun, computes the same shard from the same inputs, and the per-shard sampling
generator is seeded with (seed, shard).

The store records the teacher's identity (`teacher_identity`: its config without the keys that
say nothing about the function it computes, and the SHA-256 of its weights), the tokenizer's
SHA-256, and as its corpus hash the split's positions_sha256 (corpus, split and length); the
capture's own settings that change what a shard holds (context, seed, the corpus and split by
name) go to `capture.json` beside the index, and a rerun with other ones is refused. Writing is
rbkd.lm.store's: atomic shards, resumable shard by shard, ranks of torchrun each writing the
shards i with i % world_size == rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from rbkd.io import claim_folder, read_json_file, write_json
from rbkd.lm.store import INDEX_FILE, INDEX_LOCK, TOPK_DTYPES, StoreError, StoreSpec, StoreWriter
from rbkd.lm.tokens import TokenSplit, corpus_tokens, torchrun_rank

__all__ = [
    "CAPTURE_FILE",
    "CaptureResult",
    "capture",
    "load_teacher",
    "teacher_folder",
    "teacher_identity",
    "teacher_positions",
]

CAPTURE_FILE = "capture.json"
CAPTURE_FORMAT = "rbkd-lm-capture/1"
SHARD_BLOCK_TOKENS = 1 << 16  # about 64k positions per shard: 13 MB at k = 32 in float32
# Config keys that name a file, a library version or a load-time choice, not the function the
# model computes: a teacher saved and loaded again, or built from the same config, keeps its
# identity without them.
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "architectures",
    "torch_dtype", "dtype", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "use_cache",
)  # fmt: skip


def teacher_folder(path: str | os.PathLike[str]) -> Path:
    """The HF model folder: `path/model` when it holds config.json (an rbkd `lm train-teacher`
    run folder), else `path`; FileNotFoundError in one line otherwise."""
    path = Path(path)
    for folder in (path / "model", path):  # a run folder's own config.json is its run record
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"teacher {path} is neither a Hugging Face model folder (config.json and "
        "model.safetensors) nor a run folder holding one in model/"
    )


def load_teacher(path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM from a local folder (no hub access), in eval mode."""
    folder = teacher_folder(path)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError(
            "loading a teacher needs Hugging Face transformers: pip install 'rbkd[lm]' (from a checkout: pip install -e '.[lm]')"
        ) from None
    import transformers

    # transformers 5 names it dtype; 4.x torch_dtype (and would pass an unknown name on quietly)
    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, **({name: dtype} if dtype else {})
        )
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load the teacher from {folder}: {first[:300]}") from None
    return model.eval()


def teacher_identity(model: nn.Module) -> tuple[dict, str]:
    """(config, weights SHA-256) of a Hugging Face model. The hash is over the state dict in name
    order: each tensor's name, dtype and shape as UTF-8, then its bytes, so a model has the same
    identity in memory, saved, and loaded again (whatever the file's layout)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("the teacher must be a Hugging Face model (with a .config)")
    raw = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    identity = json.loads(json.dumps(raw, sort_keys=True, default=str))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{str(t.dtype)[6:]}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return identity, digest.hexdigest()


def teacher_positions(model: nn.Module) -> int | None:
    """How many positions the teacher reads (None when its config does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


@dataclass
class CaptureResult:
    folder: Path
    spec: StoreSpec
    context: int
    written: list[int] = field(default_factory=list)  # the shards this process wrote
    tokens_written: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0


def _check_settings(folder: Path, settings: dict) -> None:
    """capture.json: written on first use, compared on every rerun."""
    path = folder / CAPTURE_FILE
    if path.is_file():
        try:
            have = read_json_file(path, "capture settings")
        except (OSError, ValueError) as e:
            raise StoreError(str(e).splitlines()[0]) from None
        diff = [k for k in settings if not isinstance(have, dict) or have.get(k) != settings[k]]
        if diff:
            raise StoreError(
                f"{folder} was captured with another {', '.join(diff)} ({CAPTURE_FILE}); rbkd "
                "does not mix them: give another folder"
            )
    else:
        write_json(path, settings)


def _device(device: str | torch.device, world_size: int) -> torch.device:
    from rbkd.engine.device import resolve_device

    resolved = resolve_device(str(device))
    if resolved.type == "cuda" and world_size > 1 and resolved.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolved


def capture(
    model: nn.Module,
    tokens: TokenSplit | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    k: int = 32,
    temperatures: Sequence[float] = (1.0,),
    samples: int = 0,
    sample_T: float = 1.0,
    context: int | None = None,
    batch_size: int = 8,
    topk_dtype: str = "float32",
    shard_tokens: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
    split: str = "train",
) -> CaptureResult:
    """Write the teacher's soft labels over every position of `tokens` into the store `out`
    (rbkd.lm.store), resuming one written before; returns what this process wrote.

    tokens: a TokenSplit, or a corpus folder, whose `split` is tokenised with `tokenizer` (a
    tokenizer.json; default: the corpus's BPE, rbkd.lm.tokens.corpus_tokens).

    k, temperatures, samples, sample_T: rbkd.ops.capture_soft_labels's. context: the block
    length (default: the teacher's positions). topk_dtype: the logits are rounded to it before
    the capture, so logz and the stored logits agree exactly. shard_tokens: positions per shard,
    a multiple of context (default about 65536). rank, world_size: torchrun's by default.
    """
    from rbkd.ops import capture_soft_labels

    if isinstance(tokens, (str, os.PathLike)):
        tokens = corpus_tokens(split, corpus=tokens, tokenizer=tokenizer)
    if not isinstance(tokens, TokenSplit):
        raise TypeError(f"tokens must be an rbkd.lm.tokens.TokenSplit, got {type(tokens).__name__}")
    if topk_dtype not in TOPK_DTYPES:
        raise ValueError(f"topk_dtype must be one of {', '.join(TOPK_DTYPES)}, got {topk_dtype!r}")
    vocab, positions = _vocab_size(model), teacher_positions(model)
    if vocab != tokens.vocab_size:
        raise ValueError(
            f"the teacher's vocabulary has {vocab} ids, the tokenizer's {tokens.vocab_size}: "
            "capture with the tokenizer the teacher was trained with"
        )
    context = positions if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be an int >= 1 (the teacher's config names none), got {context!r}")  # fmt: skip
    if positions is not None and context > positions:
        raise ValueError(
            f"context {context} is longer than the teacher's {positions} positions: give "
            f"--context {positions} or less"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if shard_tokens is None:
        shard_tokens = context * max(1, SHARD_BLOCK_TOKENS // context)
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1 \
            or shard_tokens % context:  # fmt: skip
        raise ValueError(
            f"shard_tokens must be a positive multiple of the context {context}, got {shard_tokens!r}"
        )
    if rank is None or world_size is None:
        rank, world_size = torchrun_rank()
    config, weights_sha = teacher_identity(model)
    spec = StoreSpec(
        k=k, temperatures=tuple(temperatures), topk_dtype=topk_dtype, num_tokens=len(tokens),
        shard_tokens=shard_tokens, teacher_config=config, teacher_sha256=weights_sha,
        tokenizer_sha256=tokens.tokenizer_sha256, corpus_sha256=tokens.positions_sha256,
        samples=samples, sample_T=float(sample_T),
    )  # fmt: skip
    if samples and float(sample_T) not in spec.temperatures:
        raise ValueError(
            f"sample_T {sample_T:g} must be one of the temperatures {list(spec.temperatures)}: "
            "the sampled estimator needs the log-partition where the samples were drawn"
        )
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V = {vocab}], got {k}")
    out = Path(out)
    # A new or empty folder, or a store: never a folder of the user's files.
    claim_folder(out, "sparse soft-label store", recognise=_is_store,
                 todo="give a new or empty --out folder")  # fmt: skip
    writer = StoreWriter(out, spec)  # refuses a store of another spec, in one line
    _check_settings(out, {
        "format": CAPTURE_FORMAT, "context": context, "seed": seed, "split": tokens.split,
        "corpus_sha256": tokens.corpus_sha256, "num_tokens": len(tokens),
    })  # fmt: skip
    dev = _device(device, world_size)
    model = model.to(dev).eval()
    todo = [i for i in range(rank, spec.num_shards, world_size) if not writer.done(i)]
    result = CaptureResult(out, spec, context)
    bar = _TokenBar(sum(_span(spec, i) for i in todo), enabled=progress and rank == 0)
    started = time.perf_counter()
    with bar:
        for i in todo:
            tensors = _shard(model, tokens, spec, i, context, batch_size, seed, dev, bar,
                             capture_soft_labels)  # fmt: skip
            writer.write_shard(i, tensors)
            result.written.append(i)
            result.tokens_written += _span(spec, i)
    result.seconds = time.perf_counter() - started
    return result


def _is_store(folder: Path) -> bool:
    """A store, or one that another torchrun rank is creating now (its index lock, and maybe the
    index's temporary file, but no index yet)."""
    if (folder / INDEX_FILE).is_file():
        return True
    names = [p.name for p in folder.iterdir()]
    return all(n == INDEX_LOCK or (n.startswith(f".{INDEX_FILE}.") and n.endswith(".part"))
               for n in names)  # fmt: skip


def _span(spec: StoreSpec, i: int) -> int:
    start, end = spec.shard_range(i)
    return end - start


def _shard(model, tokens, spec, i, context, batch_size, seed, dev, bar, capture_fn):
    start, end = spec.shard_range(i)
    ids = tokens.tokens(start, end)
    starts = list(range(0, end - start, context))  # block offsets in the shard
    full = [s for s in starts if s + context <= end - start]
    groups = [full[b : b + batch_size] for b in range(0, len(full), batch_size)]
    groups += [[s] for s in starts[len(full) :]]  # the split's last block, when shorter
    dtype = TOPK_DTYPES[spec.topk_dtype]
    gen = None
    if spec.samples:
        gen = torch.Generator(device=dev).manual_seed(int(seed) * 1_000_003 + i)
    parts: dict[str, list[Tensor]] = {}
    with torch.inference_mode():
        for group in groups:
            length = min(context, end - start - group[0])
            x = torch.stack([ids[s : s + length] for s in group]).to(dev)
            logits = model(input_ids=x, use_cache=False).logits.to(dtype)
            got = capture_fn(logits, spec.k, list(spec.temperatures), samples=spec.samples,
                             sample_T=spec.sample_T, generator=gen)  # fmt: skip
            out = {"topk_ids": got.topk_ids, "topk_logits": got.topk_logits, "logz": got.logz,
                   "entropy": got.entropy}  # fmt: skip
            if spec.samples:
                out["sample_ids"], out["sample_counts"] = got.sample_ids, got.sample_counts
                out["sample_logits"] = logits.gather(-1, got.sample_ids.clamp_min(0).long())
            for name, t in out.items():
                parts.setdefault(name, []).append(t.reshape(-1, *t.shape[2:]).cpu())
            bar.advance(x.numel())
    # Full blocks in order, then the split's shorter last one: the rows are in position order.
    tensors = {name: torch.cat(ts) for name, ts in parts.items()}
    tensors["input_ids"] = ids.int()
    tensors["doc_offsets"] = tokens.doc_offsets(start, end).int()
    return tensors


class _TokenBar:
    """A rich bar of positions captured, in tokens/s (stderr, on a terminal, rank 0 only)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True, highlight=False)
        if not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("capture"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:,.0f} tokens/s"), TimeRemainingColumn(),
            console=console, transient=True,
        )  # fmt: skip
        self.task = self.progress.add_task("capture", total=total, rate=0.0)
        self.started = time.perf_counter()
        self.done = 0

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, advance=n, rate=rate)


class _CallableModule(types.ModuleType):
    """`rbkd.lm.capture(model, tokens, out, ...)` is the issue's spelling of the Python API, and
    `rbkd.lm.capture` is also this module's name: once the module is imported the package's
    attribute is the module, so the module itself forwards a call to `capture`."""

    def __call__(self, *args, **kwargs) -> CaptureResult:
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
