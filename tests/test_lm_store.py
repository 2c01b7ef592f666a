"""The sparse soft-label store (rbkd.lm.store, issue 16): a round trip through shards and index,
a capture killed after two shards and resumed (only the missing shards are computed), tampered and
truncated shards found by their hash, and stores of another teacher, tokenizer or corpus refused
with one line."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rbkd.ops as ops
from rbkd.lm import store as st

SHA = {
    name: hashlib.sha256(name.encode()).hexdigest() for name in ("teacher", "tok", "corpus", "x")
}
VOCAB = 50


def make_spec(**change):
    base = dict(k=4, temperatures=(1.0, 2.0), topk_dtype="bfloat16", num_tokens=10, shard_tokens=4,
                teacher_config={"arch": "tiny", "layers": 2, "dims": (8, 8)},
                teacher_sha256=SHA["teacher"], tokenizer_sha256=SHA["tok"],
                corpus_sha256=SHA["corpus"], samples=3)  # fmt: skip
    return st.StoreSpec(**{**base, **change})


def corpus_logits(num_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, VOCAB, generator=g) * 3).to(torch.bfloat16)


class Capture:
    """compute(start, end) of a toy teacher; counts its calls; may fail on one shard's start."""

    def __init__(self, spec, fail_at=None):
        self.spec, self.fail_at, self.calls = spec, fail_at, []
        self.logits = corpus_logits(spec.num_tokens)

    def __call__(self, start, end):
        if start == self.fail_at:
            raise RuntimeError("killed")
        self.calls.append((start, end))
        logits = self.logits[start:end]
        cap = ops.capture_soft_labels(
            logits, self.spec.k, list(self.spec.temperatures), samples=self.spec.samples,
            sample_T=self.spec.sample_T, generator=torch.Generator().manual_seed(start),
        )  # fmt: skip
        positions = torch.arange(start, end, dtype=torch.int32)
        sample_logits = None
        if cap.sample_ids is not None:  # the teacher's logits at its sampled ids (padding: 0)
            at = logits.gather(-1, cap.sample_ids.clamp(min=0).long())
            sample_logits = at.masked_fill(cap.sample_ids < 0, 0)
        return {
            "topk_ids": cap.topk_ids, "topk_logits": cap.topk_logits, "logz": cap.logz,
            "entropy": cap.entropy, "sample_ids": cap.sample_ids, "sample_counts": cap.sample_counts,
            "sample_logits": sample_logits, "input_ids": positions % VOCAB,
            "doc_offsets": positions % 7,
        }  # fmt: skip


def test_round_trip(tmp_path):
    spec = make_spec()
    cap = Capture(spec)
    assert st.write_store(tmp_path / "s", spec, cap) == [0, 1, 2]
    store = st.SparseStore(tmp_path / "s", teacher_sha256=SHA["teacher"],
                           tokenizer_sha256=SHA["tok"], corpus_sha256=SHA["corpus"],
                           teacher_config={"arch": "tiny", "layers": 2, "dims": [8, 8]})  # fmt: skip
    assert store.spec == spec and store.complete
    index = json.loads((tmp_path / "s" / st.INDEX_FILE).read_text())
    for i, entry in index["shards"].items():
        data = (tmp_path / "s" / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        assert (entry["start"], entry["end"]) == spec.shard_range(int(i))
    assert [(e["start"], e["end"]) for e in index["shards"].values()] == [(0, 4), (4, 8), (8, 10)]
    whole = store.tokens(0, 10)
    direct = ops.capture_soft_labels(cap.logits, 4, [1.0, 2.0])
    assert torch.equal(whole["topk_ids"], direct.topk_ids)
    assert torch.equal(whole["topk_logits"], direct.topk_logits)
    assert torch.equal(whole["logz"], direct.logz) and torch.equal(whole["entropy"], direct.entropy)
    assert torch.equal(whole["input_ids"], torch.arange(10, dtype=torch.int32) % VOCAB)
    assert bool((whole["sample_counts"].sum(-1) == 3).all())
    part = store.tokens(3, 9)  # across three shards
    for name, t in part.items():
        assert torch.equal(t, whole[name][3:9]), name
    assert store.tokens(5, 5)["logz"].shape == (0, 2)


def test_kill_then_resume_writes_only_the_missing_shards(tmp_path):
    spec = make_spec(num_tokens=18)  # 5 shards
    folder = tmp_path / "s"
    first = Capture(spec, fail_at=8)  # dies computing shard 2, after shards 0 and 1
    with pytest.raises(RuntimeError, match="killed"):
        st.write_store(folder, spec, first)
    assert sorted(p.name for p in folder.glob("shard-*")) == [st.shard_name(0), st.shard_name(1)]
    # A hard kill between a shard's rename and its index entry, and a temporary of a shard
    # being written: shard 3's file is there, unrecorded; a half-written .part lies about.
    st.StoreWriter(folder, spec).write_shard(3, Capture(spec)(12, 16))
    index = json.loads((folder / st.INDEX_FILE).read_text())
    del index["shards"]["3"]
    (folder / st.INDEX_FILE).write_text(json.dumps(index))
    (folder / ".shard-000002.safetensors.abcd1234.part").write_bytes(b"half")
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}

    again = Capture(spec)
    assert st.write_store(folder, spec, again) == [2, 4]
    assert again.calls == [(8, 12), (16, 18)]
    for name, mtime in before.items():  # nothing that existed was rewritten
        assert (folder / name).stat().st_mtime_ns == mtime
    store = st.SparseStore(folder)
    assert store.complete
    assert torch.equal(
        store.tokens(0, 18)["logz"], ops.capture_soft_labels(again.logits, 4, [1.0, 2.0]).logz
    )
    assert st.write_store(folder, spec, Capture(spec)) == []  # a third run writes nothing


