"""The server URL the CLI is given, checked before any request is sent."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import httpx

from bgtasks_cli.errors import InvalidInput

URL_HINT = "give --url or BGTASKS_URL as http://HOST:PORT, e.g. http://127.0.0.1:8000"
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")


def check_url(url: str) -> httpx.URL:
    """The server URL, parsed; InvalidInput if it could not name an HTTP server."""
    try:
        # urllib's messages are the clearer ("Invalid IPv6 URL" where httpx says "Invalid
        # port"); httpx's parser is the one the requests will use.
        urlsplit(url).port  # noqa: B018
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidInput(f"bad server URL {url!r}: {exc}", URL_HINT) from None
    problem = None
    if parsed.scheme not in ("http", "https"):
        problem = "it must start with http:// or https://"
    elif not parsed.host:
        problem = "it names no host"
    elif not (_HOST.fullmatch(parsed.host) or _is_ipv6(parsed.host)):
        problem = f"{parsed.host!r} is not a host name or address"
    elif parsed.port is not None and not 1 <= parsed.port <= 65535:
        problem = f"port {parsed.port} is not between 1 and 65535"
    elif parsed.query or parsed.fragment:
        problem = "a server URL has no query or fragment"
    if problem:
        raise InvalidInput(f"bad server URL {url!r}: {problem}", URL_HINT)
    return parsed


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True
