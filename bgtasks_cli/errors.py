"""The CLI's one exception family. Each kind carries its exit code; the app's error boundary
(`cli.BgtasksGroup`) prints it as one red line (plus a hint) on stderr, never a traceback.

    BgtasksError            exit 1  a request or task failed, or did not finish in time
    ├── Refused             exit 1  the server said no (a 4xx other than 422), with its reason
    ├── InvalidInput        exit 2  the server refused the input (422), or a bad option
    ├── ServerUnreachable   exit 3  nothing answers at the URL
    │   └── WrongServer     exit 3  something answers there, but not like a bgtasks server
    └── ServeError          exit 4  `serve` could not start (port taken, data dir or registry
                                    unusable)
"""

from __future__ import annotations

from typing import IO, Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SERVE = 4


class BgtasksError(Exception):
    """An expected failure: shown as one red line and a hint, with a distinct exit code.

    Not a click exception: Typer vendors its own click, so it would not catch one from the
    `click` package; and its handler would draw a boxed panel, not one line."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def show(self, file: IO[Any] | None = None) -> None:
        from rich.console import Console
        from rich.text import Text

        console = Console(file=file, stderr=file is None, highlight=False, soft_wrap=True)
        # Text, not markup: messages hold paths and server text that may contain brackets.
        console.print(Text.assemble(("Error:", "bold red"), " ", self.message), emoji=False)
        if self.hint:
            console.print(Text(f"hint: {self.hint}", style="dim"), emoji=False)


class Refused(BgtasksError):
    """The server refused the request (403, 404, 409, ...): `status` is its code and `reason`
    the server's own words, for a command that goes on with its other items."""

    def __init__(self, message: str, hint: str | None = None, *, status: int, reason: str) -> None:
        super().__init__(message, hint)
        self.status = status
        self.reason = reason


class InvalidInput(BgtasksError):
    exit_code = EXIT_USAGE


class ServerUnreachable(BgtasksError):
    exit_code = EXIT_UNREACHABLE


class WrongServer(ServerUnreachable):
    pass


class ServeError(BgtasksError):
    exit_code = EXIT_SERVE
