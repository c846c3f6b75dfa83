"""Input types for the seed endpoints: one request can never forge a second line in a file."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic.networks import validate_email

MAX_TEXT = 500

# C0, DEL, C1 and the Unicode line/paragraph separators: anything a reader may take as a line end.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same rule for the OpenAPI schema, so clients and fuzzers know it before they send.
NO_CONTROL_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f\u2028\u2029]*$"


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
    """Validate with pydantic's email rules but keep the address exactly as the client sent it."""
    reject_control_chars(value)
    validate_email(value)
    return value


Text = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT, json_schema_extra={"pattern": NO_CONTROL_PATTERN}),
    AfterValidator(reject_control_chars),
]
Email = Annotated[str, Field(json_schema_extra={"format": "email"}), AfterValidator(check_email)]
