"""libstore: a catalog, math cache, Hub sync and router for libraries of LoRA experts.

``from libstore import Library`` is the entry point. Names are resolved lazily so that importing a
leaf module (``libstore.types``, ``libstore.lowrank``) does not pull in SQLAlchemy or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["BaseModel", "Expert", "ExpertQuery", "Library", "errors"]

if TYPE_CHECKING:
    from libstore import errors
    from libstore.library import Library
    from libstore.types import BaseModel, Expert, ExpertQuery


def __getattr__(name: str) -> Any:
    if name == "Library":
        from libstore.library import Library

        return Library
    if name in {"Expert", "BaseModel", "ExpertQuery"}:
        from libstore import types

        return getattr(types, name)
    if name == "errors":
        import libstore.errors as errors

        return errors
    raise AttributeError(f"module 'libstore' has no attribute {name!r}")
