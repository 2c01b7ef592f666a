"""`rbkd lm soft-labels`: a causal LM teacher's sparse soft labels over a corpus split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rbkd.cli.errors import handle_errors
from rbkd.cli.lm_data import CorpusOpt, TokenizerOpt, VocabSizeOpt
from rbkd.cli.options import DeviceOpt, ProgressOpt, SeedOpt, ThreadsOpt
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.text import escape

LMSplit = Literal["train", "validation"]
TopkDtype = Literal["float32", "bfloat16", "float16"]


@handle_errors
def soft_labels(
    teacher: Annotated[
        Path,
        typer.Option(
            "--teacher",
            help="The teacher: a Hugging Face causal-LM folder (config.json, model.safetensors) "
            "or a run folder holding one in model/ (from `rbkd lm train-teacher`).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The store folder to write (or to complete).")],
    split: Annotated[LMSplit, typer.Option("--split", help="Corpus split.")] = "train",
    corpus: CorpusOpt = None,
    tokenizer: TokenizerOpt = None,
    vocab_size: VocabSizeOpt = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Top-k ids kept per token.")] = 32,
    temperatures: Annotated[
        str,
        typer.Option(
            "--T", help="Temperatures whose log-partition and entropy are stored: 1,2,4 or 1:8."
        ),
    ] = "1,2",
    samples: Annotated[
        int,
        typer.Option("--samples", min=0, help="Ids sampled per token from the teacher (0: none)."),
    ] = 0,
    sample_t: Annotated[
        float, typer.Option("--sample-T", help="The temperature the samples are drawn at.")
    ] = 1.0,
    context: Annotated[
        int | None,
        typer.Option("--context", min=1, help="Block length (default: the teacher's positions)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Blocks per forward pass.")
    ] = 8,
    dtype: Annotated[
        TopkDtype,
        typer.Option("--dtype", help="dtype of the stored logits (logz is computed from them)."),
    ] = "float32",
    teacher_dtype: Annotated[
        TopkDtype,
        typer.Option(
            "--teacher-dtype",
            help="dtype the teacher is loaded in (bfloat16 on GPUs; its weights' hash follows).",
        ),
    ] = "float32",
    shard_tokens: Annotated[
        int | None,
        typer.Option(
            "--shard-tokens", min=1, help="Positions per shard, a multiple of the context."
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=2, help="Capture only the split's first N tokens."),
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a causal LM teacher over a corpus split and write its sparse soft labels.

    Per token: the top-k ids and raw logits, and at each --T the full-vocabulary log-partition
    and entropy (optionally --samples ids drawn at --sample-T), into a store of safetensors
    shards (docs/sparse-soft-labels.md). A rerun completes a killed capture, computing only the
    missing shards; a store of another teacher, tokenizer, corpus or settings is refused. Under
    torchrun each rank writes its own shards. The tokenizer is --tokenizer, else the teacher
    folder's tokenizer.json, else the corpus's BPE (docs/lm-data.md).

    Example:

        rbkd lm soft-labels --teacher runs/lm-teacher --out stores/teacher-k32 --k 32 --T 1,2,4 --limit 20000
    """
    import torch
    from rbkd.cli.threads import start_compute
    from rbkd.cli.usage import usage_errors

    from rbkd.analysis.entropy import parse_temperatures
    from rbkd.engine.distributed import setup
    from rbkd.lm.capture import capture, load_teacher, teacher_folder
    from rbkd.lm.store import SparseStore
    from rbkd.lm.tokens import corpus_tokens

    with usage_errors():
        temps = parse_temperatures(temperatures)
    if tokenizer is not None and vocab_size is not None:
        raise ValueError("give --tokenizer or --vocab-size (to train one), not both")
    start_compute(threads)
    folder = teacher_folder(teacher)
    if tokenizer is None and vocab_size is None:
        for candidate in (folder / "tokenizer.json", Path(teacher) / "tokenizer.json"):
            if candidate.is_file():
                tokenizer = candidate
                break
    tokens = corpus_tokens(split, corpus=corpus, tokenizer=tokenizer, vocab_size=vocab_size)
    if limit is not None:
        tokens = tokens.head(limit)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise on a command's stderr
    model = load_teacher(folder, dtype=getattr(torch, teacher_dtype))
    ctx = setup(device)
    try:
        result = capture(
            model, tokens, out, k=k, temperatures=temps, samples=samples, sample_T=sample_t,
            context=context, batch_size=batch_size, topk_dtype=dtype, shard_tokens=shard_tokens,
            seed=seed, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
            progress=progress,
        )  # fmt: skip
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the written shards stay
        raise typer.Exit(_stopped(exc, out)) from None
    finally:
        ctx.close()  # on success, every rank's shards are written when rank 0 goes on
    if ctx.rank != 0:
        return
    store = SparseStore(out)
    stored = sum(e["bytes"] for e in store.entries.values())
    spec = store.spec
    summary = {
        "store": out, "teacher": folder, "teacher_sha256": spec.teacher_sha256,
        "tokenizer_sha256": spec.tokenizer_sha256, "corpus_sha256": tokens.corpus_sha256,
        "split": split, "tokens": spec.num_tokens, "context": result.context, "k": spec.k,
        "temperatures": list(spec.temperatures), "samples": spec.samples,
        "shards": spec.num_shards, "shards_written_by_rank0": len(result.written),
        "complete": store.complete,
        "bytes_per_token": stored / max(1, spec.num_tokens),
        "capture_tokens_per_s": result.tokens_per_s, "seconds": result.seconds,
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    if as_json:
        print_json(summary)
        return
    table = titled_table("sparse soft labels", show_header=False)
    table.add_row("store", escape(out))
    table.add_row("teacher", f"{escape(folder)} (weights sha256 {spec.teacher_sha256[:16]})")
    table.add_row("tokens", f"{spec.num_tokens:,} of the {split} split, context {result.context}")
    table.add_row("kept", f"top {spec.k}, T = {', '.join(f'{t:g}' for t in spec.temperatures)}")
    table.add_row("shards", f"{spec.num_shards} ({len(result.written)} written now by rank 0)")
    table.add_row("bytes per token", f"{stored / max(1, spec.num_tokens):,.1f}")
    table.add_row("capture", f"{result.tokens_per_s:,.0f} tokens/s on rank 0")
    print_table(table)


def _stopped(exc: KeyboardInterrupt, out: Path) -> int:
    """One line after Ctrl-C or SIGTERM: how many shards are kept, and that the same command
    completes the store. Returns the exit code (130 or 143, as a shell reports the signals)."""
    from rbkd.cli.consoles import err_console
    from rbkd.cli.interrupts import Terminated

    from rbkd.lm.store import SparseStore, StoreError

    name, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
    try:
        store = SparseStore(out)
        kept = f"{len(store.entries)} of {store.spec.num_shards} shards are in {out}"
    except StoreError:
        kept = f"no shard was written to {out}"
    line = f"interrupted ({name}): {kept}; run the same command again to complete it"
    err_console.print(f"[bold yellow]Stopped:[/] {escape(line)}", soft_wrap=True, markup=True)
    return code
