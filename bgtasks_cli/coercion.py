"""Plain conversion of the CLI's options on Typer >= 0.29.

From 0.29 Typer converts every parameter through a pydantic TypeAdapter, built when the
parameter is first processed: importing pydantic and building the adapters costs each command
~100-150 ms, most of what a `notify --no-wait` spends. The CLI's options are plain types (str,
int and float with a range, a directory path, a string enum); for those this hands Typer a
converter that does what click's types did for Typer < 0.29, with their messages; a list of
strings (`retry TASK_ID...`) is kept as strings. Any other parameter, and any Typer without
that hook (< 0.29, which converts with click's types), is left as it is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperCommand

_NUMBER_NAMES = {int: "integer", float: "float"}


class PlainCommand(TyperCommand):
    """A Typer command whose plain options are converted without pydantic."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        convert_plainly(self.get_params(ctx))
        return super().parse_args(ctx, args)


def convert_plainly(params: Sequence[Any]) -> None:
    """Give each plain parameter of a command or group the plain converter, just before
    its arguments are parsed: Typer adds its completion options to a group after making it,
    and the help option when it is first asked for."""
    for param in params:
        if getattr(param, "_runtime_param", None) is None:
            plain = plain_conversion(param)
            if plain is not None:
                param._runtime_param = plain


class _Plain:
    """What Typer asks of a parameter's converter: `coerce(value, param, ctx)`."""

    def __init__(self, convert: Callable[[Any], Any], *, many: bool = False) -> None:
        self._convert = convert
        self._many = many

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None:
            return () if self._many else None
        try:
            return self._convert(value)
        except typer.BadParameter as exc:
            exc.ctx, exc.param = ctx, param
            raise
        except NotText as exc:
            from bgtasks_cli.errors import InvalidInput

            option = getattr(param, "param_type_name", "") == "option" and param.opts
            name = option[0] if option else (param.metavar or param.name.upper())
            raise InvalidInput(f"{name} {exc}", NOT_TEXT_HINT) from None


def plain_conversion(param: Any) -> _Plain | None:
    """A converter for `param` if it is a plain single-valued option Typer would otherwise
    convert through pydantic; None to leave it to Typer."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or not hasattr(param, "get_runtime_param"):
        return None  # Typer < 0.29: click's types convert it, at no extra cost
    info, annotation = descriptor.parameter_info, descriptor.annotation
    if info.parser is not None or info.clamp:
        return None
    if param.nargs == -1 or param.multiple:
        if get_origin(annotation) is list and get_args(annotation) == (str,):
            return _Plain(lambda values: [_text(value) for value in values], many=True)
        return None
    if param.nargs != 1:
        return None
    if annotation is bool and getattr(param, "is_flag", False):
        return _Plain(bool)  # a flag's value is True, False or (for Typer's own) None
    if annotation is str:
        return _Plain(_text)
    if annotation in _NUMBER_NAMES:
        return _Plain(_number(annotation, info.min, info.max))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if all(isinstance(member.value, str) for member in annotation):
            return _Plain(_choice(annotation, case_sensitive=info.case_sensitive))
        return None
    if annotation is Path and not (
        info.writable or info.resolve_path or info.allow_dash or info.path_type is not None
    ):
        return _Plain(
            _path(
                exists=info.exists,
                file_okay=info.file_okay,
                dir_okay=info.dir_okay,
                readable=info.readable,
            )
        )
    return None


class NotText(ValueError):
    """A value that holds bytes no text encoding takes."""


NOT_TEXT_HINT = (
    "the shell passed bytes in another encoding: give the value as UTF-8"
    " (a UTF-8 locale, e.g. LANG=C.UTF-8, makes the terminal send it)"
)


def _text(value: Any) -> str:
    """`value` as text that can be sent. Bytes of the command line (or of a variable) that
    are not UTF-8 reach Python as lone surrogates, which no encoder takes: refused here, in
    one place, rather than failing wherever the text is first encoded (a URL, a header)."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Shown as the bytes it was given: printing the surrogates would fail in turn.
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise NotText(f"'{shown}' is not UTF-8 text") from None
    return text


def _number(kind: type, low: float | None, high: float | None) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{value!r} is not a valid {_NUMBER_NAMES[kind]}.") from None
        # `not (low <= number)` rather than `number < low`: NaN then fails the range too.
        if (low is not None and not low <= number) or (high is not None and not number <= high):
            raise typer.BadParameter(f"{number} is not in the range {_describe(low, high)}.")
        return number

    return convert


def _describe(low: float | None, high: float | None) -> str:
    if low is None:
        return f"x<={high}"
    if high is None:
        return f"x>={low}"
    return f"{low}<=x<={high}"


def _choice(enum: type[Enum], *, case_sensitive: bool) -> Callable[[Any], Any]:
    def fold(text: str) -> str:
        return text if case_sensitive else text.casefold()

    def convert(value: Any) -> Any:
        if isinstance(value, enum):
            return value
        for member in enum:
            if fold(member.value) == fold(str(value)):
                return member
        choices = ", ".join(repr(member.value) for member in enum)
        raise typer.BadParameter(f"{value!r} is not one of {choices}.")

    return convert


def _path(*, exists: bool, file_okay: bool, dir_okay: bool, readable: bool) -> Callable[[Any], Any]:
    label = "File" if not dir_okay else "Directory" if not file_okay else "Path"

    def convert(value: Any) -> Any:
        path = Path(value)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            if exists:
                raise typer.BadParameter(f"{label} {str(path)!r} does not exist.") from None
            return path
        if not file_okay and stat.S_ISREG(mode):
            raise typer.BadParameter(f"{label} {str(path)!r} is a file.")
        if not dir_okay and stat.S_ISDIR(mode):
            raise typer.BadParameter(f"{label} {str(path)!r} is a directory.")
        if readable and not os.access(path, os.R_OK):
            raise typer.BadParameter(f"{label} {str(path)!r} is not readable.")
        return path

    return convert
