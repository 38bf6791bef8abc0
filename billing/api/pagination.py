"""Opaque keyset cursors: the sort key of the last item served, base64url-encoded JSON."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from billing.api.problems import ProblemError, invalid_field

MAX_CURSOR_LENGTH = 1000


def encode_cursor(*values: Any) -> str:
    """A cursor holding `values` (JSON-serialisable: strings, numbers)."""
    raw = json.dumps(list(values), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, size: int) -> list[Any]:
    """The `size` values in `cursor`.

    Raises:
        ProblemError: 422 naming the `cursor` parameter when it was not made by `encode_cursor`.
    """
    try:
        if len(cursor) > MAX_CURSOR_LENGTH:
            raise ValueError("too long")
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if not isinstance(values, list) or len(values) != size:
            raise ValueError("wrong shape")
        return values
    except (ValueError, UnicodeError, binascii.Error) as error:
        raise invalid_cursor(str(error)) from error


def invalid_cursor(reason: str) -> ProblemError:
    """The 422 problem for a `cursor` parameter this API did not make."""
    return invalid_field("cursor", f"not a cursor this API returned ({reason})", location="query")
