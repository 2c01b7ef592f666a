"""rbkd.lm.tokens: token shards written once (content-addressed, atomic, verified), read
memory-mapped, and served as grid blocks with seeded shuffling and per-rank splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lm_fixtures import write_tiny_corpus

from rbkd.lm.corpus import load_corpus
from rbkd.lm.tokenizer import train_tokenizer
from rbkd.lm.tokens import (
    TokenBlocks,
    TokensError,
    TokenSplit,
    corpus_tokens,
    tokenize_split,
    tokens_folder,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    corpus = load_corpus(write_tiny_corpus(root / "texts"))
    tok = train_tokenizer(corpus, 300, out=root / "tokenizer.json")
    return root, corpus, tok


def _stream(corpus, tok, split) -> list[int]:
    """The documented token stream, written out: each document's ids, then end-of-text."""
    out = []
    for _, text in corpus.documents(split):
        out += tok.encode(text) + [tok.eos_id]
    return out


@pytest.mark.parametrize("shard_tokens", [300, 1 << 24])  # several shards, one
def test_the_split_reads_back_as_the_documented_stream(setup, tmp_path, shard_tokens):
    _, corpus, tok = setup
    split = tokenize_split(corpus, tok, "train", root=tmp_path, shard_tokens=shard_tokens)
    want = _stream(corpus, tok, "train")
    assert len(split) == len(want) and split.tokens(0, len(want)).tolist() == want
    assert split.tokens(295, 610).tolist() == want[295:610]  # across two shard boundaries
    assert split.tokens(4, 4).shape == (0,) and split.tokens(0, 1).dtype == torch.int64
    assert split.vocab_size == 300 and split.eos_id == tok.eos_id
    assert split.num_documents == len(corpus.splits["train"])
    shards = sorted(split.folder.glob("tokens-*.safetensors"))
    assert len(shards) == -(-len(want) // shard_tokens)


def test_doc_offsets_and_document_starts(setup, tmp_path):
    _, corpus, tok = setup
    split = tokenize_split(corpus, tok, "validation", root=tmp_path, shard_tokens=40)
    starts, offsets, pos = [0], [], 0
    for _, text in corpus.documents("validation"):
        n = len(tok.encode(text)) + 1
        offsets += list(range(n))
        pos += n
        starts.append(pos)
    assert split.document_starts().tolist() == starts
    assert split.doc_offsets(0, len(split)).tolist() == offsets
    assert split.doc_offsets(3, 9).tolist() == offsets[3:9]
    with pytest.raises(IndexError, match="outside"):
        split.tokens(0, len(split) + 1)


def test_a_rerun_reuses_the_folder_and_another_tokenizer_gets_another(setup, tmp_path):
    _, corpus, tok = setup
    first = tokenize_split(corpus, tok, "train", root=tmp_path, shard_tokens=400)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.folder.iterdir()}
    again = tokenize_split(corpus, tok, "train", root=tmp_path, shard_tokens=400)
    assert again.folder == first.folder
    assert {p.name: p.stat().st_mtime_ns for p in again.folder.iterdir()} == stamps
    assert first.folder == tokens_folder(corpus.sha256, tok.sha256, "train", tmp_path)
    other = train_tokenizer(corpus, 280)
    assert tokenize_split(corpus, other, "train", root=tmp_path).folder != first.folder
    valid = tokenize_split(corpus, tok, "validation", root=tmp_path)
    assert valid.folder != first.folder and valid.positions_sha256 != first.positions_sha256


def test_a_tampered_shard_is_refused_and_tokenising_again_repairs_it(setup, tmp_path):
    _, corpus, tok = setup
    split = tokenize_split(corpus, tok, "train", root=tmp_path, shard_tokens=400)
    want = split.tokens(0, len(split)).tolist()
    shard = split.folder / "tokens-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(TokensError, match="does not match its SHA-256") as e:
        TokenSplit(split.folder)
    assert "\n" not in str(e.value)
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(TokensError, match="missing or truncated"):
        TokenSplit(split.folder)
    repaired = tokenize_split(corpus, tok, "train", root=tmp_path, shard_tokens=400)
    assert repaired.tokens(0, len(repaired)).tolist() == want


def test_opening_tokens_of_another_corpus_is_refused(setup, tmp_path):
    _, corpus, tok = setup
    split = tokenize_split(corpus, tok, "train", root=tmp_path)
    with pytest.raises(TokensError, match="another corpus"):
        TokenSplit(split.folder, corpus_sha256="0" * 64)
    with pytest.raises(TokensError, match="another split"):
        TokenSplit(split.folder, split="validation")
    with pytest.raises(TokensError, match="no index.json"):
        TokenSplit(tmp_path / "nothing")


