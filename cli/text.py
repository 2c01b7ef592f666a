"""Untrusted text made safe for a terminal: one line, control characters shown as escapes, rich
markup escaped. File metadata, paths and exception messages pass through here before printing."""

from __future__ import annotations

import re

from rich.markup import escape as _escape_markup

MAX_ERROR_CHARS = 2000  # a message quoting a hostile file never floods the terminal

# C0 and C1 control characters, DEL, and the Unicode bidi/format controls that can reorder or
# hide text (Trojan Source): none belongs in a one-line message, all can fool a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def one_line(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` with its whitespace runs (newlines included) made single spaces, cut at `limit`."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 20] + " ... (truncated)"


def sanitize(text: object) -> str:
    """`text` with every control character shown as an escape (ESC -> \\x1b, newline -> \\n):
    file metadata and paths are untrusted and must not drive the terminal."""

    def visible(match: re.Match) -> str:
        char = match.group()
        return repr(char)[1:-1] if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _CONTROL.sub(visible, str(text))


def escape(text: object) -> str:
    """Untrusted text made safe to print: control characters escaped (`sanitize`), rich markup
    ([brackets] in paths and messages) escaped."""
    return _escape_markup(sanitize(text))
