"""The ``libstore`` command line: a click group, one module per command group.

Commands call the Python API (``libstore.library.Library``) and nothing deeper. Errors become a
one-line message on stderr and the exit code of their class (see ``libstore.errors``).
"""

from __future__ import annotations

from libstore.cli.app import cli, main

__all__ = ["cli", "main"]
