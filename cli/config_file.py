"""`--config FILE`: a command's options read from a TOML or JSON file; flags given on the command
line win. Also where a command's invocation (argv, every resolved option) is recorded for the
config.json of the runs it writes (rbkd.provenance).

The file's keys are the option names without their dashes, with '-' or '_' (`batch-size = 256` or
`batch_size = 256`; `json = true` for --json). A run's own config.json works too: its recorded
options (under their parameter names, `as_json`) are read back. The option is eager and
fills click's `default_map`, so click's own precedence (command line, then the file, then the
defaults) does the rest.
"""

from __future__ import annotations

import enum
import json
import os
import shlex
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from rbkd.cli.typer_app import command_args
from rbkd.cli.usage import CONFIG_FILE_META, INVOCATION_META
from typer import _click as click

from rbkd.config import OPTION_RULES
from rbkd.io import read_bounded
from rbkd.provenance import file_record, recorded_invocation

MAX_CONFIG_BYTES = 1 << 20  # an options file is a few hundred bytes; a run's config.json a few KB
# Levels of tables and lists: an options file has 2 (a table of lists); a run's config.json
# about 7 (provenance, its resumes, their data files). Deeper is refused before it is walked.
MAX_CONFIG_DEPTH = 16
SUFFIXES = (".toml", ".json")


def _fail(path: Path, message: str) -> None:
    raise click.exceptions.UsageError(f"--config {path}: {message}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique (json.loads keeps the last of a repeated key)."""
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"the key {key!r} is given twice")
        table[key] = value
    return table


def nesting_depth(value: Any, limit: int = MAX_CONFIG_DEPTH) -> int:
    """Levels of dicts and lists in `value`, counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def read_options_file(path: Path) -> dict[str, Any]:
    """The table of a TOML or JSON options file."""
    if path.suffix not in SUFFIXES:
        _fail(path, f"unknown format {path.suffix or '(no suffix)'}: name it .toml or .json")
    too_deep = (
        f"nested more than {MAX_CONFIG_DEPTH} levels deep; an options file holds key = value "
        "pairs (a value may be a list): fix the file"
    )
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES, "config file").decode("utf-8")
        if path.suffix == ".toml":
            table = tomllib.loads(text)
        else:
            table = json.loads(text, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        _fail(path, "no such file; give the path of a .toml or .json file of options")
    except RecursionError:  # the parsers recurse per level: a file of 10,000 '['
        _fail(path, too_deep)
    except (OSError, ValueError) as e:  # includes TOML/JSON syntax errors and bad UTF-8
        _fail(path, f"cannot read it ({' '.join(str(e).split())}); fix the file")
    if not isinstance(table, dict):
        _fail(path, "must hold a table of options (key = value), not a list or a value")
    if nesting_depth(table) > MAX_CONFIG_DEPTH:
        _fail(path, too_deep)
    return table


def _recorded_options(path: Path, table: dict, command: str) -> dict[str, Any]:
    """A run's config.json gives the options it ran with (when it was the same command)."""
    invocation = recorded_invocation(table)
    if invocation is None:
        return table
    if invocation.get("command") != command:
        _fail(
            path, f"it records options of `rbkd {invocation.get('command')}`, not `rbkd {command}`"
        )
    return dict(invocation["options"])


