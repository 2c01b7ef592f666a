"""`rbkd lm train-teacher` and `rbkd lm distill`: causal language models on a token corpus
(rbkd.lm.train; docs/lm-training.md). Registered into the `lm` group by cli/lm.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import typer
from rbkd.cli.config_file import ConfigOpt
from rbkd.cli.errors import handle_errors
from rbkd.cli.lm_data import CorpusOpt, TokenizerOpt, VocabSizeOpt
from rbkd.cli.options import DeviceOpt, ProgressOpt, SeedOpt, ThreadsOpt
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.text import escape

from rbkd.lm.train.config import LMTrainConfig

_CFG = LMTrainConfig()
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Tail = Literal["bucket", "renormalize", "sampled"]

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", help="A size (teacher 13.9M, student 2.5M, tiny) or a GPT-2 config.json."
    ),
]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Sequences per optimizer step (all ranks).")
]
MicroOpt = Annotated[
    int | None,
    typer.Option(
        "--micro-batch", min=1, help="Sequences per forward on a rank (gradient accumulation)."
    ),
]
ContextOpt = Annotated[int, typer.Option("--context", min=1, help="Tokens per sequence.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, cosine schedule).")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=0, help="Linear warm-up steps.")]
MinLrOpt = Annotated[
    float, typer.Option("--min-lr-ratio", help="The cosine's floor, as a share of --lr.")
]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW's, on matrices only.")]
ClipOpt = Annotated[
    float, typer.Option("--grad-clip", help="Max gradient 2-norm (0: no clipping).")
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision", help="Autocast: auto = bf16 on a GPU that has it, fp32 on the CPU."
    ),
]
EvalEveryOpt = Annotated[
    int, typer.Option("--eval-every", min=1, help="Steps between validation passes.")
]
EvalTokensOpt = Annotated[
    int, typer.Option("--eval-tokens", min=0, help="Validation tokens scored per pass (0: all).")
]
CheckpointOpt = Annotated[
    int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")
]
LimitOpt = Annotated[
    int | None,
    typer.Option("--limit", min=2, help="Train on the first N tokens of the train split only."),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", help="Run folder (default: runs/lm-...-<key>, named by the run's content)."
    ),
]


def _splits(corpus, tokenizer, vocab_size, limit, progress):
    from rbkd.lm.corpus import load_corpus
    from rbkd.lm.tokenizer import DEFAULT_VOCAB_SIZE, tokenizer_for
    from rbkd.lm.tokens import tokenize_split

    if tokenizer is not None and vocab_size is not None:
        raise ValueError("give --tokenizer or --vocab-size (to train one), not both")
    loaded = load_corpus(corpus)
    tok = tokenizer_for(loaded, vocab_size or DEFAULT_VOCAB_SIZE, tokenizer)
    train = tokenize_split(loaded, tok, "train", progress=progress)
    val = tokenize_split(loaded, tok, "validation", progress=progress)
    return (train.head(limit) if limit is not None else train), val, tok


def _config(**kw) -> LMTrainConfig:
    from rbkd.cli.usage import usage_errors

    with usage_errors():
        cfg = LMTrainConfig(**kw)
        cfg.check()
    return cfg


def _ppl(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:,.2f}"


def _show(title: str, result: dict, as_json: bool) -> None:
    result = {k: v for k, v in result.items() if k != "model_object"}
    if as_json:
        print_json(result)
        return
    m = result["metrics"]
    if result["reused"]:
        title += " (already trained: nothing to do)"
    table = titled_table(escape(title), show_header=False)
    table.add_row("run folder", escape(str(result["run_dir"])))
    table.add_row("parameters", f"{m['parameters']:,}")
    table.add_row("steps", f"{m['steps']} ({m['tokens_seen']:,.0f} tokens, {m['precision']})")
    table.add_row("validation CE", f"{m['val_ce_loss']:.4f}")
    table.add_row("validation perplexity", _ppl(m["val_perplexity"]))
    if "unigram_perplexity" in m:
        table.add_row("unigram baseline perplexity", _ppl(m["unigram_perplexity"]))
    table.add_row("training speed", f"{m['tokens_per_s']:,.0f} tokens/s")
    if result.get("hf_folder"):
        table.add_row("Hugging Face folder", escape(result["hf_folder"]))
    print_table(table)


@handle_errors
def train_teacher(
    model: ModelOpt = "teacher",
    corpus: CorpusOpt = None,
    tokenizer: TokenizerOpt = None,
    vocab_size: VocabSizeOpt = None,
    limit: LimitOpt = None,
    steps: StepsOpt = _CFG.steps,
    batch_size: BatchOpt = _CFG.batch_size,
    micro_batch: MicroOpt = None,
    context: ContextOpt = _CFG.context,
    lr: LrOpt = _CFG.lr,
    warmup: WarmupOpt = _CFG.warmup_steps,
    min_lr_ratio: MinLrOpt = _CFG.min_lr_ratio,
    weight_decay: WeightDecayOpt = _CFG.weight_decay,
    grad_clip: ClipOpt = _CFG.grad_clip,
    precision: PrecisionOpt = "auto",
    eval_every: EvalEveryOpt = _CFG.eval_every,
    eval_tokens: EvalTokensOpt = _CFG.eval_tokens,
    checkpoint_every: CheckpointOpt = _CFG.checkpoint_every,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train a causal-LM teacher (GPT-2 style) on a corpus's next tokens and write its run folder.

    The run folder holds config.json, metrics.jsonl (a row every --eval-every steps: validation
    perplexity, tokens/s), a checkpoint every --checkpoint-every steps, model/ (a Hugging Face
    folder: config.json, model.safetensors, tokenizer.json) and result.json, with the unigram
    baseline perplexity beside the model's. The same command again trains nothing; a killed run
    continues from its last checkpoint. Under torchrun the batch is split over the ranks.

    Example:

        rbkd lm train-teacher --model tiny --steps 20 --context 64 --out runs/lm-teacher
    """
    from rbkd.cli.threads import start_compute

    from rbkd.lm.train.runs import train_teacher as run

    cfg = _config(steps=steps, batch_size=batch_size, micro_batch=micro_batch, context=context,
                  lr=lr, warmup_steps=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                  grad_clip=grad_clip, precision=precision, seed=seed, device=device,
                  eval_every=eval_every, eval_tokens=eval_tokens,
                  checkpoint_every=checkpoint_every)  # fmt: skip
    start_compute(threads)
    train, val, tok = _splits(corpus, tokenizer, vocab_size, limit, progress)
    result = run(train, val, model=model, cfg=cfg, out=out, progress=progress)
    _copy_tokenizer(tok, result)
    _show(f"{model} language-model teacher", result, as_json)


