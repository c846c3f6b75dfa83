"""Property-based tests of the input rules: whatever passes validation writes exactly one line."""

from __future__ import annotations

import re
from collections import Counter
from urllib.parse import quote, quote_from_bytes, quote_plus, unquote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from server import lines
from server.validation import (
    NO_CONTROL_PATTERN,
    Email,
    Text,
    UndecodableError,
    decode_component,
    query_errors,
)

TEXT = TypeAdapter(Text)
EMAIL = TypeAdapter(Email)
LINE_ENDS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # everything str.splitlines splits on


@given(st.text(max_size=600))
@settings(max_examples=500)
def test_accepted_text_makes_exactly_one_line(value: str) -> None:
    try:
        accepted = TEXT.validate_python(value)
    except ValidationError as exc:
        (error,) = exc.errors()
        assert error["msg"]  # every refusal says why
        return
    assert accepted == value  # never silently changed
    assert 1 <= len(value) <= 500
    _, line = lines.found_query(value)
    assert line.count("\n") == 1 and line.endswith("\n")
    assert len(line.splitlines()) == 1
    _, heading = lines.framework_heading(value)
    assert heading.splitlines()[1:] == [f"## {value} 框架精讲"]


@given(st.text(min_size=1, max_size=50), st.sampled_from(LINE_ENDS + "\x00\x7f\x9f"))
def test_any_control_character_is_refused_wherever_it_is(value: str, bad: str) -> None:
    for position in (0, len(value) // 2, len(value)):
        forged = value[:position] + bad + value[position:]
        with pytest.raises(ValidationError, match="control characters"):
            TEXT.validate_python(forged)


@given(st.text(max_size=100))
def test_the_schema_pattern_matches_the_validator(value: str) -> None:
    by_pattern = re.fullmatch(NO_CONTROL_PATTERN, value) is not None
    try:
        TEXT.validate_python(value)
        by_validator = True
    except ValidationError as exc:
        by_validator = "control characters" not in str(exc)
    assert by_pattern == by_validator or not 1 <= len(value) <= 500


@given(st.emails())
@settings(max_examples=300)
def test_accepted_emails_are_kept_verbatim_and_make_one_line(address: str) -> None:
    try:
        accepted = EMAIL.validate_python(address)
    except ValidationError:
        return  # email-validator is stricter than RFC 5322 (reserved domains and so on)
    assert accepted == address
    _, line = lines.message_to(accepted)
    assert len(line.splitlines()) == 1


@given(st.text(max_size=80))
def test_arbitrary_text_as_an_email_never_forges_a_line(value: str) -> None:
    try:
        accepted = EMAIL.validate_python(value)
    except ValidationError:
        return
    assert not any(ch in accepted for ch in LINE_ENDS)


WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()]


@given(st.emails(), st.sampled_from(WHITESPACE), st.booleans())
def test_an_address_with_surrounding_whitespace_is_refused(
    address: str, space: str, before: bool
) -> None:
    padded = space + address if before else address + space
    with pytest.raises(ValidationError) as refused:
        EMAIL.validate_python(padded)
    (error,) = refused.value.errors()
    assert "whitespace" in error["msg"] or "control characters" in error["msg"]


@given(st.text(max_size=60))
def test_any_text_percent_encoded_decodes_back_exactly(value: str) -> None:
    try:
        encoded = quote(value, safe="")
    except UnicodeEncodeError:
        return  # a lone surrogate is not text a client can send
    assert decode_component(encoded.encode()) == value
    assert decode_component(quote_plus(value, safe="").encode(), form=True) == value


@given(st.binary(max_size=40))
def test_encoded_bytes_decode_only_when_they_are_utf8(data: bytes) -> None:
    try:
        expected: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        expected = None
    if expected is not None:
        assert decode_component(quote_from_bytes(data, safe="").encode()) == expected
    else:
        with pytest.raises(UndecodableError, match="must be valid UTF-8"):
            decode_component(quote_from_bytes(data, safe="").encode())


@given(st.text(alphabet="xy%25", max_size=12))  # every escape it can form is ASCII
def test_a_percent_without_two_hex_digits_is_refused(raw: str) -> None:
    stray = re.search(r"%(?![0-9A-Fa-f]{2})", raw)
    if stray is None:
        assert decode_component(raw.encode()) == unquote(raw)
    else:
        with pytest.raises(UndecodableError, match="a literal '%' is %25"):
            decode_component(raw.encode())


@given(st.lists(st.tuples(st.sampled_from(["q", "framework", "x"]), st.text(max_size=5))))
def test_query_errors_name_exactly_the_repeated_known_parameters(
    pairs: list[tuple[str, str]],
) -> None:
    errors = query_errors(urlencode(pairs).encode(), {"q", "framework"})
    counts = Counter(name for name, _ in pairs)
    repeated = {name for name in ("q", "framework") if counts[name] > 1}
    assert {e["loc"][1] for e in errors} == repeated
    assert all(e["type"] == "query_repeated" and e["loc"][0] == "query" for e in errors)
