"""Entropy of a language-model teacher's token soft labels, read from a sparse soft-label store
(issue 16 item 6; the thesis's figure 5.3 for a language model).

Everything is exact, computed in float64 from the stored values:
- mean entropy against T: the stored H_j of every position, at each temperature of the grid;
- by token frequency: positions grouped by the frequency rank of their INPUT token (the token the
  teacher read at that position), and, in a second table, by the rank of their NEXT token (the
  one the teacher's soft label predicts; a position whose next token is outside the analysed range
  or starts another document is left out of that table). Ranks count the input tokens of all
  analysed positions (rank 1 = the most frequent; ties by id) and group as 1-10, 11-100, ...;
- by position in the document: the stored doc_offsets in buckets 0, 1, 2-3, 4-7, ... (powers of 2);
- the teacher's top-k mass against k: mean over positions of sum_{i <= k} exp(z_i / T_j - logz_j),
  from the kept raw logits (descending) and the full-vocabulary logz_j; 1 minus it at k is the tail.

A position whose stored entropy or logz is not finite (the capture's rule for a non-finite row of
logits) counts in `nonfinite_positions` and in no mean (its input token still counts in the
frequencies). The store is read one shard at a time
(rbkd.lm.store.SparseStore: size and SHA-256 checked, safetensors memory-mapped) and each shard in
row chunks; what stays in memory is O(V J) per-token sums, never the store.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from rbkd.lm.store import FORMAT, INDEX_FILE, SparseStore, StoreError

# Rows of a shard processed at once: the top-k mass holds [rows, k] float64 per temperature, so
# 2**20 / k rows keep that at 8 MiB.
CHUNK_ELEMENTS = 1 << 20
MAX_POSITION_BUCKETS = 33  # doc_offsets are int32: 0, then 2**b - 2**(b+1) - 1 for b < 32


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is (meant to be) a sparse soft-label store: a folder holding index.json.
    Its format is checked when it is opened (StoreError, one line)."""
    path = Path(path)
    return path.is_dir() and (path / INDEX_FILE).exists()


def pick_temperatures(grid: Sequence[float], wanted: Sequence[float] | None) -> list[int]:
    """Indices into the store's grid of the wanted temperatures (all of them for None); a T
    outside the grid is refused: the store holds exact values only there."""
    if wanted is None:
        return list(range(len(grid)))
    out = []
    for t in wanted:
        hits = [j for j, g in enumerate(grid) if math.isclose(g, t, rel_tol=1e-9)]
        if not hits:
            shown = ", ".join(f"{g:g}" for g in grid)
            raise ValueError(
                f"T = {t:g} is not in the store's temperature grid ({shown}): its entropies are "
                "exact only there; pick T from the grid (or leave --T out for all of them)"
            )
        out.append(hits[0])
    return out


def position_bucket(offsets: Tensor) -> Tensor:
    """0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ...: 1 + floor(log2(offset)) for offset >= 1."""
    offsets = offsets.long().clamp_min(0)
    # bit length, exactly (no float log2): count how many powers of two are <= offset
    powers = torch.tensor([1 << b for b in range(32)], dtype=torch.long)
    return torch.searchsorted(powers, offsets, right=True)


def position_range(bucket: int) -> tuple[int, int]:
    return (0, 0) if bucket == 0 else (1 << (bucket - 1), (1 << bucket) - 1)


def rank_edges(num_types: int) -> list[int]:
    """Upper rank of each frequency bucket: 10, 100, ... up to the first >= num_types."""
    edges = [10]
    while edges[-1] < num_types:
        edges.append(edges[-1] * 10)
    return edges


class _Grow:
    """A float64 [n, width] sum (or int64 count) indexed by token id, grown as larger ids come."""

    def __init__(self, width: int | None, dtype: torch.dtype, size: int = 0) -> None:
        self.width, self.dtype = width, dtype
        self.data = self._zeros(size)

    def _zeros(self, n: int) -> Tensor:
        shape = (n,) if self.width is None else (n, self.width)
        return torch.zeros(shape, dtype=self.dtype)

    def add(self, index: Tensor, values: Tensor) -> None:
        if index.numel() == 0:
            return
        need = int(index.max()) + 1
        if need > self.data.shape[0]:
            grown = self._zeros(max(need, 2 * self.data.shape[0]))
            grown[: self.data.shape[0]] = self.data
            self.data = grown
        self.data.index_add_(0, index, values.to(self.dtype))

    def padded(self, n: int) -> Tensor:
        if self.data.shape[0] >= n:
            return self.data
        grown = self._zeros(n)
        grown[: self.data.shape[0]] = self.data
        return grown


