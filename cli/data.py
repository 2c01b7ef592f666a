"""`rbkd data ...`: see which datasets are on this machine and fetch the missing ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rbkd.cli.consoles import console
from rbkd.cli.errors import handle_errors
from rbkd.cli.options import Dataset
from rbkd.cli.output import JsonOpt, print_json, print_table
from rbkd.cli.text import escape
from rbkd.cli.typer_app import new_app
from rich.table import Table

from rbkd.data.download import fetch
from rbkd.data.locate import locate_dataset, resolve_file, search_roots
from rbkd.data.registry import DATASETS, get_info

app = new_app(help="Find, list and fetch the datasets (fashion-mnist, mnist, cifar10).")

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Look only in this folder (default: $RBKD_DATA, the cache, /usr/share/datasets).",
        file_okay=False,
    ),
]


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


@app.command("list")
@handle_errors
def list_datasets(data_dir: DataDirOption = None, as_json: JsonOpt = False) -> None:
    """Show each dataset, where it was found (or "not found") and its size.

    Folders are searched in this order: $RBKD_DATA, the cache folder ($XDG_CACHE_HOME/rbkd or
    ~/.cache/rbkd), then /usr/share/datasets; with --data-dir, only that folder. The language
    models' text corpus (pydocs, Debian's python3.11-doc) is listed below them.

    Example: rbkd data list --data-dir ./data
    """
    rows = []
    table = Table(title="Datasets")
    table.add_column("dataset")
    table.add_column("classes", justify="right")
    table.add_column("image (C, H, W)")
    table.add_column("train / test", justify="right")
    table.add_column("location")
    table.add_column("on disk", justify="right")
    for name, info in DATASETS.items():
        folder = locate_dataset(name, data_dir)
        n_bytes = None
        if folder is None:
            location, size = "[red]not found[/red]", "-"
        else:
            files = [resolve_file(folder, filename) for filename in info.files]
            location = escape(folder)
            n_bytes = sum(path.stat().st_size for path in files if path is not None)
            size = _megabytes(n_bytes)
        rows.append(
            {
                "dataset": name,
                "classes": info.num_classes,
                "image_shape": list(info.image_shape),
                "split_sizes": dict(info.split_sizes),
                "location": None if folder is None else str(folder),
                "bytes": n_bytes,
            }
        )
        table.add_row(
            name,
            str(info.num_classes),
            "x".join(map(str, info.image_shape)),
            f"{info.split_sizes['train']:,} / {info.split_sizes['test']:,}",
            location,
            size,
        )
    roots = [str(root) for root in search_roots(data_dir)]
    corpus, corpus_table = _corpus_row()
    if as_json:
        print_json({"datasets": rows, "searched": roots, "corpora": [corpus]})
        return
    print_table(table)
    console.print(f"searched: {escape(', '.join(roots))}", soft_wrap=True)
    print_table(corpus_table)


def _corpus_row() -> tuple[dict, Table]:
    """The language-model corpus (rbkd.lm.corpus: pydocs), where it was found and its split."""
    from rbkd.lm.corpus import CORPUS_NAME, DEBIAN_PACKAGE, corpus_folders, load_corpus

    table = Table(title="Text corpus (rbkd lm)")
    for name, justify in (("corpus", "left"), ("files train / validation", "right"),
                          ("location", "left"), ("on disk", "right")):  # fmt: skip
        table.add_column(name, justify=justify)
    row = {"corpus": CORPUS_NAME, "location": None, "bytes": None, "split_files": None,
           "searched": [str(f) for f in corpus_folders()]}  # fmt: skip
    try:
        found = load_corpus()
    except (OSError, ValueError):
        hint = f"[red]not found[/red] (apt-get install {DEBIAN_PACKAGE}, or --corpus DIR)"
        table.add_row(CORPUS_NAME, "-", hint, "-")
        return row, table
    files = {split: len(names) for split, names in found.splits.items()}
    row.update(location=str(found.root), bytes=found.num_bytes, split_files=files,
               sha256=found.sha256)  # fmt: skip
    table.add_row(CORPUS_NAME, f"{files['train']} / {files['validation']}", escape(found.root),
                  _megabytes(found.num_bytes))  # fmt: skip
    return row, table


@app.command("fetch")
@handle_errors
def fetch_dataset(
    name: Annotated[Dataset, typer.Argument(help="The dataset to download.")],
    dest: Annotated[
        Path | None,
        typer.Option(
            "--dest",
            help="Folder to write into (default: the cache folder, e.g. ~/.cache/rbkd/NAME).",
            file_okay=False,
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", help="Download from this mirror instead of the public ones."),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = True,
) -> None:
    """Download a dataset, verify its SHA-256 and store it (atomically: no partial files).

    Files already there with the right checksum are kept. CIFAR-10's binary archive is unpacked
    into cifar-10-batches-bin/, refusing members that would land outside it. A fetch that fails
    leaves nothing behind.

    Example: rbkd data fetch mnist --dest ./data/mnist
    """
    info = get_info(name)
    folder = fetch(info.name, dest, base_url=base_url, progress=progress)
    console.print(f"{info.title} is in {escape(folder)}", soft_wrap=True)
