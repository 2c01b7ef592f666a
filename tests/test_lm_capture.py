"""rbkd.lm.capture and `rbkd lm soft-labels`: a tiny GPT-2's sparse soft labels over a corpus.

The oracle recomputes every stored number from the model in float64, block by block on the
documented grid. Resume, tamper and refusal tests run on the store; a 2-rank torchrun capture
writes the same ids, and values equal to float32 noise, in every shard as one process.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lm_fixtures import write_tiny_corpus
from rbkd.cli.app import app
from typer.testing import CliRunner

from rbkd.lm.capture import CAPTURE_FILE, capture, load_teacher, teacher_identity
from rbkd.lm.corpus import load_corpus
from rbkd.lm.store import SparseStore, StoreError, shard_name
from rbkd.lm.tokenizer import train_tokenizer
from rbkd.lm.tokens import TokenSplit, tokenize_split

transformers = pytest.importorskip("transformers")
runner = CliRunner()
VOCAB, POSITIONS = 300, 32
RANK_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, eos: int = 0):
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A corpus, its BPE, its tokens and a tiny GPT-2 teacher saved as an HF folder with the
    tokenizer beside it (as `rbkd lm train-teacher` leaves one)."""
    root = tmp_path_factory.mktemp("lm")
    corpus = load_corpus(write_tiny_corpus(root / "texts", files=8, sentences=12))
    tok = train_tokenizer(corpus, VOCAB, out=root / "teacher" / "tokenizer.json")
    split = tokenize_split(corpus, tok, "train", root=root / "tokens")
    model = tiny_gpt2()
    model.save_pretrained(root / "teacher")
    return {"root": root, "corpus": corpus, "tok": tok, "split": split, "model": model}


