"""Text from files we did not write (model headers: names, provenance) made safe to show.

A header may hold terminal escape sequences (``ESC [ 2 J`` clears the screen, OSC sequences set the window title
or write to the clipboard) or other control characters; printed raw they act on the user's terminal. ``clean``
removes them; it is applied once, where a model header is parsed, and to every CLI error line.
"""
from __future__ import annotations

import re
from typing import Any

# ANSI CSI / OSC / other ESC sequences, then any remaining C0 / DEL / C1 control character (\n and \t become spaces)
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` without escape sequences and control characters; tabs and newlines become spaces."""
    text = _ESCAPES.sub("", str(text))
    return _CONTROL.sub("", text.replace("\t", " ").replace("\n", " ").replace("\r", " "))


def clean_tree(value: Any) -> Any:
    """``clean`` applied to every string (keys too) of a JSON-like value."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k) if isinstance(k, str) else k: clean_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_tree(v) for v in value]
    return value
