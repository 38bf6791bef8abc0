"""Printing untrusted text (metric names, tenant ids, URLs, response bodies, error messages).

Text that came from a tenant or a subscriber can carry newlines (a forged line in a command's
output or a log), ANSI escape sequences (which move an operator's cursor or retitle the terminal)
and bidirectional or zero-width controls (which show one string as another). `safe_text` shows
every such character as a Python-style escape (`\\n`, `\\x1b`, `\\u202e`) and a backslash as
`\\\\`, so the escaped form is unambiguous; printable text, including non-ASCII letters, is kept.

It lives in `webhooks`, the package the others depend on, so `billing`, `workers` and `webhooks`
share it: every command line output and log formatter of the project goes through it.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
#: Categories never shown raw: controls, format (bidi, zero-width), surrogates, private use,
#: unassigned, line and paragraph separators, and spaces other than U+0020.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    return char == "\\" or (char != " " and unicodedata.category(char) in _UNSAFE_CATEGORIES)


def safe_text(value: object) -> str:
    """`str(value)` with control, ANSI, bidi and other invisible characters escaped.

    The result is one line: newlines become `\\n`. Plain printable text is returned as it is.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) if _unsafe(c) else c for c in text)


def safe_lines(text: str, indent: str = "") -> str:
    """`safe_text` for multi-line text (a traceback): each line escaped and indented."""
    return "\n".join(indent + safe_text(line) for line in text.split("\n"))


def json_safe(encoded: str) -> str:
    """A JSON document (from `json.dumps(..., ensure_ascii=False)`) with no raw unsafe character.

    `json.dumps` escapes only U+0000-U+001F; this also writes DEL, C1 controls, bidi and
    zero-width marks (everything `safe_text` escapes) as `\\uXXXX`, so a JSON line is safe on a
    terminal and still decodes to exactly the same values. Indentation newlines are kept.
    """
    if encoded.isprintable():
        return encoded
    return "".join(_json_escape(c) if c not in "\\\n" and _unsafe(c) else c for c in encoded)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # outside the BMP: a UTF-16 surrogate pair, as JSON spells it
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
