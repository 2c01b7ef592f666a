"""rbkd.lm.hf (issue 17 item 3): a tiny GPT-2 teacher captured into a store, the dataset and
collator checked token by token against a direct computation, padding counting nowhere in the
loss, bad input in one line, a student trained a few steps with Hugging Face Trainer (its loss
falls), and docs/lm-hf-trainer.md's code blocks run in order."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

from rbkd.lm import hf
from rbkd.lm.store import SparseStore, StoreError, StoreSpec, write_store
from rbkd.ops import capture_soft_labels, sparse_kd_loss

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="needs transformers: pip install -e '.[examples]' (scripts/setup.sh installs it)",
)
CONTEXT, VOCAB, K, TEMPS = 8, 48, 6, (1.0, 2.0)
BLOCKS = 12
SHA = hashlib.sha256(b"tiny").hexdigest()


def markov_tokens(n, seed=0):
    """A learnable stream: each token has three likely successors."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    out = [0]
    for _ in range(n - 1):
        out.append(int(nxt[out[-1], torch.randint(0, 3, (1,), generator=g)]))
    return torch.tensor(out)


def gpt2(n_embd, n_layer, seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=n_embd, n_layer=n_layer,
                     n_head=2, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def teacher_logits(teacher, tokens, start, end):
    with torch.no_grad():
        return teacher(input_ids=tokens[start:end].view(-1, CONTEXT)).logits.flatten(0, 1)


def build(folder, teacher, tokens, *, samples=0, sample_T=1.0, num_tokens=BLOCKS * CONTEXT):
    extra = {"samples": samples, "sample_T": sample_T} if samples else {}
    spec = StoreSpec(k=K, temperatures=TEMPS, topk_dtype="float32", num_tokens=num_tokens,
                     shard_tokens=3 * CONTEXT, teacher_config=teacher.config.to_diff_dict(),
                     teacher_sha256=SHA, tokenizer_sha256=SHA, corpus_sha256=SHA, **extra)  # fmt: skip

    def compute(start, end):
        cap = capture_soft_labels(teacher_logits(teacher, tokens, start, end), K, TEMPS,
                                  samples=samples, sample_T=sample_T,
                                  generator=torch.Generator().manual_seed(start))  # fmt: skip
        out = {"topk_ids": cap.topk_ids, "topk_logits": cap.topk_logits, "logz": cap.logz,
               "entropy": cap.entropy, "input_ids": tokens[start:end].int(),
               "doc_offsets": torch.arange(start, end, dtype=torch.int32) % 20}  # fmt: skip
        if samples:
            out["sample_ids"], out["sample_counts"] = cap.sample_ids, cap.sample_counts
            logits = teacher_logits(teacher, tokens, start, end)
            out["sample_logits"] = logits.gather(1, cap.sample_ids.clamp_min(0).long())
        return out

    write_store(folder, spec, compute)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("transformers")
    tokens = markov_tokens(BLOCKS * CONTEXT + 1)
    teacher = gpt2(32, 2, seed=1)
    folder = build(tmp_path_factory.mktemp("lm") / "store", teacher, tokens)
    return folder, teacher, tokens


@needs_transformers
def test_items_match_the_teacher_token_by_token(setup):
    folder, teacher, tokens = setup
    data = hf.StoreDataset(folder, tokens, context=CONTEXT, T=2.0)
    assert len(data) == BLOCKS
    batch = hf.StoreCollator()([data[i] for i in (4, 0, 11)])
    assert batch["T"] == 2.0 and batch["input_ids"].shape == (3, CONTEXT)
    assert batch["shift_labels"] is batch["labels"] and bool(batch["attention_mask"].all())
    for r, i in enumerate((4, 0, 11)):
        s = i * CONTEXT
        direct = capture_soft_labels(teacher_logits(teacher, tokens, s, s + CONTEXT), K, TEMPS)
        for j in range(CONTEXT):  # position by position: the input, its next token, its targets
            assert int(batch["input_ids"][r, j]) == int(tokens[s + j])
            assert int(batch["labels"][r, j]) == int(tokens[s + j + 1])
            assert batch["topk_ids"][r, j].tolist() == direct.topk_ids[j].tolist()
            torch.testing.assert_close(batch["topk_logits"][r, j], direct.topk_logits[j])
            torch.testing.assert_close(batch["logz"][r, j], direct.logz[j, 1])  # T = 2: column 1
    # the last block's last label is the token after the store's last row, from the tokens
    assert int(batch["labels"][2, -1]) == int(tokens[BLOCKS * CONTEXT])


@needs_transformers
def test_without_tokens_the_store_is_the_stream(setup):
    folder, _, tokens = setup
    data = hf.StoreDataset(SparseStore(folder), context=CONTEXT, T=1.0)
    last = data[BLOCKS - 1]
    assert torch.equal(last["input_ids"], tokens[-CONTEXT - 1 : -1])
    assert torch.equal(last["labels"][:-1], tokens[-CONTEXT:-1]) and int(last["labels"][-1]) == -100
    first = data[0]
    assert torch.equal(first["labels"], tokens[1 : CONTEXT + 1])  # across the shard edge too
    short = hf.StoreDataset(folder, context=5, drop_last=False)  # 96 = 19 * 5 + 1
    assert short[-1]["input_ids"].tolist() == [int(tokens[-2])] and short[-1][
        "labels"
    ].tolist() == [-100]


@needs_transformers
def test_padding_counts_nowhere(setup):
    folder, _, tokens = setup
    data = hf.StoreDataset(folder, tokens, context=5, T=1.0, drop_last=False)
    assert len(data) == math.ceil(BLOCKS * CONTEXT / 5)
    items = [data[len(data) - 1], data[3]]  # 1 row and 5 rows
    assert items[0]["input_ids"].shape == (BLOCKS * CONTEXT % 5,)
    batch = hf.StoreCollator(pad_token_id=7, pad_to_multiple_of=4)(items)
    n = items[0]["input_ids"].shape[0]
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0, n:].eq(-100).all() and batch["input_ids"][0, n:].eq(7).all()
    assert batch["attention_mask"].sum(1).tolist() == [n, 5]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, VOCAB, generator=g, requires_grad=True)
    for tail in ("bucket", "renormalize"):
        total = hf.batch_sparse_kd_loss(logits, batch, tail=tail, reduction="sum")
        parts = sum(
            sparse_kd_loss(logits[r, : len(it["labels"])], it["topk_ids"], it["topk_logits"],
                           it["labels"], logz=it["logz"] if tail == "bucket" else None, T=1.0,
                           alpha=0.5, tail=tail, reduction="sum")
            for r, it in enumerate(items)
        )  # fmt: skip
        torch.testing.assert_close(total, parts)
        (grad,) = torch.autograd.grad(total, logits)
        assert grad[0, n:].abs().max() == 0 and grad[1, 5:].abs().max() == 0
        counted = int(batch["labels"].ne(-100).sum())
        mean = hf.batch_sparse_kd_loss(logits, batch, tail=tail)
        torch.testing.assert_close(mean, total / counted)


