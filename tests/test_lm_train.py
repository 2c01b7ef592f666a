"""Language-model training (rbkd.lm.train): the step loop, its schedule, accumulation, clipping,
resume, run keys and bad input, on tiny GPT-2s and synthetic token streams."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from rbkd.engine.loop import TrainingDiverged
from rbkd.lm.train import loop as lm_loop
from rbkd.lm.train.config import LMTrainConfig
from rbkd.lm.train.loop import fit_lm
from rbkd.lm.train.models import build_model, model_config
from rbkd.lm.train.objectives import HardLabels
from rbkd.lm.train.runs import train_teacher
from rbkd.lm.train.schedule import lr_at
from rbkd.lm.train.tokens import MemoryTokens, WindowOrder

transformers = pytest.importorskip("transformers")
V, C = 16, 16


def learnable(n: int = 3000, split: str = "train") -> MemoryTokens:
    """A stream whose next token is a function of the current one: a model can learn it all,
    while its unigram distribution is uniform (perplexity 16)."""
    return MemoryTokens((torch.arange(n) * 3 + 1) % V, split=split, vocab_size=V)


def cfg(**kw) -> LMTrainConfig:
    base = dict(steps=8, batch_size=4, context=C, lr=3e-3, warmup_steps=2, eval_every=4,
                eval_tokens=128, checkpoint_every=2, device="cpu")  # fmt: skip
    return LMTrainConfig(**{**base, **kw})


def tiny(seed: int = 0):
    return build_model(model_config("tiny", V, C), seed)


def test_loss_decreases_far_below_the_unigram_baseline():
    result = train_teacher(learnable(), learnable(800, "validation"), model="tiny",
                           cfg=cfg(steps=40, batch_size=8, eval_every=10), root=None, progress=False)  # fmt: skip
    m = result["metrics"]
    assert m["unigram_perplexity"] == pytest.approx(V, rel=0.02)  # uniform unigrams
    assert m["val_perplexity"] < m["unigram_perplexity"] / 3, m
    assert m["tokens_seen"] == 40 * 8 * C and m["tokens_per_s"] > 0
    assert result["reused"] is False and result["run_dir"] is None


@pytest.mark.parametrize("steps,warmup,ratio", [(100, 10, 0.1), (7, 0, 0.0), (5, 5, 0.5)])
def test_schedule_matches_the_formula_and_hugging_face(steps, warmup, ratio):
    from transformers import get_cosine_schedule_with_warmup

    lr = 2e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = get_cosine_schedule_with_warmup(opt, warmup, steps)
    for step in range(steps):
        got = lr_at(step, lr=lr, steps=steps, warmup_steps=warmup, min_lr_ratio=ratio)
        if step < warmup:
            want = lr * (step + 1) / warmup
        else:  # HF's cosine (it ends at 0), lifted to the floor lr * ratio
            want = lr * ratio + (1 - ratio) * lr * hf.lr_lambdas[0](step)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), step
    assert lr_at(
        warmup, lr=lr, steps=steps, warmup_steps=warmup, min_lr_ratio=ratio
    ) == pytest.approx(
        lr if steps > warmup else lr * ratio + (lr - lr * ratio) * 0.5 * (1 + math.cos(0))
    )


def test_the_loop_applies_the_schedule(monkeypatch):
    seen = []
    real = lm_loop.make_optimizer

    def spy(model, c):
        opt = real(model, c)
        opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(lm_loop, "make_optimizer", spy)
    c = cfg(steps=6, warmup_steps=2, min_lr_ratio=0.2)
    fit_lm(tiny(), learnable(), None, c, HardLabels(), progress=False)
    want = [lr_at(s, lr=c.lr, steps=6, warmup_steps=2, min_lr_ratio=0.2) for s in range(6)]
    assert seen == pytest.approx(want, rel=1e-12)


def test_accumulation_equals_the_larger_batch_in_float64():
    weights = []
    for micro in (8, 2, 1):
        model = tiny(3).double()
        fit_lm(model, learnable(), None, cfg(batch_size=8, micro_batch=micro, steps=4),
               HardLabels(), progress=False)  # fmt: skip
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    start = tiny(3).double().state_dict()
    for other in weights[1:]:
        for name, w in weights[0].items():
            torch.testing.assert_close(other[name], w, atol=1e-12, rtol=1e-10, msg=name)
    assert any(not torch.equal(weights[0][n], start[n]) for n in start)  # it trained


def test_clipping_bounds_the_gradient_the_optimizer_sees(monkeypatch):
    norms = []
    real = lm_loop.make_optimizer

    def spy(model, c):
        opt = real(model, c)

        def record(o, a, k):
            grads = [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        opt.register_step_pre_hook(record)
        return opt

    monkeypatch.setattr(lm_loop, "make_optimizer", spy)
    fit_lm(tiny(), learnable(), None, cfg(steps=3, grad_clip=0), HardLabels(), progress=False)
    unclipped, norms[:] = list(norms), []
    clip = min(unclipped) / 4
    assert clip > 0
    fit_lm(tiny(), learnable(), None, cfg(steps=3, grad_clip=clip), HardLabels(), progress=False)
    assert norms[0] == pytest.approx(clip, rel=1e-5)  # same weights at step 1: clipped to clip
    assert all(n <= clip * (1 + 1e-5) for n in norms), (norms, clip)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    train, val = learnable(), learnable(600, "validation")
    c = cfg(steps=8, checkpoint_every=3, eval_every=4)
    whole = train_teacher(train, val, model="tiny", cfg=c, out=tmp_path / "whole", progress=False)
    calls = {"n": 0}
    real = HardLabels.__call__

    def dies_at_step_5(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as Ctrl-C or a kill would: mid-step, after checkpoint 3
        return real(self, *args)

    monkeypatch.setattr(HardLabels, "__call__", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(train, val, model="tiny", cfg=c, out=tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "result.json").exists()
    monkeypatch.setattr(HardLabels, "__call__", real)
    again = train_teacher(train, val, model="tiny", cfg=c, out=tmp_path / "cut", progress=False)
    assert again["resumed_from_step"] == 3 and again["key"] == whole["key"]
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    drop = ("tokens_per_s",)
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in m["metrics"]] for m in
            (_metrics(tmp_path / "whole"), _metrics(tmp_path / "cut"))]  # fmt: skip
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [4, 8]
    # the same command a third time trains nothing
    third = train_teacher(train, val, model="tiny", cfg=c, out=tmp_path / "cut", progress=False)
    assert third["reused"] is True


def _metrics(run):
    import json

    return {
        "metrics": [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    }


def test_the_teacher_is_a_hugging_face_folder(tmp_path):
    result = train_teacher(learnable(), None, model="tiny", cfg=cfg(steps=2), root=tmp_path,
                           progress=False)  # fmt: skip
    folder = tmp_path / f"lm-teacher-tiny-{result['key'][:12]}" / "model"
    assert result["hf_folder"] == str(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    x = torch.randint(0, V, (2, C))
    trained = build_model(model_config("tiny", V, C), 0)
    trained.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, trained(input_ids=x).logits)


def test_run_keys_name_what_changes_the_numbers(tmp_path):
    train = learnable()
    keys = {}
    for name, kw in {
        "base": {},
        "seed": {"seed": 1},
        "lr": {"lr": 1e-3},
        "steps": {"steps": 3},
    }.items():
        keys[name] = train_teacher(train, None, model="tiny", cfg=cfg(steps=2, **kw) if "steps" not in kw
                                   else cfg(**kw), root=tmp_path, progress=False)["key"]  # fmt: skip
    assert len(set(keys.values())) == 4
    # the micro-batch, the checkpoint interval and the device name change nothing computed
    same = train_teacher(train, None, model="tiny", root=tmp_path, progress=False,
                         cfg=cfg(steps=2, micro_batch=2, checkpoint_every=1))  # fmt: skip
    assert same["key"] == keys["base"] and same["reused"] is True


def test_window_order_is_a_function_of_the_step():
    order = WindowOrder(10, seed=4)
    batches = [order.batch(s, 4) for s in range(5)]  # 20 windows: two whole passes
    assert sorted(torch.cat(batches[:2] + [batches[2][:2]]).tolist()) == list(range(10))
    fresh = WindowOrder(10, seed=4)
    assert torch.equal(fresh.batch(3, 4), batches[3])  # without replaying steps 0-2


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"batch_size": 4, "micro_batch": 3}, "micro_batch 3 does not divide"),
        ({"context": 5000}, "fewer than one sequence of context 5000"),
        ({"precision": "fp16"}, "precision fp16 needs a CUDA device"),
    ],
)
def test_bad_settings_are_one_line(kw, message):
    with pytest.raises(ValueError, match=message) as err:
        fit_lm(tiny(), learnable(), None, cfg(**kw), HardLabels(), progress=False)
    assert "\n" not in str(err.value)


def test_a_sequence_longer_than_the_model_context_is_one_line():
    with pytest.raises(ValueError, match="longer than the model's context") as err:
        model_config({"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 8}, V, 16)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="vocabulary is 99 ids but the tokenizer's is 16"):
        model_config({"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 99}, V, 16)


def test_a_diverging_run_stops_before_the_update():
    with pytest.raises(TrainingDiverged, match="step 1/"):
        model = tiny()
        with torch.no_grad():
            model.transformer.wte.weight[0, 0] = float("inf")
        fit_lm(model, learnable(), None, cfg(steps=2), HardLabels(), progress=False)


def test_bf16_autocast_trains_with_float32_losses():
    """The autocast path (the GPU default; on the CPU only when asked: it is slower there)."""
    model = tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    out = fit_lm(model, learnable(), learnable(300, "validation"), cfg(steps=2, eval_every=2,
                 precision="bf16"), HardLabels(), progress=False, on_row=rows.append)  # fmt: skip
    assert out["precision"] == "bf16" and math.isfinite(out["val_ce_loss"])
    assert rows and rows[-1]["step"] == 2 and math.isfinite(rows[-1]["train_ce_loss"])
    assert all(
        v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point()
    )
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
