"""Plain text for error details: what a library printed for a terminal is not what a JSON
client should get.

`plain_text` removes ANSI escape sequences (torch bolds parts of its messages with `ESC[1m`),
other control characters (a detail is one JSON string: newlines and tabs are kept) and trailing
blanks. The inspector (`worker.inspect`) applies it to every detail it replies with, and the API
(`api.inspect_client`) again to every detail it receives, whichever inspector module ran."""
from __future__ import annotations

import re

# CSI (ESC [ ... final byte, or the 8-bit CSI), OSC (ESC ] ... BEL or ESC \), a character set
# designation (ESC ( B), the other two-byte escapes (ESC @.._) and a lone ESC
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
                   r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[()*+][0-~]|\x1b[@-_]?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain_text(text: str) -> str:
    """`text` without ANSI escape sequences or control characters (newlines and tabs stay)."""
    text = _CONTROL.sub("", _ANSI.sub("", text))
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()