def test_ranks_write_their_own_shards(tmp_path):
    spec = make_spec(num_tokens=20)
    assert st.write_store(tmp_path, spec, Capture(spec), rank=1, world_size=2) == [1, 3]
    assert st.write_store(tmp_path, spec, Capture(spec), rank=0, world_size=2) == [0, 2, 4]
    assert st.SparseStore(tmp_path).complete


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "swap shards"])
def test_a_damaged_shard_is_found_by_its_hash(tmp_path, damage):
    spec = make_spec()
    st.write_store(tmp_path, spec, Capture(spec))
    path = tmp_path / st.shard_name(1)
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-10]))
    else:
        path.write_bytes((tmp_path / st.shard_name(0)).read_bytes())
    store = st.SparseStore(tmp_path)
    store.shard(0)
    with pytest.raises(st.StoreError, match="SHA-256|truncated") as err:
        store.shard(1)
    assert "\n" not in str(err.value)
    # The writer does not trust it either: a rerun writes shard 1 again, and only it.
    again = Capture(spec)
    assert st.write_store(tmp_path, spec, again) == [1]
    fresh = ops.capture_soft_labels(again.logits[4:8], 4, [1.0, 2.0]).logz
    assert torch.equal(st.SparseStore(tmp_path).shard(1)["logz"], fresh)


@pytest.mark.parametrize("field,value", [("teacher_sha256", SHA["x"]), ("tokenizer_sha256", SHA["x"]),
                                         ("corpus_sha256", SHA["x"]),
                                         ("teacher_config", {"arch": "big\n\x1b[31m"})])  # fmt: skip
def test_another_teacher_tokenizer_or_corpus_is_refused(tmp_path, field, value):
    spec = make_spec()
    st.write_store(tmp_path, spec, Capture(spec))
    with pytest.raises(st.StoreError, match=field.removesuffix("_sha256")) as err:
        st.SparseStore(tmp_path, **{field: value})
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
    with pytest.raises(st.StoreError, match=field) as err:  # and no writer mixes them in
        st.StoreWriter(tmp_path, make_spec(**{field: value}))
    assert "\n" not in str(err.value)