class _WideTokenizer:
    """A stand-in tokenizer with a vocabulary beyond uint16: ids up to 70000."""

    sha256, vocab_size, eos_id = "f" * 64, 70_001, 70_000

    def encode_batch(self, texts):
        return [[66_000 + ord(c) % 3000 for c in t[:50]] for t in texts]


def test_a_vocabulary_beyond_uint16_is_stored_as_int32(setup, tmp_path):
    _, corpus, _ = setup
    split = tokenize_split(corpus, _WideTokenizer(), "train", root=tmp_path)
    assert split._index["dtype"] == "int32"
    assert split.tokens(0, 51).tolist()[-1] == 70_000 and max(split.tokens(0, 50).tolist()) > 65535


def test_an_empty_split_is_one_line(tmp_path):
    (tmp_path / "only.txt").write_text("one file only, so no validation file")
    corpus = load_corpus(tmp_path)
    tok = train_tokenizer(corpus, 260)
    with pytest.raises(TokensError, match="has no validation files") as e:
        tokenize_split(corpus, tok, "validation", root=tmp_path / "t")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ blocks


@pytest.fixture(scope="module")
def split(setup, tmp_path_factory):
    _, corpus, tok = setup
    return tokenize_split(corpus, tok, "train", root=tmp_path_factory.mktemp("t"), shard_tokens=400)


def test_blocks_lie_on_the_grid_and_batches_shift_labels_by_one(split):
    blocks = TokenBlocks(split, 16)
    stream = split.tokens(0, len(split))
    assert len(blocks) == (len(split) - 1) // 16
    last = len(blocks) - 1
    assert blocks[last].tolist() == stream[16 * last : 16 * last + 17].tolist()
    assert blocks[-1].tolist() == blocks[last].tolist()
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    batch = next(blocks.batches(3, shuffle=False))
    assert batch.starts.tolist() == [0, 16, 32]
    assert batch.input_ids.shape == batch.labels.shape == (3, 16)
    assert torch.equal(batch.input_ids[1], stream[16:32])
    assert torch.equal(batch.labels[1], stream[17:33])


def test_shuffling_is_seeded_and_ranks_split_the_blocks_evenly(split):
    blocks = TokenBlocks(split, 8)
    n = len(blocks)
    a = blocks.order(seed=1, epoch=0)
    assert torch.equal(a, blocks.order(seed=1, epoch=0)) and sorted(a.tolist()) == list(range(n))
    assert not torch.equal(a, blocks.order(seed=2, epoch=0))
    assert not torch.equal(a, blocks.order(seed=1, epoch=1))
    for world in (2, 3):
        parts = [blocks.order(seed=1, rank=r, world_size=world) for r in range(world)]
        assert {len(p) for p in parts} == {n // world}  # the same number of steps on each rank
        joined = torch.cat(parts).tolist()
        assert len(set(joined)) == len(joined) == n - n % world
    starts = torch.cat([b.starts for b in blocks.batches(5, seed=1, rank=1, world_size=2)])
    assert starts.tolist() == [8 * i for i in blocks.order(seed=1, rank=1, world_size=2).tolist()]
    sizes = [len(b.starts) for b in blocks.batches(5, drop_last=True)]
    assert set(sizes) == {5}
    with pytest.raises(ValueError, match="rank must be in"):
        blocks.order(rank=2, world_size=2)


def test_a_head_is_a_split_of_its_own(split):
    head = split.head(40)
    assert len(head) == 40 and head.positions_sha256 != split.positions_sha256
    assert head.tokens(0, 40).tolist() == split.tokens(0, 40).tolist()
    with pytest.raises(IndexError):
        head.tokens(0, 41)
    assert len(TokenBlocks(head, 13)) == 3
    with pytest.raises(TokensError, match="fewer than one block"):
        TokenBlocks(head, 40)


def test_reading_never_loads_a_whole_shard(split):
    """The shards are numpy memory maps: a read copies its range only."""
    assert all(isinstance(data, np.memmap) for _, _, data in split._shards)


def test_corpus_tokens_does_it_all_from_folders(setup, tmp_path, monkeypatch):
    root, corpus, tok = setup
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    split = corpus_tokens("validation", corpus=corpus.root, tokenizer=root / "tokenizer.json")
    assert split.tokenizer_sha256 == tok.sha256 and split.corpus_sha256 == corpus.sha256
    assert Path(tmp_path / "cache") in split.folder.parents
    with pytest.raises(ValueError, match="not both"):
        corpus_tokens(corpus=corpus.root, tokenizer=root / "tokenizer.json", vocab_size=300)
