"""The `bgtasks` command: the app, its one error boundary and its commands.

Commands live by group in `bgtasks_cli.commands` and only parse options and hand them to the
plain modules (client, launcher, tailer, render, picture, operators, crash_demo, fail_demo);
heavy imports happen inside the command that needs them, so `notify`, `readme`, `tasks`,
`tail`, `timeline`, `retry`, `cancel` and `recover` never load fastapi or uvicorn."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from bgtasks_cli.coercion import PlainCommand, convert_plainly
from bgtasks_cli.commands import firing, inspecting, operating, serving, stats
from bgtasks_cli.errors import EXIT_USAGE, BgtasksError, InvalidInput
from server import __version__

# Typer may vendor its own click: take UsageError from wherever its BadParameter comes from.
_UsageError: type[Exception] = sys.modules[typer.BadParameter.__module__].UsageError


class BgtasksGroup(TyperGroup):
    """The error boundary: an expected failure (`BgtasksError`) or a command's bad option
    becomes one red line, a hint and its exit code, never a traceback."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        convert_plainly(self.get_params(ctx))
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BgtasksError as exc:
            exc.show()
            raise typer.Exit(exc.exit_code) from None
        except _UsageError as exc:
            command = getattr(getattr(exc, "ctx", None), "command_path", None) or "bgtasks"
            message = exc.format_message()  # type: ignore[attr-defined]
            InvalidInput(message, f"see `{command} --help`").show()
            raise typer.Exit(EXIT_USAGE) from None


app = typer.Typer(
    name="bgtasks",
    cls=BgtasksGroup,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bgtasks {__version__}")
        raise typer.Exit()


@app.callback()
def callback(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Drive the bgtasks service and watch FastAPI background tasks run after the response.

    Start with `bgtasks demo`: it starts a server, fires requests and shows the timeline.
    """


for _command in (
    firing.notify,
    firing.readme,
    inspecting.tail,
    inspecting.tasks,
    inspecting.timeline,
    stats.stats,
    operating.retry,
    operating.cancel,
    operating.recover,
    serving.serve,
    serving.demo,
):
    app.command(cls=PlainCommand)(_command)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bgtasks")