def _check_value(path: Path, key: str, annotation: Any, value: Any) -> Any:
    """`value` if it fits the option's type (as click will take it), else a one-line error.
    Stricter than click: 1.5 for an integer option is an error, never a silent 1."""
    if get_origin(annotation) is list:
        (item,) = get_args(annotation) or (str,)
        values = value if isinstance(value, list) else [value]
        return [_check_value(path, key, item, v) for v in values]
    if get_origin(annotation) is Literal:  # a choice: capacity = "small"
        choices = get_args(annotation)
        if value not in choices:
            known = ", ".join(map(str, choices))
            _fail(path, f"{key} must be one of {known}, got {value!r}; fix it in the file")
        return value
    if isinstance(value, list) and annotation is str:  # T = [3, 9] for the option --T 3,9
        return ",".join(str(_check_value(path, key, str, v)) for v in value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and number and isinstance(value, int):
        return value
    if annotation is float and number:
        return float(value)
    if annotation is str and (isinstance(value, str) or number):
        return value if isinstance(value, str) else str(value)
    if annotation is Path and isinstance(value, str):
        return value
    if annotation not in (bool, int, float, str, Path):  # a type this module does not know
        return value
    kind = {bool: "true or false", int: "an integer", float: "a number"}.get(annotation, "a string")
    _fail(path, f"{key} must be {kind}, got {value!r}; fix it in the file")
    return value  # not reached


def _check_rule(path: Path, key: str, name: str, value: Any) -> None:
    """The value rule of rbkd.config (lr > 0, batch_size >= 1, ...) for an option that has one,
    on each number the file gives it (an experiment's `T = "3,9"` list is checked later)."""
    rule = OPTION_RULES.get(name)
    if rule is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            try:
                rule(item, key)
            except ValueError as e:
                _fail(path, f"{e}; fix it in the file")


def _spelling(param: click.Parameter) -> str:
    """A parameter as the user types it: its option (`--json`, whose parameter is as_json; `--T`;
    `--t-squared` of --t-squared/--no-t-squared), or an argument's name."""
    if param.param_type_name == "option" and param.opts:
        return param.opts[0]
    return param.name or ""


def _keys(params: dict[str, click.Parameter]) -> dict[str, str]:
    """{key, '_' written '-': parameter name}: each option's name without its dashes (`json`,
    `batch-size`: what a user writes) and the parameter's own name (`as-json`: what a run's
    config.json records)."""
    by_key = {name.replace("_", "-"): name for name in params}
    by_key.update({_spelling(p).lstrip("-").replace("_", "-"): n for n, p in params.items()})
    return by_key


def options_from_file(ctx: click.Context, path: Path) -> dict[str, Any]:
    """The file's options checked against the command's parameters: {parameter name: value}."""
    params = {p.name: p for p in ctx.command.params if p.expose_value}
    by_key = _keys(params)
    options: dict[str, Any] = {}
    keys: dict[str, str] = {}  # parameter name -> the key that gave it
    table = _recorded_options(path, read_options_file(path), _command(ctx))
    for key, value in table.items():
        name = by_key.get(str(key).replace("_", "-"))
        if name is None:
            known = ", ".join(sorted((_spelling(p) for p in params.values()), key=str.lower))
            _fail(
                path,
                f"unknown key {key!r}: `rbkd {_command(ctx)}` takes {known} (a key is an "
                "option's name without its --)",
            )
        if name in keys:
            _fail(path, f"{keys[name]!r} and {key!r} are the same option; keep one of them")
        keys[name] = str(key)
        if value is None:  # JSON null: the option's default
            continue
        annotation = params[name].type_descriptor.annotation
        options[name] = _check_value(path, str(key), annotation, value)
        _check_rule(path, str(key), name, options[name])
    return options


def _command(ctx: click.Context) -> str:
    """The command as typed after `rbkd`: "train-teacher", "experiment missing-class"."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(names))


def _plain(value: Any) -> Any:
    """An option's value as JSON; paths absolute, so the record works from any folder."""
    if isinstance(value, Path):
        return os.path.abspath(value)
    if isinstance(value, enum.Enum):  # a choice option's member: its spelling on the command line
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe_invocation(ctx: click.Context, config: Path | None) -> dict[str, Any]:
    """What config.json records of the command line (read when a run starts, so every option is
    resolved): the command, argv, the folder it ran in and every option's final value."""
    argv = ["rbkd", *command_args]
    record: dict[str, Any] = {
        "command": _command(ctx),
        "argv": argv,
        "shell": shlex.join(argv),
        "cwd": os.getcwd(),
        "options": {
            p.name: _plain(ctx.params[p.name]) for p in ctx.command.params if p.name in ctx.params
        },
    }
    if config is not None:
        record["config_file"] = file_record(config)
    return record


def _load(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **options_from_file(ctx, Path(value))}
        ctx.meta[CONFIG_FILE_META] = Path(value)
    # Kept on the context, not pushed here: a later option's parse error never closes the context,
    # and a describer pushed now would stay for every run the process writes afterwards.
    ctx.meta[INVOCATION_META] = lambda: describe_invocation(ctx, value)
    return value


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        is_eager=True,
        expose_value=False,
        callback=_load,
        help="Read options from a TOML or JSON file (keys are option names: batch-size = 256); "
        "flags given here win. A run's config.json works too.",
    ),
]
