"""Text for a person at a terminal: colour only where it can be seen, and
never a control character that some other party put in a name or comment.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, TextIO

STYLES = {
    "add": "32",          # green
    "remove": "31",       # red
    "drift": "1;33",      # bold yellow
    "header": "1",        # bold
    "dim": "2",
    "ok": "32",
    "bad": "1;31",
}


def wants_color(stream: TextIO, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Colour for a terminal only: a pipe or file gets plain text, and
    NO_COLOR (any non-empty value, see no-color.org) or TERM=dumb turn it off."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:        # a closed stream
        return False


def paint(text: str, style: str, enabled: bool) -> str:
    if not enabled or not text:
        return text
    return f"\x1b[{STYLES[style]}m{text}\x1b[0m"


def printable(text: str) -> str:
    """`text` with every non-printable character escaped, so that a comment
    or name read from the kernel or the API cannot move the cursor or hide
    a line."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif ord(c) <= 0xFF:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)
