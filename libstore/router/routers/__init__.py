"""The routers: one module each, one registry.

``make_router("spectr")`` / ``make_router("arrow", top_n=2)`` build one by name; a router is a frozen
object implementing :class:`~libstore.router.routers.base.Router`. To add a router, write a module
here and add it to :data:`ROUTERS`.
"""

from __future__ import annotations

from typing import Any

from libstore.errors import RouterError
from libstore.router.routers.arrow import Arrow, PrototypeFn, exact_prototype_fn, peft_prototype_fn
from libstore.router.routers.base import CacheKey, Router, projection_norm
from libstore.router.routers.spectr import SpectR
from libstore.router.routers.uniform import Uniform

ROUTERS: dict[str, type[Any]] = {"arrow": Arrow, "spectr": SpectR, "uniform": Uniform}
"""Router name -> its class (constructed with keyword parameters)."""


def make_router(name: str, **params: Any) -> Router:
    """The router called ``name`` with these parameters (``RouterError`` for unknown names/parameters)."""
    cls = ROUTERS.get(name)
    if cls is None:
        raise RouterError(f"unknown router {name!r}; routers are {', '.join(sorted(ROUTERS))}")
    try:
        router: Router = cls(**params)
    except TypeError as e:
        raise RouterError(f"router {name!r} does not take these parameters {sorted(params)}: {e}") from e
    return router


__all__ = [
    "ROUTERS",
    "Arrow",
    "CacheKey",
    "PrototypeFn",
    "Router",
    "SpectR",
    "Uniform",
    "exact_prototype_fn",
    "make_router",
    "peft_prototype_fn",
    "projection_norm",
]
