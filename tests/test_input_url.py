"""What the URL carries reaches the line exactly, or is refused with a 422 naming the field and
the rule: encoded slashes and other URL-special characters in an address, invalid UTF-8,
surrounding whitespace, malformed escapes and repeated parameters. Every request is sent as
raw bytes to a real server, so no client library normalises it on the way."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.helpers import LiveServer, wait_until

# Characters valid in an address's local part (RFC 5322 atext) that mean something in a URL.
URL_SPECIAL = "/?#%+&=;!$'*~{}|^`"


def post_raw(live: LiveServer, target: str) -> tuple[int, Any]:
    """POST `target` byte for byte (http.client sends it as given), return status and JSON."""
    parts = urlsplit(live.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("POST", target, headers={"Content-Length": "0"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def idle(live: LiveServer) -> bool:
    return bool(httpx.get(f"{live.url}/health").json()["unfinished_tasks"] == 0)


def assert_refused(status: int, body: Any, field: str, rule: str) -> None:
    assert status == 422, body
    errors = body["detail"]
    assert any(e["loc"][-1] == field and rule in e["msg"] for e in errors), errors


def test_an_address_with_an_encoded_slash_is_written_exactly(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    status, body = post_raw(live, "/send-notification/a%2Fb@example.com")
    assert (status, body) == (200, {"message": "Message sent"})
    wait_until(lambda: idle(live))
    assert live.read("log.txt") == b"message to a/b@example.com\n"


def test_every_url_special_character_of_a_local_part_round_trips(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    addresses = [f"a{ch}b@example.com" for ch in URL_SPECIAL if ch != ";"]
    for address in addresses:
        status, body = post_raw(live, f"/send-notification/{quote(address, safe='')}")
        assert status == 200, (address, body)
    # `;` is special in URLs but not valid unquoted in an address: refused, not changed.
    status, body = post_raw(live, f"/send-notification/{quote('a;b@example.com', safe='')}")
    assert_refused(status, body, "email", "valid email address")
    wait_until(lambda: idle(live))
    assert live.read("log.txt") == "".join(f"message to {a}\n" for a in addresses).encode()


@pytest.mark.parametrize(
    "target",
    [
        "/send-notification/a?b@example.com",  # the query starts at `?`: the address is `a`
        "/send-notification/a#b@example.com",  # the fragment starts at `#`
        "/send-notification/a%b@example.com",  # `%b@` is no escape
        "/send-notification/100%@example.com",
    ],
)
def test_a_special_character_left_unencoded_is_refused_not_changed(
    start_server: Callable[..., LiveServer], target: str
) -> None:
    live = start_server()
    status, body = post_raw(live, target)
    assert status == 422, body
    assert [e["loc"] for e in body["detail"]] == [["path", "email"]]
    assert live.read("log.txt") == b""


def test_characters_that_need_no_escape_in_a_path_are_kept(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    for target in ("/send-notification/a+b&c=d@example.com", "/send%2Dnotification/x@example.com"):
        assert post_raw(live, target)[0] == 200
    wait_until(lambda: idle(live))
    assert live.read("log.txt") == b"message to a+b&c=d@example.com\nmessage to x@example.com\n"


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("/send-notification/a%FF@example.com", "email"),
        ("/send-notification/%C3@example.com", "email"),  # a sequence cut short
        ("/send-notification/%ED%A0%80@example.com", "email"),  # an encoded surrogate
        ("/send-notification/a@example.com?q=%FF", "q"),
        ("/send-notification/a@example.com?q=ok%C0%AF", "q"),  # an overlong `/`
        ("/background_tasks?framework=Vue%FF", "framework"),
        ("/dependency/background_tasks?q=%FE", "q"),
    ],
)
def test_invalid_utf8_is_refused_naming_the_field(
    start_server: Callable[..., LiveServer], target: str, field: str
) -> None:
    live = start_server()
    status, body = post_raw(live, target)
    assert_refused(status, body, field, "must be valid UTF-8")
    assert idle(live)
    assert live.read("log.txt") == b"" and live.read("README.md") == b""


def test_a_real_replacement_character_is_valid_text(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    fffd = "%EF%BF%BD"
    assert post_raw(live, f"/send-notification/a{fffd}@example.com?q=x{fffd}")[0] == 200
    assert post_raw(live, f"/background_tasks?framework={fffd}")[0] == 200
    wait_until(lambda: idle(live))
    assert live.read("log.txt") == "found query: x\ufffd\nmessage to a\ufffd@example.com\n".encode()
    assert live.read("README.md") == "\n## \ufffd 框架精讲".encode()


@pytest.mark.parametrize(
    "address",
    [
        "%20a@example.com%20",
        "%20a@example.com",
        "a@example.com%20",
        "a@example.com%09",  # a tab is a control character
        "%C2%A0a@example.com",  # no-break space
        "a@example.com%E3%80%80",  # ideographic space
    ],
)
def test_an_address_with_surrounding_whitespace_is_refused(
    start_server: Callable[..., LiveServer], address: str
) -> None:
    live = start_server()
    status, body = post_raw(live, f"/send-notification/{address}")
    assert status == 422, body
    (error,) = body["detail"]
    assert error["loc"] == ["path", "email"]
    assert "whitespace" in error["msg"] or "control characters" in error["msg"], error
    assert live.read("log.txt") == b""


def test_a_display_name_is_not_an_address(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    status, body = post_raw(live, f"/send-notification/{quote('Eve <a@example.com>', safe='')}")
    assert_refused(status, body, "email", "valid email address")
    assert live.read("log.txt") == b""


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("/send-notification/a@example.com?q=a&q=b", "q"),
        ("/send-notification/a@example.com?q=a&%71=b", "q"),  # the same name, encoded
        ("/send-notification/a@example.com?q=&q=b", "q"),
        ("/background_tasks?framework=Vue&framework=React", "framework"),
        ("/dependency/background_tasks?q=a&q=a", "q"),
    ],
)
def test_a_parameter_given_twice_is_refused(
    start_server: Callable[..., LiveServer], target: str, field: str
) -> None:
    live = start_server()
    status, body = post_raw(live, target)
    assert_refused(status, body, field, "must be given at most once (it was given 2 times)")
    assert live.read("log.txt") == b"" and live.read("README.md") == b""


def test_other_parameters_may_repeat(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    assert post_raw(live, "/send-notification/a@example.com?utm=1&utm=2&q=x")[0] == 200
    wait_until(lambda: idle(live))
    assert live.read("log.txt") == b"found query: x\nmessage to a@example.com\n"


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("/send-notification/a@example.com?q=100%", "q"),
        ("/send-notification/a@example.com?q=%zz", "q"),
        ("/background_tasks?framework=C%2", "framework"),
    ],
)
def test_a_stray_percent_is_refused_not_kept(
    start_server: Callable[..., LiveServer], target: str, field: str
) -> None:
    live = start_server()
    status, body = post_raw(live, target)
    assert_refused(status, body, field, "a literal '%' is %25")
    assert live.read("log.txt") == b"" and live.read("README.md") == b""


def test_plus_is_a_space_in_the_query_and_percent_2b_a_plus(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    assert post_raw(live, "/send-notification/a@example.com?q=1+1%2B1%25")[0] == 200
    wait_until(lambda: idle(live))
    assert live.read("log.txt") == b"found query: 1 1+1%\nmessage to a@example.com\n"


def test_the_cli_notifies_an_address_with_a_slash(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    result = subprocess.run(
        [sys.executable, "-m", "bgtasks_cli", "notify", "a/b@example.com", "--url", live.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert live.read("log.txt") == b"message to a/b@example.com\n"


def test_openapi_documents_the_address_and_its_encoding(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    spec = httpx.get(f"{live.url}/openapi.json").json()
    operation = spec["paths"]["/send-notification/{email}"]["post"]
    (email,) = [p for p in operation["parameters"] if p["in"] == "path"]
    assert email["name"] == "email" and email["required"] is True
    assert email["schema"]["format"] == "email"
    assert "user@example.com" in email["schema"]["examples"]
    assert "%2F" in email["description"]
    (q,) = [p for p in operation["parameters"] if p["in"] == "query"]
    assert "UTF-8" in q["description"] and "at most once" in q["description"]


def test_a_trailing_slash_still_redirects_as_starlette_does(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    parts = urlsplit(live.url)
    for target, location in [
        ("/send-notification/a@example.com/?q=x", "/send-notification/a@example.com?q=x"),
        ("/background_tasks/?framework=Vue", "/background_tasks?framework=Vue"),
    ]:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
        try:
            conn.request("POST", target, headers={"Content-Length": "0"})
            response = conn.getresponse()
            assert response.status == 307
            assert response.getheader("location") == f"{live.url}{location}"
        finally:
            conn.close()
    assert live.read("log.txt") == b"" and live.read("README.md") == b""