def _copy_tokenizer(tok, result: dict) -> None:
    """The tokenizer beside the weights, so the folder is whole for Hugging Face tools and for
    `rbkd lm soft-labels` (which looks for model/tokenizer.json)."""
    from rbkd.engine.distributed import is_main_process
    from rbkd.io import write_bytes

    folder = result.get("hf_folder")
    if folder and is_main_process() and tok.path is not None and Path(folder).is_dir():
        target = Path(folder) / "tokenizer.json"
        if not target.exists():
            write_bytes(target, Path(tok.path).read_bytes())


@handle_errors
def distill(
    store: Annotated[
        Path | None,
        typer.Option(
            "--store", "--teacher-store", help="A sparse soft-label store (rbkd lm soft-labels)."
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            help="A teacher run (or HF folder) for dense KD online: its logits each step.",
        ),
    ] = None,
    T: Annotated[
        float,
        typer.Option(
            "--T", help="Distillation temperature (in the store's grid for --tail bucket)."
        ),
    ] = 1.0,
    k: Annotated[
        int | None,
        typer.Option("--k", min=1, help="Top-k ids used (<= the store's; default: all)."),
    ] = None,
    tail: Annotated[
        Tail, typer.Option("--tail", help="The teacher's mass outside its top-k.")
    ] = "bucket",
    alpha: Annotated[
        float, typer.Option("--alpha", help="Weight of the KD term (0: hard labels only).")
    ] = 0.5,
    model: ModelOpt = "student",
    corpus: CorpusOpt = None,
    tokenizer: TokenizerOpt = None,
    vocab_size: VocabSizeOpt = None,
    limit: LimitOpt = None,
    steps: StepsOpt = _CFG.steps,
    batch_size: BatchOpt = _CFG.batch_size,
    micro_batch: MicroOpt = None,
    context: ContextOpt = _CFG.context,
    lr: LrOpt = _CFG.lr,
    warmup: WarmupOpt = _CFG.warmup_steps,
    min_lr_ratio: MinLrOpt = _CFG.min_lr_ratio,
    weight_decay: WeightDecayOpt = _CFG.weight_decay,
    grad_clip: ClipOpt = _CFG.grad_clip,
    precision: PrecisionOpt = "auto",
    eval_every: EvalEveryOpt = _CFG.eval_every,
    eval_tokens: EvalTokensOpt = _CFG.eval_tokens,
    checkpoint_every: CheckpointOpt = _CFG.checkpoint_every,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Distill a causal-LM student from a sparse soft-label store, a teacher online, or hard labels.

    Per token the loss is (1 - alpha) CE + alpha T^2 KD: with --store, rbkd.ops.sparse_kd_loss
    on the store's top-k at the student's token positions (--k up to the store's; --tail bucket
    is exact at the store's temperatures); with --teacher, rbkd.ops.kd_loss on the teacher's
    full logits computed each step; with neither and --alpha 0, next-token CE alone. A store of
    another teacher, tokenizer or corpus, another vocabulary or a T off its grid is refused.

    Example:

        rbkd lm distill --store stores/teacher-k32 --T 2 --k 8 --alpha 0.5 --model tiny --steps 20 --context 64 --limit 20000
    """
    from rbkd.cli.threads import start_compute

    from rbkd.lm.train.runs import distill as run

    cfg = _config(steps=steps, batch_size=batch_size, micro_batch=micro_batch, context=context,
                  lr=lr, warmup_steps=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                  grad_clip=grad_clip, precision=precision, seed=seed, device=device,
                  eval_every=eval_every, eval_tokens=eval_tokens,
                  checkpoint_every=checkpoint_every)  # fmt: skip
    start_compute(threads)
    if tokenizer is None and vocab_size is None and teacher is not None:
        from rbkd.lm.train.runs import hf_folder

        candidate = hf_folder(teacher) / "tokenizer.json"
        tokenizer = candidate if candidate.is_file() else None
    train, val, _ = _splits(corpus, tokenizer, vocab_size, limit, progress)
    result = run(train, val, store=store, teacher=teacher, T=T, k=k, tail=tail, alpha=alpha,
                 model=model, cfg=cfg, out=out, progress=progress)  # fmt: skip
    _show(f"{model} language-model student", result, as_json)
