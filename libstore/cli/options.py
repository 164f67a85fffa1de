"""Click options to an operation's option dataclass, and on to the ``Library`` method's keywords.

Each operation's options are one frozen dataclass in the ops module that owns it (``GksOptions``,
``PushOptions``, ...). A command builds it from its click keywords, which fails on an option the
dataclass does not have, and passes its fields to the ``Library`` method, which builds the same
dataclass for the operation. ``tests/test_option_sets.py`` checks that the three agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import click

#: ``--allow-base-mismatch`` of the commands that build a routed model (``eval``, ``export-routed``)
allow_routing_base_mismatch = click.option(
    "--allow-base-mismatch",
    is_flag=True,
    help="Route experts whose base model is not the one loaded (shapes must still fit).",
)


def option_kwargs(cls: type[Any], kw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Library`` keywords of click's options ``kw``, checked by building ``cls`` from them."""
    options = cls(**kw)
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
