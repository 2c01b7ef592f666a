"""`rbkd lm tokenize`: the corpus's byte-level BPE and its token splits, made once and reused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import ProgressOpt, ThreadsOpt
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.text import escape

CorpusOpt = Annotated[
    Path | None,
    typer.Option(
        "--corpus",
        metavar="DIR",
        help="A folder of text files (*.txt, *.rst.txt, *.md, *.rst) (default: pydocs, the "
        "Python 3.11 documentation sources of Debian's python3.11-doc).",
        file_okay=False,
    ),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        metavar="FILE",
        help="A tokenizer.json (default: the corpus's byte-level BPE of --vocab-size, trained on "
        "its train split on first use and cached).",
    ),
]
VocabSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--vocab-size", min=257, help="Vocabulary of the default BPE (8192; not with --tokenizer)."
    ),
]


@handle_errors
def tokenize(
    corpus: CorpusOpt = None,
    tokenizer: TokenizerOpt = None,
    vocab_size: VocabSizeOpt = None,
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train (or reuse) the corpus's tokenizer and tokenise its train and validation splits.

    The split is by file (docs/lm-data.md); both splits are written once as memory-mapped token
    shards in the cache, keyed by the corpus's and tokenizer's SHA-256, and reused after.
    Prints the files, tokens and characters per token of each split.

    Example:

        rbkd lm tokenize --vocab-size 8192
    """
    from rbkd.cli.threads import start_compute

    from rbkd.lm.corpus import load_corpus
    from rbkd.lm.tokenizer import DEFAULT_VOCAB_SIZE, tokenizer_for
    from rbkd.lm.tokens import tokenize_split

    if tokenizer is not None and vocab_size is not None:
        raise ValueError("give --tokenizer or --vocab-size (to train one), not both")
    start_compute(threads)
    loaded = load_corpus(corpus)
    started = time.perf_counter()
    tok = tokenizer_for(loaded, vocab_size or DEFAULT_VOCAB_SIZE, tokenizer)
    tok_seconds = time.perf_counter() - started
    rows = {}
    for split in ("train", "validation"):
        tokens = tokenize_split(loaded, tok, split, progress=progress)
        chars = sum(len(text) for _, text in loaded.documents(split))
        rows[split] = {
            "files": len(loaded.splits[split]),
            "bytes": loaded.split_bytes(split),
            "tokens": len(tokens),
            "chars_per_token": chars / max(1, len(tokens) - tokens.num_documents),
            "folder": tokens.folder,
        }
    result = {
        "corpus": loaded.root, "corpus_sha256": loaded.sha256, "tokenizer": tok.path,
        "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
        "tokenizer_seconds": tok_seconds, "splits": rows,
    }  # fmt: skip
    if as_json:
        print_json(result)
        return
    table = titled_table("corpus tokens", show_header=False)
    table.add_row("corpus", f"{escape(loaded.root)} (sha256 {loaded.sha256[:16]})")
    table.add_row("tokenizer", f"{escape(tok.path)} (sha256 {tok.sha256[:16]})")
    table.add_row("vocabulary", f"{tok.vocab_size:,}")
    for split, row in rows.items():
        table.add_row(
            split,
            f"{row['files']} files, {row['bytes']:,} bytes, {row['tokens']:,} tokens, "
            f"{row['chars_per_token']:.2f} characters/token",
        )
    print_table(table)
