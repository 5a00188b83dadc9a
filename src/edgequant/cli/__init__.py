"""The ``edgequant`` command line: argument parsing, input loading and error reporting on top of the library."""

from edgequant.cli.main import main

__all__ = ["main"]
