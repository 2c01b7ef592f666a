"""Usage errors (exit code 2, one line): an option's value checked before any work, named by its
flag, or by the --config file and key it came from (cli/config_file.py reads the file)."""

from __future__ import annotations

import contextlib
import re

from typer import _click as click
from typer._click.core import ParameterSource
from typer._click.globals import get_current_context

from rbkd.config import OPTION_RULES

CONFIG_FILE_META = "rbkd.config_file"  # ctx.meta: the --config file this command read
# ctx.meta: a function describing this command's invocation (cli/config_file.py sets it while the
# options parse; cli/errors.handle_errors records it for exactly the span of the command's body).
INVOCATION_META = "rbkd.invocation"


def check_command_options(ctx: click.Context | None = None) -> None:
    """Every option of the running command that has a value rule (rbkd.config.OPTION_RULES),
    checked before any work: a usage error (exit code 2) naming the flag. (A --config file's
    values were checked as it was read, naming the file and the key.)"""
    ctx = ctx or get_current_context(silent=True)
    if ctx is None:  # called outside a command (the Python API): nothing to check here
        return
    for param in ctx.command.params:
        value = ctx.params.get(param.name) if param.expose_value else None
        # A text value is a list spec ("1,3,9", "1:20") that its command parses itself; a flag
        # (analyze entropy --per-class) is not the number another command names the same.
        if (
            param.name not in OPTION_RULES
            or value is None
            or isinstance(value, (str, bool, list, tuple))
        ):
            continue
        with usage_errors(ctx):
            OPTION_RULES[param.name](value, param.opts[0])


@contextlib.contextmanager
def usage_errors(ctx: click.Context | None = None):
    """A ValueError raised by a check of the command's options becomes a usage error (one line,
    exit code 2); when the option it names came from the --config file, it names the file."""
    try:
        yield
    except ValueError as e:
        ctx = ctx or get_current_context()
        message = " ".join(str(e).split())
        path = ctx.meta.get(CONFIG_FILE_META)
        if path is not None and _names_option_from_file(ctx, message):
            message = f"--config {path}: {message}; fix it in the file or on the command line"
        raise click.exceptions.UsageError(message, ctx) from None


def _names_option_from_file(ctx: click.Context, message: str) -> bool:
    for param in ctx.command.params:
        if not param.expose_value or not param.opts:
            continue
        if ctx.get_parameter_source(param.name) != ParameterSource.DEFAULT_MAP:
            continue
        if re.search(rf"(?<![\w-]){re.escape(param.opts[0])}(?![\w-])", message):
            return True
    return False
