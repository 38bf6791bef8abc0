"""Opaque keyset cursors: the sort key of the last item served, base64url-encoded JSON.

A cursor comes back from the client, so it is untrusted input: anything this API did not make
(bad base64 or JSON, the wrong shape, a naive or out-of-range time, text that is not valid
UTF-8 such as a lone surrogate) is a 422 naming the `cursor` parameter, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, literal, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from billing.api.problems import ProblemError, invalid_field
from webhooks.sqltypes import UTCDateTime

Row = TypeVar("Row")

MAX_CURSOR_LENGTH = 1000
MAX_CURSOR_TEXT = 255


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
    except (ValueError, UnicodeError, binascii.Error, RecursionError) as error:
        raise invalid_cursor(str(error)) from error


def decode_text(value: Any) -> str:
    """A text member of a cursor: a string a database can compare (valid UTF-8, bounded).

    Raises:
        ProblemError: 422 naming the `cursor` parameter.
    """
    if not isinstance(value, str) or len(value) > MAX_CURSOR_TEXT:
        raise invalid_cursor("malformed position")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise invalid_cursor("malformed position") from error
    if "\x00" in value:
        raise invalid_cursor("malformed position")
    return value


def decode_time_and_text(cursor: str) -> tuple[datetime, str]:
    """The (aware UTC time, text) position of a cursor made by `encode_cursor(iso, text)`.

    Raises:
        ProblemError: 422 naming the `cursor` parameter.
    """
    moment, text = decode_cursor(cursor, 2)
    if not isinstance(moment, str):
        raise invalid_cursor("malformed position")
    try:
        parsed = datetime.fromisoformat(moment)
        if parsed.tzinfo is None:
            raise ValueError("naive time")
        return parsed.astimezone(UTC), decode_text(text)
    except (ValueError, OverflowError) as error:
        raise invalid_cursor(str(error)) from error


def keyset_page(
    session: Session,
    query: Select[Row],
    order: tuple[InstrumentedAttribute[datetime], InstrumentedAttribute[str]],
    limit: int,
    cursor: str | None,
) -> tuple[list[Row], str | None]:
    """Up to `limit` rows of `query` after `cursor`, ordered by the (time, text) columns of
    `order`, and the cursor of the next page (None on the last)."""
    time_column, text_column = order
    if cursor is not None:
        moment, text = decode_time_and_text(cursor)
        query = query.where(
            tuple_(time_column, text_column) > tuple_(literal(moment, UTCDateTime()), text)
        )
    ordered = query.order_by(time_column, text_column).limit(limit + 1)
    rows = list(session.execute(ordered).scalars())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    position = (getattr(last, time_column.key).isoformat(), getattr(last, text_column.key))
    return rows[:limit], encode_cursor(*position)


def invalid_cursor(reason: str) -> ProblemError:
    """The 422 problem for a `cursor` parameter this API did not make."""
    return invalid_field("cursor", f"not a cursor this API returned ({reason})", location="query")
