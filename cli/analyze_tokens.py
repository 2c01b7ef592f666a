"""`rbkd analyze entropy --soft-labels STORE`: token soft-label entropy of a sparse soft-label
store (issue 16 item 6), the branch cli/analyze.py's entropy command takes when a path is a store
folder (it holds index.json). The numbers come from rbkd.analysis.token_entropy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rbkd.cli.consoles import console, err_console
from rbkd.cli.output import check_plot, print_json, print_table, titled_table
from rbkd.cli.text import escape
from rbkd.cli.threads import start_compute
from rbkd.cli.usage import usage_errors


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@contextlib.contextmanager
def _progress(total: int, name: str) -> Iterator:
    """A tokens/s bar on stderr, on a terminal only (a bar redrawn into a log file is noise)."""
    if not err_console.is_terminal:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.speed:,.0f} tokens/s" ), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(escape(name), total=total)
        yield lambda n: bar.update(task, advance=n)


def store_entropy(
    paths: list[Path],
    *,
    temperatures: str | None,
    limit: int | None,
    plot: Path | None,
    json_out: Path | None,
    csv_out: Path | None,
    threads: int | None,
) -> None:
    """Analyse each store of `paths`, print the tables, write the JSON, CSV and figure."""
    from rbkd.analysis.entropy import parse_temperatures
    from rbkd.analysis.files import write_csv, write_json
    from rbkd.analysis.token_entropy import CSV_HEADER, csv_rows, is_store, token_entropy
    from rbkd.lm.store import SparseStore

    dense = [p for p in paths if not is_store(p)]
    if dense:
        raise ValueError(
            f"{dense[0]} is a dense soft-label file and the others sparse soft-label stores: give "
            "stores or dense files, not both"
        )
    with usage_errors():
        temps = None if temperatures is None else parse_temperatures(temperatures)
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
    check_plot(plot)
    start_compute(threads)
    to_stdout = json_out is not None and str(json_out) == "-"
    shown = err_console if to_stdout else console
    results: dict[str, dict] = {}
    for path in paths:
        store = SparseStore(path)
        name = str(path)
        while name in results:
            name += "'"
        total = store.spec.num_tokens if limit is None else min(limit, store.spec.num_tokens)
        with _progress(total, Path(path).name) as advance:
            results[name] = token_entropy(store, temperatures=temps, limit=limit, advance=advance)
    _print_tables(results, shown)
    if to_stdout:
        print_json({"unit": "nats", "stores": results})
    elif json_out is not None:
        write_json(json_out, {"unit": "nats", "stores": results})
        shown.print(f"wrote {escape(json_out)}", soft_wrap=True)
    if csv_out is not None:
        write_csv(csv_out, CSV_HEADER, (row for n, r in results.items() for row in csv_rows(n, r)))
        shown.print(f"wrote {escape(csv_out)}", soft_wrap=True)
    if plot is not None:
        from rbkd.analysis.token_entropy_plots import plot_token_entropy

        legend = {n: Path(n.rstrip("'")).name for n in results}
        if len(set(legend.values())) < len(legend):  # two stores of one name: their paths
            legend = {}
        plot_token_entropy(plot, results, labels=legend)
        shown.print(f"wrote {escape(plot)}", soft_wrap=True)


def _by_T(title: str, first: str, rows: list[tuple[str, list]], temps: list[float]):
    table = titled_table(title)
    table.add_column(first, justify="right")
    for t in temps:
        table.add_column(f"T={t:g}", justify="right")
    for label, values in rows:
        table.add_row(label, *[_num(v) for v in values])
    return table


def _print_tables(results: dict[str, dict], shown) -> None:
    for name, res in results.items():
        temps = res["temperatures"]
        where = escape(name)
        print_table(_by_T(f"mean token entropy (nats) vs T: {where}", "",
                          [("all positions", res["mean_entropy"])], temps), shown)  # fmt: skip
        for key, title, bound in (
            ("by_input_frequency", "by frequency rank of the input token", "ranks"),
            ("by_next_frequency", "by frequency rank of the next token", "ranks"),
            ("by_position", "by position in the document", "offsets"),
        ):
            rows = []
            for b in res[key]["buckets"]:
                lo, hi = b[bound]
                label = f"{lo}" if lo == hi else f"{lo}-{hi}"
                rows.append((f"{label} ({b['positions']:,} positions)", b["mean_entropy"]))
            print_table(_by_T(f"mean entropy {title}: {where}", bound[:-1], rows, temps), shown)
        ks = [k for k in res["topk_mass"]["k"] if k & (k - 1) == 0 or k == res["k"]]
        mass = res["topk_mass"]["mean_mass"]
        rows = [(str(k), [None if m is None else m[k - 1] for m in mass]) for k in ks]
        print_table(_by_T(f"teacher's mean top-k mass vs k: {where}", "k", rows, temps), shown)
        shown.print(
            f"{res['finite_positions']:,} of {res['positions']:,} positions "
            f"({res['nonfinite_positions']:,} non-finite); maximum entropy ln V = "
            f"{res['max_entropy']:.4f} nats (V = {res['vocab_size']:,}, from "
            f"{res['vocab_size_from']})",
            soft_wrap=True,
        )
