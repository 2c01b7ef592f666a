"""The two consoles every command prints on: `console` (stdout) holds a command's result,
`err_console` (stderr) everything else: progress, the per-epoch lines, warnings and errors."""

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
