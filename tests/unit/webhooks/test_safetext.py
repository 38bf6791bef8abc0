"""Untrusted text is printed escaped: one line, no control, ANSI, bidi or invisible character."""

from __future__ import annotations

import json
import re
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from webhooks.safetext import json_safe, safe_lines, safe_text

_ESCAPE = re.compile(r"\\(n|r|t|\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")
_NAMED = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: _NAMED.get(m[1]) or chr(int(m[1][1:], 16)), text)


def shown_raw(text: str) -> set[str]:
    """Characters a terminal would act on or hide, left in `text`."""
    return {c for c in text if c not in " \n" and unicodedata.category(c)[0] in "CZ"}


def test_a_forged_line_ansi_and_bidi_controls_are_escaped() -> None:
    metric = "tokens\n2025-01-01 acme ok\x1b[2J\x1b]0;pwned\x07\u202egnp.exe\u200b"
    assert safe_text(metric) == (
        "tokens\\n2025-01-01 acme ok\\x1b[2J\\x1b]0;pwned\\x07\\u202egnp.exe\\u200b"
    )


def test_printable_text_is_returned_as_it_is_including_other_scripts() -> None:
    for text in ("api.calls", "gpt-4:input/tokens", "Zürich 東京 ok", ""):
        assert safe_text(text) == text


def test_a_backslash_is_escaped_so_the_escaped_form_is_unambiguous() -> None:
    assert safe_text("a\\nb") == "a\\\\nb"
    assert safe_text("a\\nb") != safe_text("a\nb")


def test_c1_controls_and_unusual_spaces_are_escaped() -> None:
    assert safe_text("\x9b31m\x7f\u00a0\u2028\U000e0001") == "\\x9b31m\\x7f\\xa0\\u2028\\U000e0001"


def test_non_strings_are_shown_through_str() -> None:
    assert safe_text(ValueError("bad\nline")) == "bad\\nline"


def test_a_traceback_keeps_its_lines_with_each_line_escaped_and_indented() -> None:
    shown = safe_lines("Traceback:\nValueError: a\x1b[31m", indent="  ")
    assert shown == "  Traceback:\n  ValueError: a\\x1b[31m"


@given(st.text())
def test_any_text_becomes_one_printable_line_that_decodes_back(text: str) -> None:
    shown = safe_text(text)
    assert not shown_raw(shown)
    assert "\n" not in shown
    assert unescape(shown) == text


@given(st.recursive(st.none() | st.text() | st.integers(), lambda kids: st.lists(kids)))
def test_json_stays_json_with_the_same_values_and_no_raw_unsafe_character(value) -> None:
    for indent in (None, 2):
        encoded = json_safe(json.dumps({"v": value}, ensure_ascii=False, indent=indent))
        assert json.loads(encoded) == {"v": value}
        assert not shown_raw(encoded)
