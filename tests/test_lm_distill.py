"""Language-model students (rbkd.lm.train.distill, `rbkd lm distill`): from a sparse store
aligned with the student's token positions, from a teacher online, or from hard labels; run keys;
every bad input one line. A tiny corpus, its BPE, a tiny GPT-2 teacher and its store."""

from __future__ import annotations

import pytest
import torch
from lm_fixtures import write_tiny_corpus

from rbkd.lm.capture import capture
from rbkd.lm.corpus import load_corpus
from rbkd.lm.store import StoreError
from rbkd.lm.tokenizer import train_tokenizer
from rbkd.lm.tokens import tokenize_split
from rbkd.lm.train.config import LMTrainConfig
from rbkd.lm.train.models import build_model, model_config, save_hf_folder
from rbkd.lm.train.runs import distill
from rbkd.lm.train.store_reader import StoreRows, open_store
from rbkd.lm.train.tokens import num_windows

pytest.importorskip("transformers")
VOCAB, C, K, TEMPS = 300, 16, 8, (1.0, 2.0)


def cfg(**kw) -> LMTrainConfig:
    base = dict(steps=3, batch_size=4, context=C, lr=3e-3, warmup_steps=1, eval_every=3,
                eval_tokens=64, checkpoint_every=3, device="cpu")  # fmt: skip
    return LMTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdistill")
    corpus = load_corpus(write_tiny_corpus(root / "texts", files=8, sentences=12))
    tok = train_tokenizer(corpus, VOCAB, out=root / "tok" / "tokenizer.json")
    train = tokenize_split(corpus, tok, "train", root=root / "tokens")
    val = tokenize_split(corpus, tok, "validation", root=root / "tokens")
    teacher = build_model(model_config({"n_layer": 1, "n_embd": 32, "n_head": 2}, VOCAB, C), 5)
    save_hf_folder(teacher, root / "teacher")
    store = root / "store"
    capture(teacher, train, store, k=K, temperatures=TEMPS, context=C, samples=4, sample_T=1.0)
    return {"root": root, "corpus": corpus, "tok": tok, "train": train, "val": val,
            "teacher": teacher.eval(), "store": store}  # fmt: skip


def test_store_rows_are_the_teacher_at_the_student_positions(lm):
    store = open_store(lm["store"], T=2.0, k=4, tail="bucket", vocab_size=VOCAB,
                       tokens_needed=C, tokenizer_sha256=lm["train"].tokenizer_sha256,
                       corpus_sha256=lm["train"].positions_sha256)  # fmt: skip
    rows = StoreRows(store, 2.0, 4)
    windows = torch.tensor([3, 0, num_windows(lm["train"], C) - 1])
    blocks = torch.stack([lm["train"].tokens(int(w) * C, int(w) * C + C + 1) for w in windows])
    got = rows.batch(windows * C, C, blocks[:, :-1])
    with torch.no_grad():
        z = lm["teacher"].double()(input_ids=blocks[:, :-1]).logits  # float64 oracle
    lm["teacher"].float()
    top = z.topk(4, -1)
    assert torch.equal(got["topk_ids"].long(), top.indices)
    torch.testing.assert_close(got["topk_logits"].double(), top.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        got["logz"].double(), torch.logsumexp(z / 2, -1), atol=1e-4, rtol=1e-5
    )


def test_a_truncated_top_k_with_the_bucket_tail_is_the_exact_coarsened_kl(lm):
    """k = 4 of a k = 8 store: the sparse loss equals the KL between the teacher and student,
    each coarsened to the 4 kept ids plus one tail bucket, computed from full logits."""
    from rbkd.lm.train.objectives import StoredTeacher

    store = open_store(lm["store"], T=2.0, k=4, tail="bucket", vocab_size=VOCAB, tokens_needed=C)
    objective = StoredTeacher(
        StoreRows(store, 2.0, 4), T=2.0, alpha=1.0, tail="bucket", identity={}
    )
    blocks = torch.stack([lm["train"].tokens(w * C, w * C + C + 1) for w in (1, 2)])
    x = blocks[:, :-1]
    student = torch.randn(2, C, VOCAB, dtype=torch.float64)
    loss, _ = objective(student.float(), x, blocks[:, 1:], torch.tensor([C, 2 * C]))
    with torch.no_grad():
        z = lm["teacher"].double()(input_ids=x).logits
    lm["teacher"].float()
    ids = z.topk(4, -1).indices
    p_t, p_s = (torch.softmax(t / 2, -1) for t in (z, student))
    q, p = p_t.gather(-1, ids), p_s.gather(-1, ids)
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    want = 4 * (q * (q.log() - p.log())).sum()  # T^2 = 4, summed over the tokens
    assert float(loss) == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize(
    "source",
    [
        {"store": "store", "T": 2.0, "k": 4, "tail": "bucket"},
        {"store": "store", "T": 3.0, "k": 8, "tail": "renormalize"},
        {"store": "store", "T": 1.0, "tail": "sampled"},
        {"teacher": "teacher", "T": 2.0},
        {"alpha": 0.0},
    ],
    ids=["bucket", "renormalize", "sampled", "online", "hard"],
)
def test_every_kind_of_student_trains_and_is_reused(lm, tmp_path, source):
    kw = {k: (lm["root"] / v if k in ("store", "teacher") else v) for k, v in source.items()}
    kw.setdefault("alpha", 0.5)
    first = distill(
        lm["train"], lm["val"], model="tiny", cfg=cfg(), root=tmp_path, progress=False, **kw
    )
    m = first["metrics"]
    assert first["reused"] is False and m["steps"] == 3
    assert torch.isfinite(torch.tensor([m["train_objective_loss"], m["val_ce_loss"]])).all()
    assert (tmp_path / first["run_dir"].split("/")[-1] / "model" / "model.safetensors").is_file()
    again = distill(
        lm["train"], lm["val"], model="tiny", cfg=cfg(), root=tmp_path, progress=False, **kw
    )
    assert again["reused"] is True and again["key"] == first["key"]


