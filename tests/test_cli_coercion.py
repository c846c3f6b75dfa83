"""The plain converters handed to Typer >= 0.29 (bgtasks_cli/coercion.py): every option of
every command gets one, so none falls back to pydantic, and they convert and refuse as
click's types did for Typer < 0.29."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.main import get_group

from bgtasks_cli.cli import app
from bgtasks_cli.coercion import plain_conversion
from bgtasks_cli.options import FileChoice
from server.status import TaskStatus

HAS_HOOK = hasattr(typer.core, "_TyperParameter")  # Typer >= 0.29 converts through pydantic


def test_every_option_gets_a_plain_converter() -> None:
    for name, command in get_group(app).commands.items():
        for param in command.params:
            plain = plain_conversion(param)
            if HAS_HOOK:
                assert plain is not None, (name, param.name)
            else:
                assert plain is None  # click's types convert it: nothing to hand over


@pytest.mark.skipif(not HAS_HOOK, reason="Typer < 0.29 converts with click's types")
def test_conversions_match_clicks() -> None:
    def convert(command: str, name: str, value: str | None) -> object:
        # click's Parameter as Typer ships it (vendored from 0.29 on): left for mypy to infer.
        params = {p.name: p for p in get_group(app).commands[command].params}
        plain = plain_conversion(params[name])
        assert plain is not None
        return plain.coerce(value, param=None, ctx=None)

    assert convert("notify", "timeout", "2.5") == 2.5
    assert convert("notify", "timeout", None) is None
    assert convert("tail", "lines", "7") == 7
    assert convert("tail", "file", "log") is FileChoice.log
    assert convert("tasks", "status", "failed") is TaskStatus.FAILED
    assert convert("serve", "data_dir", "/no/such/dir") == Path("/no/such/dir")
    refusals = [
        ("notify", "timeout", "nan", "nan is not in the range 0.1<=x<=86400."),
        ("notify", "timeout", "abc", "'abc' is not a valid float."),
        ("tail", "lines", "1.5", "'1.5' is not a valid integer."),
        ("tasks", "limit", "0", "0 is not in the range 1<=x<=1000."),
        ("tail", "file", "nope", "'nope' is not one of 'log', 'readme', 'all'."),
        ("tail", "data_dir", __file__, f"Directory {__file__!r} is a file."),
    ]
    for command, name, value, message in refusals:
        with pytest.raises(typer.BadParameter) as caught:
            convert(command, name, value)
        assert caught.value.message == message
