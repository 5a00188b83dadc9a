"""Error reporting shared by every ``edgequant`` command.

Users of a command-line tool need one line saying what went wrong and what to do, not a Python traceback;
developers debugging edgequant need the traceback. `ErrorHandlingGroup` turns any exception escaping a
command into ``Error: <message>`` (exit code 1) unless ``--debug`` was given, either to the group
(``edgequant --debug CMD``) or to a command that carries `debug_option`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

DEBUG_KEY = "edgequant.debug"


def _remember_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[DEBUG_KEY] = True


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, callback=_remember_debug,
    help="Show the full Python traceback when something fails.",
)
"""Decorator adding ``--debug`` to a command; the flag is read by `ErrorHandlingGroup`, not the command."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages are joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = "; ".join(lines) if lines else type(error).__name__
    return message if isinstance(error, (ValueError, RuntimeError, OSError)) else f"{type(error).__name__}: {message}"


class ErrorHandlingGroup(click.Group):
    """A click group whose commands fail with one clear line instead of a traceback (unless ``--debug``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # `edgequant ... | head`: the reader left; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(0)
        except Exception as error:
            if ctx.meta.get(DEBUG_KEY):
                raise
            raise click.ClickException(one_line(error)) from None