class _Sums:
    """Every running sum of the analysis (float64), fed one chunk of positions at a time."""

    def __init__(self, temperatures: Sequence[float], cols: list[int], k: int, vocab: int) -> None:
        j = len(cols)
        self.T, self.cols = list(temperatures), cols
        self.count = 0
        self.nonfinite = 0
        self.total = torch.zeros(j, dtype=torch.float64)
        self.total_sq = torch.zeros(j, dtype=torch.float64)
        self.mass = torch.zeros(j, k, dtype=torch.float64)
        self.pos_sum = torch.zeros(MAX_POSITION_BUCKETS, j, dtype=torch.float64)
        self.pos_count = torch.zeros(MAX_POSITION_BUCKETS, dtype=torch.int64)
        self.freq = _Grow(None, torch.int64, vocab)  # every analysed position's input token
        self.in_sum = _Grow(j, torch.float64, vocab)
        self.in_count = _Grow(None, torch.int64, vocab)
        self.next_sum = _Grow(j, torch.float64, vocab)
        self.next_count = _Grow(None, torch.int64, vocab)
        self.max_id = -1

    def add(self, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Add positions t (a chunk of a shard); returns their validity mask and float64
        entropies at the chosen temperatures, for the next-token table."""
        ent = t["entropy"][:, self.cols].double()
        logz = t["logz"][:, self.cols].double()
        ok = ent.isfinite().all(1) & logz.isfinite().all(1)
        self.nonfinite += int((~ok).sum())
        ids = t["input_ids"].long()
        self.freq.add(ids, torch.ones_like(ids))
        self.max_id = max(self.max_id, int(ids.max()), int(t["topk_ids"].max()))
        e, lz, pos = ent[ok], logz[ok], position_bucket(t["doc_offsets"][ok])
        self.count += int(ok.sum())
        self.total += e.sum(0)
        self.total_sq += (e * e).sum(0)
        self.pos_sum.index_add_(0, pos, e)
        self.pos_count.index_add_(0, pos, torch.ones_like(pos))
        self.in_sum.add(ids[ok], e)
        self.in_count.add(ids[ok], torch.ones_like(ids[ok]))
        z = t["topk_logits"][ok].double()
        for c, T in enumerate(self.T):
            self.mass[c] += (z / T - lz[:, c : c + 1]).exp().cumsum(1).sum(0)
        return ok, ent

    def add_next(self, next_ids: Tensor, ent: Tensor) -> None:
        self.next_sum.add(next_ids.long(), ent)
        self.next_count.add(next_ids.long(), torch.ones_like(next_ids, dtype=torch.int64))


def _chunks(t: dict[str, Tensor], rows: int, step: int):
    for r0 in range(0, rows, step):
        yield {name: x[r0 : min(rows, r0 + step)] for name, x in t.items()}


def token_entropy(
    store: SparseStore | str | os.PathLike,
    *,
    temperatures: Sequence[float] | None = None,
    limit: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """The tables of the module docstring for the first `limit` positions of a store (all for
    None), at the grid temperatures `temperatures` (all for None). `advance(n)` is called after
    each chunk of n positions (a progress bar). Returns a JSON-ready dict."""
    if not isinstance(store, SparseStore):
        store = SparseStore(store)
    spec = store.spec
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    cols = pick_temperatures(spec.temperatures, temperatures)
    end = spec.num_tokens if limit is None else min(limit, spec.num_tokens)
    if end == 0:
        raise StoreError(f"store {store.folder} holds no token positions: nothing to analyse")
    needed = -(-end // spec.shard_tokens)  # the shards holding positions [0, end)
    missing = [i for i in range(needed) if i not in store.entries]
    if missing:
        raise StoreError(
            f"store {store.folder} is incomplete ({len(missing)} of the {needed} shards needed "
            f"never written, the first {missing[0]}): finish the capture, or give a --limit "
            "below its first missing position"
        )
    vocab = spec.teacher_config.get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
    temps = [spec.temperatures[j] for j in cols]
    sums = _Sums(temps, cols, spec.k, vocab or 0)
    step = max(1, CHUNK_ELEMENTS // spec.k)
    prev = None  # (entropy row, valid) of the position before this chunk, for the next token
    for i in range(needed):
        s0, s1 = spec.shard_range(i)
        shard = store.shard(i)
        for t in _chunks(shard, min(s1, end) - s0, step):
            ok, ent = sums.add(t)
            # position q's input token is the NEXT token of position q - 1, in the same document
            ids, offs = t["input_ids"], t["doc_offsets"]
            if prev is None:  # the store's first position has no position before it
                ids, offs, before_e, before_ok = ids[1:], offs[1:], ent[:-1], ok[:-1]
            else:
                before_e, before_ok = torch.cat([prev[0], ent[:-1]]), torch.cat([prev[1], ok[:-1]])
            keep = before_ok & (offs != 0)
            sums.add_next(ids[keep], before_e[keep])
            prev = (ent[-1:], ok[-1:])
            if advance is not None:
                advance(int(t["input_ids"].shape[0]))
        del shard
    return _tables(store, spec, end, sums, vocab)


def _mean(total: Tensor, count: Tensor) -> list:
    """total [.., J] / count [..]: NaN where nothing was counted (None in JSON)."""
    out = total / count.clamp_min(1).double().unsqueeze(-1)
    out[count == 0] = math.nan
    return [[None if math.isnan(x) else x for x in row] for row in out.tolist()]


def _frequency_table(sums: _Sums, total: _Grow, count: _Grow, what: str) -> dict:
    n = max(sums.freq.data.shape[0], total.data.shape[0])
    freq = sums.freq.padded(n)
    order = torch.sort(-freq, stable=True).indices  # rank 1 = most frequent input token
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(1, n + 1)
    types = int((freq > 0).sum())
    edges = rank_edges(max(types, 1))
    bucket = torch.searchsorted(torch.tensor(edges), rank)
    seen = freq > 0
    b_sum = torch.zeros(len(edges), len(sums.T), dtype=torch.float64)
    b_count = torch.zeros(len(edges), dtype=torch.int64)
    b_sum.index_add_(0, bucket[seen], total.padded(n)[seen])
    b_count.index_add_(0, bucket[seen], count.padded(n)[seen])
    b_types = torch.zeros(len(edges), dtype=torch.int64).index_add_(
        0, bucket[seen], torch.ones(types, dtype=torch.int64)
    )
    means = _mean(b_sum, b_count)
    buckets = []
    for b, hi in enumerate(edges):
        lo = 1 if b == 0 else edges[b - 1] + 1
        buckets.append({"ranks": [lo, min(hi, types)] if types else [lo, hi],
                        "types": int(b_types[b]), "positions": int(b_count[b]),
                        "mean_entropy": means[b]})  # fmt: skip
    return {"frequency_of": what, "token_types": types, "buckets": buckets}


def _tables(store, spec, end, sums: _Sums, vocab: int | None) -> dict:
    temps = sums.T
    n = max(sums.count, 1)
    mean = sums.total / n
    var = (sums.total_sq / n - mean * mean).clamp_min(0)
    empty = sums.count == 0
    vocab_from = "teacher_config" if vocab else "largest token id in the store + 1"
    vocab = vocab or sums.max_id + 1
    used = int((sums.pos_count > 0).nonzero().max()) + 1 if sums.count else 1
    pos_means = _mean(sums.pos_sum[:used], sums.pos_count[:used])
    mass = (sums.mass / n).tolist()
    return {
        "unit": "nats",
        "store": str(store.folder),
        "format": FORMAT,
        "temperatures": temps,
        "k": spec.k,
        "positions": end,
        "finite_positions": sums.count,
        "nonfinite_positions": sums.nonfinite,
        "vocab_size": vocab,
        "vocab_size_from": vocab_from,
        "max_entropy": math.log(vocab),
        "mean_entropy": [None if empty else x for x in mean.tolist()],
        "std_entropy": [None if empty else math.sqrt(x) for x in var.tolist()],
        "by_input_frequency": _frequency_table(
            sums,
            sums.in_sum,
            sums.in_count,
            "the position's input token (the one the teacher read there)",
        ),  # fmt: skip
        "by_next_frequency": _frequency_table(
            sums,
            sums.next_sum,
            sums.next_count,
            "the position's next token (the one its soft label predicts), same document only",
        ),  # fmt: skip
        "by_position": {
            "offset_of": "the position in its document (doc_offsets), in powers-of-2 buckets",
            "buckets": [
                {
                    "offsets": list(position_range(b)),
                    "positions": int(sums.pos_count[b]),
                    "mean_entropy": pos_means[b],
                }  # fmt: skip
                for b in range(used)
            ],
        },
        "topk_mass": {
            "k": list(range(1, spec.k + 1)),
            "mean_mass": [None if empty else row for row in mass],
        },
        "tail_mass": [None if empty else 1.0 - row[-1] for row in mass],
    }


CSV_HEADER = ("store", "table", "T", "low", "high", "positions", "value")


def csv_rows(name: str, result: dict):
    """Long-format CSV rows of one store's result: (store, table, T, low, high, positions, value);
    low/high are the bucket's bounds (ranks, offsets, or k twice)."""
    temps = result["temperatures"]
    for c, T in enumerate(temps):
        yield (name, "mean_entropy", T, "", "", result["finite_positions"],
               result["mean_entropy"][c])  # fmt: skip
        for table, bounds in (("by_input_frequency", "ranks"), ("by_next_frequency", "ranks"),
                              ("by_position", "offsets")):  # fmt: skip
            for b in result[table]["buckets"]:
                lo, hi = b[bounds]
                yield name, f"entropy_{table}", T, lo, hi, b["positions"], b["mean_entropy"][c]
        mass = result["topk_mass"]["mean_mass"][c]
        for kk in result["topk_mass"]["k"]:
            value = None if mass is None else mass[kk - 1]
            yield name, "topk_mass", T, kk, kk, result["finite_positions"], value