@needs_transformers
def test_tokens_that_are_not_the_stores_are_one_line(setup):
    folder, _, tokens = setup
    other = tokens.clone()
    other[37] = (other[37] + 1) % VOCAB
    with pytest.raises(StoreError, match=r"input_ids differ from the tokens given at position 37 "):
        hf.StoreDataset(folder, other, context=CONTEXT)
    with pytest.raises(ValueError, match=r"tokens given are 10 long .* holds 96 positions"):
        hf.StoreDataset(folder, tokens[:10], context=CONTEXT)
    with pytest.raises(ValueError, match=r"tokens must be a 1-D sequence"):
        hf.StoreDataset(folder, tokens.float(), context=CONTEXT)


@needs_transformers
def test_bad_arguments_are_one_line(setup):
    folder, _, tokens = setup
    with pytest.raises(ValueError, match=r"^T = 3 is not in the store's temperature grid \(1, 2\)"):
        hf.StoreDataset(folder, tokens, context=CONTEXT, T=3.0)
    with pytest.raises(ValueError, match="holds no samples"):
        hf.StoreDataset(folder, tokens, context=CONTEXT, samples=True)
    with pytest.raises(ValueError, match="fewer than one block"):
        hf.StoreDataset(folder, tokens, context=BLOCKS * CONTEXT + 1)
    with pytest.raises(ValueError, match="context must be an int"):
        hf.StoreDataset(folder, tokens, context=0)
    data = hf.StoreDataset(folder, tokens, context=CONTEXT, T=2.0)
    with pytest.raises(IndexError):
        data[BLOCKS]
    batch = hf.StoreCollator()([data[0]])
    with pytest.raises(ValueError, match=r"T = 1 but the batch's logz is the teacher's at T = 2"):
        hf.batch_sparse_kd_loss(torch.randn(1, CONTEXT, VOCAB), batch, T=1.0)
    one = hf.StoreDataset(folder, tokens, context=CONTEXT, T=1.0)[1]
    with pytest.raises(ValueError, match="one batch mixes T"):
        hf.StoreCollator()([data[0], one])


@needs_transformers
def test_a_tampered_shard_is_one_line_when_read(tmp_path, setup):
    _, teacher, tokens = setup
    folder = build(tmp_path / "s", teacher, tokens)
    shard = folder / "shard-000002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x55
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="does not match its SHA-256"):
        hf.StoreDataset(folder, tokens, context=CONTEXT)


