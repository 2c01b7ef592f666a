"""The sparse soft-label store: a folder of safetensors shards plus index.json (docs/sparse-soft-labels.md).

Shard i holds token positions [i M, min((i + 1) M, num_tokens)) of the corpus, M = shard_tokens:

    topk_ids       [m, k] int32     the teacher's k largest logits' ids, descending
    topk_logits    [m, k] topk_dtype   their raw logits (float32, float16 or bfloat16)
    logz           [m, J] float32   log sum_v exp(z_v / T_j) over the full vocabulary
    entropy        [m, J] float32   entropy (nats) of softmax(z / T_j)
    input_ids      [m]    int32     the position's input token
    doc_offsets    [m]    int32     the position's offset in its document (0 starts a document)
    sample_ids     [m, s] int32     with samples = s > 0: capture_soft_labels's samples (drawn
    sample_counts  [m, s] int32     at spec.sample_T), their counts ...
    sample_logits  [m, s] topk_dtype  ... and the teacher's raw logits there (padding: any value),
                                    which tail="sampled" of sparse_kd_loss needs

Each shard is written atomically (rbkd.io.write_bytes: temporary file, fsync, rename), then its
SHA-256 and size enter the index under an flock, so ranks may write their own shards at once. A
kill loses at most the shard being written; a rerun writes only shards that do not exist and verify
(a shard written but missing from the index, a kill between the two steps, is verified by its own
metadata and adopted). Readers open the index with the teacher, tokenizer and corpus they expect
and are refused (StoreError, one line) when they differ; a shard whose size or SHA-256 is not the
index's is refused when first read; tensors come from safetensors' memory-mapped safe_open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rbkd.io import (
    MAX_METADATA_BYTES,
    read_json_file,
    read_safetensors_metadata,
    safetensors_canonical,
    sha256_file,
    write_bytes,
    write_json,
)

FORMAT = "rbkd-sparse-soft-labels/1"
INDEX_FILE = "index.json"
INDEX_LOCK = ".index.lock"
TOPK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_IDENTITY = ("teacher_config", "teacher_sha256", "tokenizer_sha256", "corpus_sha256")


class StoreError(ValueError):
    """A store that is missing, damaged, or not the one asked for (one line, naming it)."""


def _shown(value: Any, limit: int = 120) -> str:
    """An untrusted value quoted for a message: repr escapes control characters, cut at limit."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds and whose it is: equal specs, and only those, share a store."""

    k: int
    temperatures: tuple[float, ...]
    topk_dtype: str  # TOPK_DTYPES
    num_tokens: int
    shard_tokens: int  # M, token positions per shard
    teacher_config: dict = field(default_factory=dict)  # the teacher's architecture config
    teacher_sha256: str = ""  # SHA-256 of its weights
    tokenizer_sha256: str = ""
    corpus_sha256: str = ""
    samples: int = 0
    sample_T: float = 1.0  # the temperature the samples were drawn at

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        if isinstance(self.sample_T, bool) or not isinstance(self.sample_T, (int, float)):
            raise ValueError(f"sample_T must be a number, got {_shown(self.sample_T)}")
        object.__setattr__(self, "sample_T", float(self.sample_T))
        if not (math.isfinite(self.sample_T) and self.sample_T > 0):
            raise ValueError(f"sample_T must be finite and > 0, got {self.sample_T}")
        for name in ("k", "num_tokens", "shard_tokens", "samples"):
            value = getattr(self, name)
            low = 1 if name in ("k", "shard_tokens") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {_shown(value)}")
        if not self.temperatures or not all(math.isfinite(t) and t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be finite and > 0, got {self.temperatures}")
        if self.topk_dtype not in TOPK_DTYPES:
            raise ValueError(
                f"topk_dtype must be one of {', '.join(TOPK_DTYPES)}, got {_shown(self.topk_dtype)}"
            )
        for name in ("teacher_sha256", "tokenizer_sha256", "corpus_sha256"):
            if not _HEX64.match(getattr(self, name)):
                raise ValueError(
                    f"{name} must be 64 lowercase hex digits, got {_shown(getattr(self, name))}"
                )
        if not isinstance(self.teacher_config, Mapping):
            raise TypeError("teacher_config must be a dict (the teacher's architecture config)")
        text = json.dumps(self.teacher_config, sort_keys=True, allow_nan=False)
        if len(text) > MAX_METADATA_BYTES:
            raise ValueError(
                f"teacher_config is {len(text)} bytes as JSON (limit {MAX_METADATA_BYTES})"
            )
        object.__setattr__(self, "teacher_config", json.loads(text))  # as the index will hold it

    @property
    def num_shards(self) -> int:
        return -(-self.num_tokens // self.shard_tokens)

    def shard_range(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} is outside [0, {self.num_shards})")
        return i * self.shard_tokens, min(self.num_tokens, (i + 1) * self.shard_tokens)

    def digest(self) -> str:
        """SHA-256 of the spec as canonical JSON: every shard carries it in its metadata."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def from_json(obj: Any) -> StoreSpec:
        if not isinstance(obj, dict):
            raise ValueError("the spec must be a JSON object")
        names = set(StoreSpec.__dataclass_fields__)
        unknown = set(obj) - names
        if unknown or not names <= set(obj):
            raise ValueError(f"the spec's fields are {sorted(obj)[:12]}, expected {sorted(names)}")
        return StoreSpec(**obj)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.safetensors"


def bytes_per_token(
    k: int, num_temperatures: int, topk_dtype: str = "bfloat16", samples: int = 0
) -> int:
    """Tensor bytes per token position (the shard's header adds a few hundred bytes per shard)."""
    value = TOPK_DTYPES[topk_dtype].itemsize
    return k * (4 + value) + num_temperatures * 8 + 4 + 4 + samples * (8 + value)


def _expected(spec: StoreSpec, m: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    j = len(spec.temperatures)
    out = {
        "topk_ids": ((m, spec.k), torch.int32),
        "topk_logits": ((m, spec.k), TOPK_DTYPES[spec.topk_dtype]),
        "logz": ((m, j), torch.float32),
        "entropy": ((m, j), torch.float32),
        "input_ids": ((m,), torch.int32),
        "doc_offsets": ((m,), torch.int32),
    }
    if spec.samples:
        out["sample_ids"] = out["sample_counts"] = ((m, spec.samples), torch.int32)
        out["sample_logits"] = ((m, spec.samples), TOPK_DTYPES[spec.topk_dtype])
    return out


def _check_tensors(spec: StoreSpec, m: int, tensors: Mapping[str, Tensor], where: str) -> None:
    expected = _expected(spec, m)
    if set(tensors) != set(expected):
        raise StoreError(
            f"{where}: tensors {sorted(tensors)}, expected {sorted(expected)} (samples={spec.samples})"
        )
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise StoreError(f"{where}: {name} must be {str(dtype)[6:]} {list(shape)}, got {got}")


@contextlib.contextmanager
def _index_lock(folder: Path) -> Iterator[None]:
    """A blocking flock around the index's read-modify-write (ranks share one index)."""
    fd = os.open(folder / INDEX_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _read_index(folder: Path) -> dict:
    path = folder / INDEX_FILE
    try:
        index = read_json_file(path, "sparse soft-label index")
    except FileNotFoundError:
        raise StoreError(f"{folder} is not a sparse soft-label store (no {INDEX_FILE})") from None
    except (OSError, ValueError) as e:
        raise StoreError(str(e).splitlines()[0]) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise StoreError(f"{path}: format {_shown(got)}, this rbkd reads {FORMAT!r}")
    try:
        index["spec"] = StoreSpec.from_json(index.get("spec"))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{path}: unreadable spec ({str(e).splitlines()[0]})") from None
    shards = index.get("shards")
    if not isinstance(shards, dict):
        raise StoreError(f"{path}: 'shards' must be an object")
    return index


def _index_json(spec: StoreSpec, shards: dict) -> dict:
    return {"format": FORMAT, "spec": asdict(spec), "shards": dict(sorted(shards.items()))}


class StoreWriter:
    """Writes a store shard by shard; a store that exists must have the same spec."""

    def __init__(self, folder: str | os.PathLike, spec: StoreSpec) -> None:
        self.folder, self.spec = Path(folder), spec
        self.folder.mkdir(parents=True, exist_ok=True)
        with _index_lock(self.folder):
            if (self.folder / INDEX_FILE).exists():
                have = _read_index(self.folder)["spec"]
                if have != spec:
                    diff = [
                        n
                        for n in StoreSpec.__dataclass_fields__
                        if getattr(have, n) != getattr(spec, n)
                    ]
                    raise StoreError(
                        f"{self.folder} holds sparse soft labels with another {', '.join(diff)}; "
                        "rbkd does not mix them: give another folder"
                    )
            else:
                write_json(self.folder / INDEX_FILE, _index_json(spec, {}))

    def done(self, i: int) -> bool:
        """Whether shard i exists and verifies (a verified shard missing from the index, a kill
        between writing it and recording it, is recorded now)."""
        path = self.folder / shard_name(i)
        if not path.is_file():
            return False
        entry = _read_index(self.folder)["shards"].get(str(i))
        sha = sha256_file(path)
        if entry is not None:
            return entry.get("sha256") == sha and entry.get("bytes") == path.stat().st_size
        try:
            _verify_shard(self.spec, i, path)
        except StoreError:
            return False
        self._record(i, sha, path.stat().st_size)
        return True

    def write_shard(self, i: int, tensors: Mapping[str, Tensor]) -> None:
        """Write shard i (the tensors of its token range, rbkd.lm.store's layout) atomically."""
        from safetensors.torch import save

        start, end = self.spec.shard_range(i)
        tensors = {  # None stands for an absent tensor (capture_soft_labels without samples)
            name: t.detach().cpu().contiguous() if isinstance(t, Tensor) else t
            for name, t in tensors.items()
            if t is not None
        }
        _check_tensors(self.spec, end - start, tensors, f"shard {i}")
        meta = {"format": FORMAT, "spec_sha256": self.spec.digest(), "shard": str(i),
                "start": str(start), "end": str(end)}  # fmt: skip
        data = safetensors_canonical(save(tensors, metadata=meta))  # same bytes in every rank
        write_bytes(self.folder / shard_name(i), data)
        self._record(i, hashlib.sha256(data).hexdigest(), len(data))

    def _record(self, i: int, sha: str, size: int) -> None:
        start, end = self.spec.shard_range(i)
        with _index_lock(self.folder):
            shards = _read_index(self.folder)["shards"]
            shards[str(i)] = {"file": shard_name(i), "start": start, "end": end, "sha256": sha,
                              "bytes": size}  # fmt: skip
            write_json(self.folder / INDEX_FILE, _index_json(self.spec, shards))


def write_store(
    folder: str | os.PathLike,
    spec: StoreSpec,
    compute: Callable[[int, int], Mapping[str, Tensor]],
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[int]:
    """Write every missing shard of the store (this rank's: i % world_size == rank), calling
    compute(start, end) for the tensors of token positions [start, end); returns the shards it
    wrote. A rerun after a kill computes only the shards that are not there."""
    writer = StoreWriter(folder, spec)
    written = []
    for i in range(rank, spec.num_shards, world_size):
        if writer.done(i):
            continue
        writer.write_shard(i, compute(*spec.shard_range(i)))
        written.append(i)
    return written


def _verify_shard(spec: StoreSpec, i: int, path: Path) -> dict[str, str]:
    try:
        meta = read_safetensors_metadata(path, "sparse soft-label shard")
    except (OSError, ValueError) as e:
        raise StoreError(str(e).splitlines()[0]) from None
    start, end = spec.shard_range(i)
    want = {"format": FORMAT, "spec_sha256": spec.digest(), "shard": str(i), "start": str(start),
            "end": str(end)}  # fmt: skip
    bad = [key for key, value in want.items() if meta.get(key) != value]
    if bad:
        raise StoreError(
            f"shard {path}: metadata {bad[0]} is {_shown(meta.get(bad[0]))}, expected "
            f"{_shown(want[bad[0]])}: it belongs to another store; delete it and rerun the capture"
        )
    return meta


class SparseStore:
    """A store opened for reading; refuses (StoreError) another teacher, tokenizer or corpus."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        teacher_sha256: str | None = None,
        tokenizer_sha256: str | None = None,
        corpus_sha256: str | None = None,
        teacher_config: Mapping | None = None,
    ) -> None:
        self.folder = Path(folder)
        index = _read_index(self.folder)
        self.spec: StoreSpec = index["spec"]
        self.entries: dict[int, dict] = {int(i): e for i, e in index["shards"].items()}
        asked = {"teacher_config": teacher_config, "teacher_sha256": teacher_sha256,
                 "tokenizer_sha256": tokenizer_sha256, "corpus_sha256": corpus_sha256}  # fmt: skip
        for name in _IDENTITY:
            want, have = asked[name], getattr(self.spec, name)
            if want is not None and (dict(want) if name == "teacher_config" else want) != have:
                raise StoreError(
                    f"store {self.folder} was captured with another {name.removesuffix('_sha256')} "
                    f"({_shown(have, 80)}, asked for {_shown(want, 80)}): capture it again for "
                    "this one, or open the store that matches"
                )
        self._verified: set[int] = set()

    @property
    def complete(self) -> bool:
        return all(i in self.entries for i in range(self.spec.num_shards))

    def verified_path(self, i: int) -> Path:
        """Shard i's file, its size, SHA-256 and metadata checked against the index once."""
        entry = self.entries.get(i)
        if entry is None:
            raise StoreError(f"store {self.folder}: shard {i} was never written; rerun the capture")
        path = self.folder / shard_name(i)
        if i not in self._verified:
            if not path.is_file():
                raise StoreError(f"store {self.folder}: {path.name} is missing; rerun the capture")
            size = path.stat().st_size
            if size != entry.get("bytes"):
                raise StoreError(
                    f"shard {path} is {size} bytes, the index says {_shown(entry.get('bytes'))}: "
                    "truncated or replaced; delete it and rerun the capture"
                )
            if sha256_file(path) != entry.get("sha256"):
                raise StoreError(
                    f"shard {path} does not match its SHA-256 in the index: damaged or tampered "
                    "with; delete it and rerun the capture"
                )
            _verify_shard(self.spec, i, path)
            self._verified.add(i)
        return path

    def __getstate__(self) -> dict:  # DataLoader workers: open handles do not travel
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def rows(
        self, start: int, end: int, names: Sequence[str], cols: slice | None = None
    ) -> dict[str, Tensor]:
        """Rows [start, end) of the named tensors (columns `cols` of 2-D ones), read as slices of
        the memory-mapped shards: a batch reads its rows, never a whole shard. Each shard is
        verified once (verified_path); handles are kept per process (workers fork)."""
        from safetensors import safe_open

        if getattr(self, "_pid", None) != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        parts: dict[str, list[Tensor]] = {n: [] for n in names}
        for i in range(start // self.spec.shard_tokens, -(-end // self.spec.shard_tokens)):
            if i not in self._handles:
                self._handles[i] = safe_open(str(self.verified_path(i)), framework="pt")
            s0, s1 = self.spec.shard_range(i)
            a, b = max(start, s0) - s0, min(end, s1) - s0
            for n in names:
                view = self._handles[i].get_slice(n)
                parts[n].append(view[a:b] if cols is None else view[a:b, cols])
        return {n: p[0] if len(p) == 1 else torch.cat(p) for n, p in parts.items()}

    def shard(self, i: int) -> dict[str, Tensor]:
        """Shard i's tensors, its size and SHA-256 checked against the index on first read."""
        path = self.verified_path(i)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        start, end = self.spec.shard_range(i)
        _check_tensors(self.spec, end - start, tensors, f"shard {path}")
        return tensors

    def tokens(self, start: int, end: int) -> dict[str, Tensor]:
        """The tensors of token positions [start, end), across shards."""
        if not 0 <= start <= end <= self.spec.num_tokens:
            raise IndexError(f"token range [{start}, {end}) is outside [0, {self.spec.num_tokens})")
        m = self.spec.shard_tokens
        parts = []
        for i in range(start // m, -(-end // m)):
            s0, _ = self.spec.shard_range(i)
            shard = self.shard(i)
            parts.append({k: t[max(start, s0) - s0 : end - s0] for k, t in shard.items()})
        if not parts:
            return {
                k: torch.empty(0, *s[0][1:], dtype=s[1]) for k, s in _expected(self.spec, 0).items()
            }
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def write_excerpt(source: str | os.PathLike, folder: str | os.PathLike, num_tokens: int) -> Path:
    """A store of the first num_tokens positions of the store at `source`, in one shard: the same
    teacher, tokenizer, corpus, k, temperatures and samples, so that a few stored soft labels can
    be kept beside a write-up (docs/lm-distillation/) and recomputed from the teacher there. A
    store-level JSON file beside the index (capture.json: context, split, seed) is copied with
    its num_tokens set to the excerpt's. Rewriting the same excerpt writes the same bytes."""
    src = SparseStore(source)
    if not 1 <= num_tokens <= src.spec.num_tokens:
        raise ValueError(f"num_tokens must be in [1, {src.spec.num_tokens}], got {num_tokens}")
    fields = {**asdict(src.spec), "num_tokens": num_tokens, "shard_tokens": num_tokens}
    spec = StoreSpec(**fields)
    writer = StoreWriter(folder, spec)
    if not writer.done(0):
        writer.write_shard(0, src.tokens(0, num_tokens))
    for extra in sorted(Path(source).glob("*.json")):
        if extra.name != INDEX_FILE:
            obj = read_json_file(extra, "the store's capture record")
            if isinstance(obj, dict) and "num_tokens" in obj:
                obj["num_tokens"] = num_tokens
            write_json(Path(folder) / extra.name, obj)
    return Path(folder)