def test_another_T_k_tail_or_seed_is_another_run(lm, tmp_path):
    def key(seed=0, **kw):
        args = {"store": lm["store"], "T": 2.0, "k": 4, "tail": "bucket", "alpha": 0.5, **kw}
        return distill(lm["train"], lm["val"], model="tiny", cfg=cfg(steps=1, seed=seed),
                       root=tmp_path, progress=False, **args)["key"]  # fmt: skip

    keys = [key(), key(T=1.0), key(k=8), key(tail="renormalize"), key(seed=1), key(alpha=0.9)]
    assert len(set(keys)) == len(keys)
    assert key(k=4) == keys[0]  # the same run


def _one_line(lm, match, **kw):
    args = {"store": lm["store"], "T": 2.0, "k": 4, "tail": "bucket", "alpha": 0.5, **kw}
    train = args.pop("train", lm["train"])
    c = args.pop("cfg", cfg())
    with pytest.raises((ValueError, StoreError), match=match) as err:
        distill(train, lm["val"], model="tiny", cfg=c, root=None, progress=False, **args)
    assert "\n" not in str(err.value), str(err.value)


def test_a_T_off_the_store_grid_is_refused(lm):
    _one_line(lm, r"T = 3 is not in the store's temperature grid \(1, 2\)", T=3.0)


def test_k_above_the_store_k_is_refused(lm):
    _one_line(lm, "--k 9 is more than the store's k = 8", k=9)


def test_a_store_of_another_teacher_is_refused(lm):
    other = build_model(model_config({"n_layer": 1, "n_embd": 32, "n_head": 2}, VOCAB, C), 6)
    save_hf_folder(other, lm["root"] / "other-teacher")
    _one_line(lm, "captured with another teacher", teacher=lm["root"] / "other-teacher")


def test_a_store_of_another_corpus_is_refused(lm):
    _one_line(lm, "captured with another corpus", train=lm["train"].head(len(lm["train"]) - 50))


def test_a_store_of_another_tokenizer_is_refused(lm, tmp_path):
    tok = train_tokenizer(lm["corpus"], 280, out=tmp_path / "tokenizer.json")
    train = tokenize_split(lm["corpus"], tok, "train", root=tmp_path / "tokens")
    val = tokenize_split(lm["corpus"], tok, "validation", root=tmp_path / "tokens")
    with pytest.raises(StoreError, match="captured with another tokenizer") as err:
        distill(train, val, store=lm["store"], T=2.0, model="tiny", cfg=cfg(), root=None,
                progress=False)  # fmt: skip
    assert "\n" not in str(err.value)


def test_a_student_vocabulary_other_than_the_store_is_refused(lm):
    with pytest.raises(StoreError, match="vocabulary 300, the student's is 301") as err:
        open_store(lm["store"], T=2.0, k=4, tail="bucket", vocab_size=301, tokens_needed=C)
    assert "\n" not in str(err.value)


def test_a_context_other_than_the_capture_is_refused(lm):
    _one_line(lm, "captured at context 16, the student trains at 8", cfg=cfg(context=8))


def test_alpha_without_a_teacher_is_refused(lm):
    _one_line(lm, "alpha = 0.5 needs a teacher", store=None)


def test_sampled_without_samples_is_refused(lm, tmp_path):
    capture(lm["teacher"], lm["train"], tmp_path / "plain", k=K, temperatures=TEMPS, context=C)
    _one_line(lm, "holds no samples", store=tmp_path / "plain", tail="sampled", T=1.0)


def test_with_its_teacher_a_student_reports_the_kl_to_it_on_validation(lm):
    from rbkd.lm.train.loop import validation_sums

    result = distill(lm["train"], lm["val"], store=lm["store"], teacher=lm["root"] / "teacher",
                     T=2.0, k=4, model="tiny", cfg=cfg(), root=None, progress=False)  # fmt: skip
    kl = result["metrics"]["val_kl_to_teacher"]
    student, teacher = result["model_object"], lm["teacher"]
    # the same number from the two models' float64 logits, over the same validation windows
    c = cfg()
    ctx = type("Ctx", (), {"device": torch.device("cpu"), "world_size": 1,
                           "shard": staticmethod(lambda t: t),
                           "all_reduce_sum": staticmethod(lambda t: t)})()  # fmt: skip
    ce_sum, count, kl_sum = validation_sums(
        student.double(), lm["val"], c, "fp32", ctx, teacher.double()
    )
    teacher.float()
    assert count > 0 and kl_sum / count == pytest.approx(kl, rel=1e-4) and kl > 0
    plain = distill(lm["train"], lm["val"], store=lm["store"], T=2.0, k=4, model="tiny", cfg=cfg(),
                    root=None, progress=False)  # fmt: skip
    assert (
        plain["key"] != result["key"]
        and plain["metrics"]["val_kl_to_teacher"] != plain["metrics"]["val_kl_to_teacher"]
    )  # NaN