@needs_transformers
def test_pickled_dataset_reads_in_a_new_process_state(setup):
    import pickle

    folder, _, tokens = setup
    data = hf.StoreDataset(folder, tokens, context=CONTEXT)
    _ = data[3]  # opens shard handles, which must not travel
    again = pickle.loads(pickle.dumps(data))
    assert torch.equal(again[3]["topk_ids"], data[3]["topk_ids"])


@needs_transformers
def test_trainer_loss_falls(setup, tmp_path):
    from transformers import TrainingArguments

    folder, _, tokens = setup
    student = gpt2(16, 1, seed=2).train()
    data = hf.StoreDataset(folder, tokens, context=CONTEXT, T=2.0)
    fixed = hf.StoreCollator()([data[i] for i in range(len(data))])

    def loss_now():
        with torch.no_grad():
            logits = student(input_ids=fixed["input_ids"]).logits
            return float(hf.batch_sparse_kd_loss(logits, fixed, alpha=0.5))

    before = loss_now()
    args = TrainingArguments(
        str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=4, learning_rate=1e-2,
        gradient_accumulation_steps=2, use_cpu=True, remove_unused_columns=False, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = hf.SparseKDTrainer(model=student, args=args, train_dataset=data, alpha=0.5)
    trainer.train()
    after = loss_now()
    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 30 and all(math.isfinite(x) for x in logged)
    print(f"KD loss on all blocks: {before:.4f} before, {after:.4f} after 30 steps")
    assert after < 0.9 * before, (before, after)
    assert sum(logged[-5:]) / 5 < sum(logged[:5]) / 5


@needs_transformers
def test_trainer_refuses_dropping_the_targets(setup, tmp_path):
    from transformers import TrainingArguments

    folder, _, tokens = setup
    args = TrainingArguments(str(tmp_path / "o"), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        hf.SparseKDTrainer(model=gpt2(16, 1, 0), args=args,
                           train_dataset=hf.StoreDataset(folder, tokens, context=CONTEXT))  # fmt: skip


@needs_transformers
def test_accumulated_loss_equals_one_big_batch(setup):
    """SparseKDTrainer.compute_loss with Trainer's num_items_in_batch: sum / count, so two
    micro-batches' gradients add up to the whole batch's mean gradient."""
    from transformers import TrainingArguments

    folder, _, tokens = setup
    student = gpt2(16, 1, seed=3)
    data = hf.StoreDataset(folder, tokens, context=5, T=1.0, drop_last=False)
    args = TrainingArguments("unused", use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = hf.SparseKDTrainer(model=student, args=args, train_dataset=data, alpha=0.5)
    parts = [hf.StoreCollator()([data[len(data) - 1], data[0]]), hf.StoreCollator()([data[1]])]
    count = sum(int(p["labels"].ne(-100).sum()) for p in parts)
    for p in parts:
        trainer.compute_loss(student, p, num_items_in_batch=torch.tensor(count)).backward()
    accumulated = [q.grad.clone() for q in student.parameters()]
    student.zero_grad()
    whole = hf.StoreCollator()([data[len(data) - 1], data[0], data[1]])
    trainer.compute_loss(student, whole).backward()
    for a, q in zip(accumulated, student.parameters(), strict=True):
        torch.testing.assert_close(a, q.grad, atol=1e-6, rtol=1e-4)


DOC = Path(__file__).resolve().parent.parent / "docs" / "lm-hf-trainer.md"


@needs_transformers
def test_doc_code_blocks_run(tmp_path, monkeypatch):
    text = DOC.read_text()
    blocks = [(text.count("\n", 0, m.start()) + 1, m.group(1))
              for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]  # fmt: skip
    assert len(blocks) >= 3
    joined = "\n".join(code for _, code in blocks)
    assert "SparseKDTrainer" in joined and "training_step" in joined
    if re.search(r"^import lightning", joined, flags=re.M):
        pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    namespace = {"__name__": "lm_hf_trainer_doc"}
    for line, code in blocks:  # in order, in one namespace: a tutorial's blocks build on each other
        exec(compile(code, f"{DOC.name}:{line}", "exec"), namespace)
    assert (tmp_path / "lm-store" / "index.json").is_file()


@needs_transformers
def test_sampled_targets_ride_along(setup, tmp_path):
    _, teacher, tokens = setup
    folder = build(tmp_path / "sampled", teacher, tokens, samples=4)
    store = SparseStore(folder)
    data = hf.StoreDataset(store, tokens, context=CONTEXT, T=2.0, samples=True)
    items = [data[2], data[7]]
    batch = hf.StoreCollator()(items)
    assert batch["sample_T"] == store.spec.sample_T == 1.0
    rows = store.tokens(7 * CONTEXT, 8 * CONTEXT)
    for name in ("sample_ids", "sample_counts", "sample_logits"):
        assert torch.equal(batch[name][1], rows[name])
    assert torch.equal(batch["sample_logz"][1], rows["logz"][:, 0])  # sample_T = 1: column 0
    assert torch.equal(batch["logz"][1], rows["logz"][:, 1])  # T = 2: column 1
    logits = torch.randn(2, CONTEXT, VOCAB, generator=torch.Generator().manual_seed(1))
    got = hf.batch_sparse_kd_loss(logits, batch, tail="sampled", reduction="sum")
    want = sum(
        sparse_kd_loss(logits[r], it["sample_ids"], it["sample_logits"], it["labels"],
                       logz=it["logz"], T=2.0, alpha=0.5, tail="sampled",
                       sample_counts=it["sample_counts"], sample_T=1.0,
                       sample_logz=it["sample_logz"], reduction="sum")
        for r, it in enumerate(items)
    )  # fmt: skip
    torch.testing.assert_close(got, want)
    assert math.isfinite(float(got))
    off_grid = build(tmp_path / "off", teacher, tokens, samples=4, sample_T=1.5)
    with pytest.raises(ValueError, match=r"sample_T = 1.5, which is not in its temperature grid"):
        hf.StoreDataset(off_grid, tokens, context=CONTEXT, T=2.0, samples=True)
    plain = hf.StoreCollator()([hf.StoreDataset(store, tokens, context=CONTEXT, T=2.0)[2]])
    with pytest.raises(ValueError, match="samples=True"):
        hf.batch_sparse_kd_loss(logits[:1], plain, tail="sampled")


@needs_transformers
def test_dataloader_workers_read_their_rows(setup):
    from torch.utils.data import DataLoader

    folder, _, tokens = setup
    data = hf.StoreDataset(folder, tokens, context=CONTEXT, T=1.0)
    loader = DataLoader(data, batch_size=5, num_workers=2, collate_fn=hf.StoreCollator())
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == BLOCKS
    got = torch.cat([b["topk_logits"] for b in batches])
    want = torch.stack([data[i]["topk_logits"] for i in range(BLOCKS)])
    assert torch.equal(got, want)


@needs_transformers
def test_a_token_split_is_the_tokens(tmp_path):
    """The dataset reads an rbkd.lm.tokens.TokenSplit (memory-mapped, documents joined by
    end-of-text) as its tokens; another split of the corpus is one line."""
    from lm_fixtures import write_tiny_corpus
    from transformers import GPT2Config, GPT2LMHeadModel

    from rbkd.lm.corpus import load_corpus
    from rbkd.lm.tokenizer import train_tokenizer
    from rbkd.lm.tokens import tokenize_split

    corpus = load_corpus(write_tiny_corpus(tmp_path / "texts", files=6, sentences=8))
    tok = train_tokenizer(corpus, 300)
    split = tokenize_split(corpus, tok, "train", root=tmp_path / "tokens", shard_tokens=100)
    context, blocks = 8, min(10, (len(split) - 1) // 8)
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=split.vocab_size, n_positions=context,
                                         n_embd=16, n_layer=1, n_head=2)).eval()  # fmt: skip
    stream = torch.as_tensor(split.tokens(0, blocks * context + 1)).long()
    spec = StoreSpec(k=4, temperatures=(1.0,), topk_dtype="float32", num_tokens=blocks * context,
                     shard_tokens=2 * context, teacher_config=teacher.config.to_diff_dict(),
                     teacher_sha256=SHA, tokenizer_sha256=split.tokenizer_sha256,
                     corpus_sha256=SHA)  # fmt: skip

    def compute(start, end):
        with torch.no_grad():
            logits = teacher(input_ids=stream[start:end].view(-1, context)).logits
        cap = capture_soft_labels(logits.flatten(0, 1), 4, (1.0,))
        return {"topk_ids": cap.topk_ids, "topk_logits": cap.topk_logits, "logz": cap.logz,
                "entropy": cap.entropy, "input_ids": stream[start:end].int(),
                "doc_offsets": torch.as_tensor(split.doc_offsets(start, end)).int()}  # fmt: skip

    write_store(tmp_path / "store", spec, compute)
    data = hf.StoreDataset(tmp_path / "store", split, context=context)
    item = data[blocks - 1]
    s = (blocks - 1) * context
    assert torch.equal(item["input_ids"], stream[s : s + context])
    assert torch.equal(item["labels"], stream[s + 1 : s + context + 1])

    class Shifted:  # the same split read one token late: any object with tokens() and len()
        def __len__(self):
            return len(split) - 1

        def tokens(self, start, end):
            return split.tokens(start + 1, end + 1)

    with pytest.raises(StoreError, match="input_ids differ from the tokens given at position 0 "):
        hf.StoreDataset(tmp_path / "store", Shifted(), context=context)