def _same_store(a: Path, b: Path) -> None:
    """Two stores hold the same tensors shard by shard. Not byte for byte: safetensors writes its
    metadata from a Rust HashMap, in an order that changes from process to process, and a BLAS
    may round a sum differently in another process (measured: equal in most runs, not all)."""
    ia, ib = (json.loads((p / "index.json").read_text()) for p in (a, b))
    assert ia["spec"] == ib["spec"] and ia["shards"].keys() == ib["shards"].keys()
    for i, entry in ia["shards"].items():
        other = ib["shards"][i]
        assert {k: v for k, v in entry.items() if k != "sha256"} == {
            k: v for k, v in other.items() if k != "sha256"
        }
    sa, sb = SparseStore(a), SparseStore(b)
    for i in range(sa.spec.num_shards):
        ta, tb = sa.shard(i), sb.shard(i)
        assert ta.keys() == tb.keys()
        for name in ta:  # ids exactly; values to float32 noise (BLAS may sum in another order)
            torch.testing.assert_close(ta[name], tb[name], atol=1e-5, rtol=1e-5, msg=f"{i} {name}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _oracle_check(model, split: TokenSplit, store: SparseStore, context: int, temps) -> None:
    """Every stored number against the model's float64 logits, block by block."""
    ref = copy.deepcopy(model).double()
    spec = store.spec
    n = len(split)
    got = store.tokens(0, n)
    assert got["input_ids"].tolist() == split.tokens(0, n).tolist()
    assert got["doc_offsets"].tolist() == split.doc_offsets(0, n).tolist()
    for b in range(0, n, context):
        e = min(n, b + context)
        with torch.no_grad():
            z = ref(input_ids=split.tokens(b, e)[None]).logits[0]  # [L, V] float64
        top = z.topk(spec.k, -1)
        assert torch.equal(got["topk_ids"][b:e].long(), top.indices), f"block at {b}"
        torch.testing.assert_close(got["topk_logits"][b:e].double(), top.values, atol=1e-5, rtol=1e-5)  # fmt: skip
        for j, T in enumerate(temps):
            logz = torch.logsumexp(z / T, -1)
            p = torch.softmax(z / T, -1)
            entropy = -(p * torch.log_softmax(z / T, -1)).sum(-1)
            torch.testing.assert_close(got["logz"][b:e, j].double(), logz, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["entropy"][b:e, j].double(), entropy, atol=1e-5, rtol=1e-5)  # fmt: skip
        if spec.samples:
            ids, counts = got["sample_ids"][b:e], got["sample_counts"][b:e]
            assert torch.equal(
                counts.sum(-1), torch.full((e - b,), spec.samples, dtype=torch.int32)
            )
            kept = ids >= 0
            assert torch.equal(kept, counts > 0)
            at = z.gather(-1, ids.clamp_min(0).long())
            torch.testing.assert_close(got["sample_logits"][b:e][kept].double(), at[kept], atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("samples", [0, 6])
def test_a_written_store_is_the_models_top_k_logz_and_entropy(lm, tmp_path, samples):
    context, temps = 16, [0.5, 1.0, 3.0]
    split = lm["split"].head(16 * 9 + 5)  # a shorter last block, in the last shard
    result = capture(lm["model"], split, tmp_path / "s", k=5, temperatures=temps,
                     samples=samples, context=context, shard_tokens=64, batch_size=3)  # fmt: skip
    assert result.written == [0, 1, 2] and result.tokens_written == len(split)
    store = SparseStore(
        tmp_path / "s",
        teacher_sha256=teacher_identity(lm["model"])[1],
        tokenizer_sha256=lm["tok"].sha256,
        corpus_sha256=split.positions_sha256,
    )
    assert store.complete and store.spec.num_tokens == len(split)
    _oracle_check(lm["model"], split, store, context, temps)
    settings = json.loads((tmp_path / "s" / CAPTURE_FILE).read_text())
    assert settings["context"] == context and settings["split"] == "train"
    again = capture(lm["model"], split, tmp_path / "s", k=5, temperatures=temps,
                    samples=samples, context=context, shard_tokens=64)  # fmt: skip
    assert again.written == []  # a rerun writes nothing that exists


def test_rbkd_lm_capture_is_callable_as_the_issue_spells_it(lm, tmp_path, monkeypatch):
    import rbkd.lm
    import rbkd.lm.capture as module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the corpus's tokens go there

    split = lm["split"].head(40)
    first = rbkd.lm.capture(lm["model"], split, tmp_path / "s", k=3, context=16)
    assert first.written == [0] and module(lm["model"], split, tmp_path / "s", k=3, context=16).written == []  # fmt: skip
    # a corpus folder and a tokenizer.json, as the issue's "tokens/corpus"
    folder = rbkd.lm.capture(lm["model"], lm["corpus"].root, tmp_path / "c", k=3, context=16,
                             tokenizer=lm["root"] / "teacher" / "tokenizer.json",
                             split="validation")  # fmt: skip
    assert SparseStore(folder.folder).complete and folder.spec.tokenizer_sha256 == lm["tok"].sha256


def test_the_teacher_has_one_identity_in_memory_saved_and_loaded(lm):
    loaded = load_teacher(lm["root"] / "teacher")
    assert teacher_identity(loaded) == teacher_identity(lm["model"])
    run = lm["root"] / "run"
    (run / "model").mkdir(parents=True, exist_ok=True)
    for f in (lm["root"] / "teacher").iterdir():
        (run / "model" / f.name).write_bytes(f.read_bytes())
    assert teacher_identity(load_teacher(run)) == teacher_identity(lm["model"])  # a run folder
    half = load_teacher(run, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert teacher_identity(half)[1] != teacher_identity(lm["model"])[1]  # another function
    other = copy.deepcopy(lm["model"])
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.bias[3] += 1e-3
    assert teacher_identity(other)[1] != teacher_identity(lm["model"])[1]


def test_bad_teachers_and_settings_are_one_line(lm, tmp_path):
    model, split = lm["model"], lm["split"]
    with pytest.raises(ValueError, match="vocabulary has 280 ids, the tokenizer's 300") as e:
        capture(tiny_gpt2(vocab=280), split, tmp_path / "a", context=16)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="context 64 is longer than the teacher's 32 positions"):
        capture(model, split, tmp_path / "a", context=64)
    with pytest.raises(ValueError, match="multiple of the context 16"):
        capture(model, split, tmp_path / "a", context=16, shard_tokens=40)
    with pytest.raises(ValueError, match="sample_T 1 must be one of the temperatures"):
        capture(model, split, tmp_path / "a", context=16, temperatures=[2.0], samples=3)
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model folder"):
        load_teacher(tmp_path)
    assert not (tmp_path / "a").exists()  # nothing written before the checks
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="rbkd did not write") as e:
        capture(model, split, mine, context=16)
    assert "\n" not in str(e.value) and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_another_teacher_tokenizer_corpus_or_context_is_refused(lm, tmp_path):
    split, out = lm["split"].head(200), tmp_path / "s"
    capture(lm["model"], split, out, k=4, context=16, shard_tokens=64)
    before = {p.name: _sha(p) for p in out.glob("shard-*")}
    with pytest.raises(StoreError, match="another teacher_sha256") as e:
        capture(tiny_gpt2(seed=1), split, out, k=4, context=16, shard_tokens=64)
    assert "\n" not in str(e.value)
    other_tok = train_tokenizer(load_corpus(write_tiny_corpus(tmp_path / "t2", seed=5)), VOCAB)
    other = tokenize_split(lm["corpus"], other_tok, "train", root=tmp_path / "tok2").head(200)
    with pytest.raises(StoreError, match="another tokenizer_sha256"):
        capture(lm["model"], other, out, k=4, context=16, shard_tokens=64)
    edited = write_tiny_corpus(tmp_path / "edited", files=8, sentences=12)
    (edited / "extra.txt").write_text("One more file.")
    moved = tokenize_split(load_corpus(edited), lm["tok"], "train", root=tmp_path / "tok3")
    with pytest.raises(StoreError, match="another corpus_sha256"):
        capture(lm["model"], moved.head(200), out, k=4, context=16, shard_tokens=64)
    with pytest.raises(StoreError, match="another context"):
        capture(lm["model"], split, out, k=4, context=8, shard_tokens=64)
    assert {p.name: _sha(p) for p in out.glob("shard-*")} == before
    with pytest.raises(StoreError, match="captured with another teacher"):
        SparseStore(out, teacher_sha256=teacher_identity(tiny_gpt2(seed=1))[1])


def test_a_tampered_shard_is_refused_and_a_rerun_rewrites_only_it(lm, tmp_path):
    split, out = lm["split"].head(200), tmp_path / "s"
    capture(lm["model"], split, out, k=4, context=16, shard_tokens=64)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    victim = out / shard_name(1)
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match its SHA-256"):
        SparseStore(out).shard(1)
    victim.write_bytes(bytes(data[:-10]))  # truncated
    with pytest.raises(StoreError, match="truncated"):
        SparseStore(out).shard(1)
    again = capture(lm["model"], split, out, k=4, context=16, shard_tokens=64)
    assert again.written == [1]
    for p in out.glob("shard-*"):
        assert (p.stat().st_mtime_ns == stamps[p.name]) == (p.name != victim.name)
    SparseStore(out).tokens(0, len(split))  # every shard verifies again


# ------------------------------------------------------------------ the command line
def _cli_args(lm, out: Path, *extra: str) -> list[str]:
    return ["lm", "soft-labels", "--teacher", str(lm["root"] / "teacher"), "--out", str(out),
            "--corpus", str(lm["corpus"].root), "--k", "4", "--T", "1,2", "--context", "16",
            "--shard-tokens", "64", "--device", "cpu", "--threads", "1", "--no-progress",
            *extra]  # fmt: skip


@pytest.fixture
def cli_env(lm, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(lm["root"] / "cache"))
    for name in RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def test_the_command_writes_a_store_and_says_what_it_holds(lm, tmp_path, cli_env):
    result = runner.invoke(app, [*_cli_args(lm, tmp_path / "s", "--limit", "300"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["complete"] and summary["tokens"] == 300 and summary["shards"] == 5
    assert summary["tokenizer_sha256"] == lm["tok"].sha256  # the teacher folder's tokenizer.json
    assert 4 * 8 + 2 * 8 + 8 < summary["bytes_per_token"] < 4 * 8 + 2 * 8 + 8 + 20  # + headers
    _oracle_check(lm["model"], lm["split"].head(300), SparseStore(tmp_path / "s"), 16, [1, 2])


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--context", "64"], "longer than the teacher's 32 positions"),
        (["--vocab-size", "280"], "vocabulary has 300 ids, the tokenizer's 280"),
        (["--T", "0,1"], "T"),
    ],
)
def test_the_command_refuses_bad_input_in_one_line(lm, tmp_path, cli_env, extra, words):
    result = runner.invoke(app, [*_cli_args(lm, tmp_path / "s", "--limit", "100"), *extra])
    assert result.exit_code in (1, 2), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and words in lines[0], result.output


def _rbkd() -> list[str]:
    script = Path(sys.executable).with_name("rbkd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rbkd"]


def test_a_killed_capture_resumes_and_writes_nothing_that_exists(lm, tmp_path, cli_env):
    out = tmp_path / "s"
    args = _cli_args(lm, out, "--batch-size", "1")
    proc = subprocess.Popen([*_rbkd(), *args], env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / shard_name(1)).exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no shard written in 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}
    store = SparseStore(out)
    assert kept and not store.complete, "killed too late: make the capture longer"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name, stamp in kept.items():  # nothing that existed was written again
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, name
    whole = tmp_path / "whole"
    assert runner.invoke(app, _cli_args(lm, whole, "--batch-size", "1")).exit_code == 0
    _same_store(out, whole)


def test_sigterm_stops_with_one_line_saying_what_is_kept(lm, tmp_path, cli_env):
    out = tmp_path / "s"
    proc = subprocess.Popen([*_rbkd(), *_cli_args(lm, out, "--batch-size", "1")], env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / shard_name(0)).exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no shard written in 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Stopped: interrupted (SIGTERM): "), err
    assert "shards are in" in lines[0] and "run the same command again" in lines[0]


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_same_store_as_one_process(lm, tmp_path, cli_env):
    one, two = tmp_path / "one", tmp_path / "two"
    assert runner.invoke(app, _cli_args(lm, one, "--limit", "600")).exit_code == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # fmt: skip
    proc = subprocess.run([*launcher, *_rbkd(), *_cli_args(lm, two, "--limit", "600"), "--json"],
                          env=cli_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["complete"]  # rank 0 alone reports, after every rank
    assert len(json.loads((two / "index.json").read_text())["shards"]) == 10
    _same_store(one, two)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
