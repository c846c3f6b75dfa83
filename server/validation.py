"""Input rules for the seed endpoints: one request can never forge a second line in a file, and
nothing a client sends is silently changed on its way to the line.

Two layers: `decode_component` and `query_errors` read the raw URL (percent-escapes, UTF-8,
repeated parameters) before FastAPI sees it; `Text` and `Email` check the decoded values.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

import email_validator
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

MAX_TEXT = 500

# C0, DEL, C1 and the Unicode line/paragraph separators: anything a reader may take as a line end.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same rule for the OpenAPI schema, so clients and fuzzers know it before they send.
NO_CONTROL_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f\u2028\u2029]*$"
# A `%` that does not begin a two-digit escape: urllib would keep it as a literal `%`.
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class UndecodableError(ValueError):
    """A URL component that is not text: a malformed percent-escape or bytes that are not
    UTF-8. `type` is the error type of the 422."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_


def decode_component(raw: bytes, *, form: bool = False) -> str:
    """Percent-decode one path segment, or with `form` one query name or value (where `+` is a
    space), strictly: every `%` begins a two-digit escape and the bytes are UTF-8. Starlette
    instead keeps a stray `%` and turns undecodable bytes into U+FFFD. Raises
    UndecodableError naming the rule."""
    if form:
        raw = raw.replace(b"+", b" ")
    if b"%" not in raw and raw.isascii():
        return raw.decode("ascii")  # nothing to decode: the common case, kept cheap
    stray = _BAD_ESCAPE.search(raw)
    if stray:
        raise UndecodableError(
            "percent_escape",
            f"must be percent-encoded: the '%' at position {stray.start()} does not begin an "
            "escape such as %2F (a literal '%' is %25)",
        )
    data = unquote_to_bytes(raw)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        found = "".join(f"%{byte:02X}" for byte in data[exc.start : exc.end])
        raise UndecodableError(
            "string_unicode", f"must be valid UTF-8 ({found} at byte {exc.start} is not)"
        ) from None


def error(loc: tuple[str, str], type_: str, message: str, sent: Any) -> dict[str, Any]:
    """One entry of a 422's `detail`, in FastAPI's shape."""
    return {"type": type_, "loc": loc, "msg": message, "input": sent}


def _as_sent(raw: bytes) -> str:
    return raw.decode("latin-1")  # the escapes as they came, never a decoding error


def query_errors(query: bytes, names: Collection[str]) -> list[dict[str, Any]]:
    """What Starlette's query parsing would silently change in the parameters `names`: a value
    that does not decode (`decode_component`), or a parameter given more than once (Starlette
    keeps the last). Other parameters are ignored, as the endpoints ignore them."""
    if not query:
        return []
    given: dict[str, list[bytes]] = {}
    errors: list[dict[str, Any]] = []
    for pair in query.split(b"&"):
        raw_name, _, raw_value = pair.partition(b"=")
        try:
            name = decode_component(raw_name, form=True)
        except UndecodableError:
            continue  # not a name the endpoint knows
        if name not in names:
            continue
        given.setdefault(name, []).append(raw_value)
        try:
            decode_component(raw_value, form=True)
        except UndecodableError as exc:
            errors.append(error(("query", name), exc.type, str(exc), _as_sent(raw_value)))
    for name, values in given.items():
        if len(values) > 1:
            message = f"must be given at most once (it was given {len(values)} times)"
            sent = [_as_sent(value) for value in values]
            errors.append(error(("query", name), "query_repeated", message, sent))
    return errors


def reject_control_chars(value: str) -> str:
    """Raise ValueError naming the first control character in `value`."""
    found = _CONTROL.search(value)
    if found:
        raise ValueError(
            f"must not contain control characters (found U+{ord(found.group()):04X} "
            f"at position {found.start()})"
        )
    return value


def check_email(value: str) -> str:
    """Validate with email-validator's rules and keep the address exactly as the client sent it.

    email-validator itself, not pydantic's wrapper around it: the wrapper strips surrounding
    spaces and accepts `Name <address>`, and the line would then hold what was not validated.
    """
    reject_control_chars(value)
    if value != value.strip():
        reason = "it must not begin or end with whitespace"
    else:
        try:
            email_validator.validate_email(value, check_deliverability=False)
            return value
        except email_validator.EmailNotValidError as exc:
            reason = str(exc)
    raise PydanticCustomError(
        "value_error", "value is not a valid email address: {reason}", {"reason": reason}
    )


Text = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT, json_schema_extra={"pattern": NO_CONTROL_PATTERN}),
    AfterValidator(reject_control_chars),
]
Email = Annotated[str, Field(json_schema_extra={"format": "email"}), AfterValidator(check_email)]