def test_bad_shard_tensors_and_specs_are_refused(tmp_path):
    spec = make_spec()
    tensors = Capture(spec)(0, 4)
    writer = st.StoreWriter(tmp_path, spec)
    for name, bad in [("topk_logits", tensors["topk_logits"].float()),
                      ("logz", tensors["logz"][:3]), ("input_ids", tensors["input_ids"].long())]:  # fmt: skip
        with pytest.raises(st.StoreError, match=name):
            writer.write_shard(0, {**tensors, name: bad})
    with pytest.raises(st.StoreError, match="expected"):
        writer.write_shard(0, {k: t for k, t in tensors.items() if k != "entropy"})
    for change, word in [({"k": 0}, "k"), ({"temperatures": ()}, "temperatures"),
                         ({"topk_dtype": "int8"}, "topk_dtype"), ({"corpus_sha256": "abc"}, "corpus"),
                         ({"shard_tokens": 0}, "shard_tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=word):
            make_spec(**change)
    with pytest.raises(st.StoreError, match="not a sparse soft-label store"):
        st.SparseStore(tmp_path / "nothing")


DOC = "docs/sparse-soft-labels.md"


def test_the_documented_bytes_per_token_are_the_formats(tmp_path):
    """The doc's table is bytes_per_token; a real shard is that times M plus its header."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / DOC).read_text()
    for k in (8, 32, 128):
        for dtype in ("bfloat16", "float32"):
            for j in (1, 4):
                row = f"| {k} | {dtype} | {j} | {st.bytes_per_token(k, j, dtype)} |"
                assert row in text, row
    spec = make_spec(num_tokens=64, shard_tokens=64, samples=0)
    st.write_store(tmp_path, spec, Capture(spec))
    size = (tmp_path / st.shard_name(0)).stat().st_size
    header = size - 64 * st.bytes_per_token(4, 2, "bfloat16")
    assert 0 < header < 1024, header
    assert re.search(r"DistillKit", text)


def test_sampled_soft_labels_feed_the_sampled_loss(tmp_path):
    """A store with samples keeps sample_T in its spec and the teacher's logits at the sampled
    ids; those tensors are what sparse_kd_loss(tail="sampled") takes, at sample_T and at another
    stored T (with that T's logz and sample_T's as sample_logz)."""
    spec = make_spec(sample_T=2.0, topk_dtype="float32")
    cap = Capture(spec)
    cap.logits = cap.logits.float()
    st.write_store(tmp_path / "s", spec, cap)
    store = st.SparseStore(tmp_path / "s")
    assert store.spec.sample_T == 2.0
    whole = store.tokens(0, spec.num_tokens)
    ids, counts = whole["sample_ids"], whole["sample_counts"]
    drawn = ids >= 0
    at = cap.logits.gather(-1, ids.clamp(min=0).long())
    assert torch.equal(whole["sample_logits"][drawn], at[drawn])
    z = torch.randn(spec.num_tokens, VOCAB, requires_grad=True)
    for j, T in enumerate(spec.temperatures):
        extra = {} if T == spec.sample_T else {"sample_logz": whole["logz"][:, 1]}
        loss = ops.sparse_kd_loss(
            z, ids, whole["sample_logits"], tail="sampled", sample_counts=counts,
            sample_T=store.spec.sample_T, logz=whole["logz"][:, j], T=T, **extra,
        )  # fmt: skip
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_a_shard_with_samples_needs_their_logits(tmp_path):
    spec = make_spec()
    tensors = Capture(spec)(0, 4)
    del tensors["sample_logits"]
    with pytest.raises(st.StoreError, match="sample_logits"):
        st.StoreWriter(tmp_path / "s", spec).write_shard(0, tensors)


def test_equal_shards_are_equal_bytes_in_every_process(tmp_path):
    # safetensors orders metadata by a per-process hash: without sorting the header, the same
    # shard written by two processes (two torchrun ranks, a rerun) got two SHA-256s.
    script = (
        "import sys, torch; from rbkd.lm import store as st; from tests.test_lm_store import "
        "Capture, make_spec; spec = make_spec(); st.write_store(sys.argv[1], spec, Capture(spec))"
    )
    digests = []
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True,
                       cwd=Path(__file__).parents[1])  # fmt: skip
        index = json.loads((tmp_path / name / st.INDEX_FILE).read_text())
        digests.append({i: e["sha256"] for i, e in index["shards"].items()})
    assert digests[0] == digests[1] == digests[2]


def test_rows_are_slices_of_the_verified_shards(tmp_path):
    spec = make_spec()
    st.write_store(tmp_path / "s", spec, Capture(spec))
    store = st.SparseStore(tmp_path / "s")
    whole = store.tokens(0, 10)
    part = store.rows(3, 9, ["logz", "topk_ids"], cols=slice(0, 2))  # across three shards
    assert torch.equal(part["logz"], whole["logz"][3:9, :2])
    assert torch.equal(part["topk_ids"], whole["topk_ids"][3:9, :2])
    shard = tmp_path / "s" / st.shard_name(2)
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")  # same size, other bytes
    with pytest.raises(st.StoreError, match="SHA-256"):
        st.SparseStore(tmp_path / "s").rows(8, 10, ["logz"])


def test_an_excerpt_is_a_store_of_the_first_positions(tmp_path):
    """write_excerpt: the first positions of a store, across a shard edge, as a store of one
    shard with the same identities; its tensors are the source's, its rerun writes nothing new,
    and a count outside the store is one line."""
    spec = make_spec()
    st.write_store(tmp_path / "full", spec, Capture(spec))
    (tmp_path / "full" / "capture.json").write_text(json.dumps({"context": 5, "num_tokens": 10}))
    out = st.write_excerpt(tmp_path / "full", tmp_path / "part", 6)
    part, full = (
        st.SparseStore(out, teacher_sha256=SHA["teacher"]),
        st.SparseStore(tmp_path / "full"),
    )
    assert part.spec.num_tokens == 6 and part.spec.num_shards == 1
    for name in ("k", "temperatures", "teacher_sha256", "corpus_sha256", "samples", "sample_T"):
        assert getattr(part.spec, name) == getattr(full.spec, name), name
    got, want = part.tokens(0, 6), full.tokens(0, 6)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert json.loads((out / "capture.json").read_text()) == {"context": 5, "num_tokens": 6}
    before = (out / st.shard_name(0)).read_bytes()
    st.write_excerpt(tmp_path / "full", tmp_path / "part", 6)
    assert (out / st.shard_name(0)).read_bytes() == before
    with pytest.raises(ValueError, match="num_tokens must be in"):
        st.write_excerpt(tmp_path / "full", tmp_path / "other", 11)
