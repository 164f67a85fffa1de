"""``RoutedModel``: a thin handle on a transformers model whose Linear layers were routed in place.

It is not a wrapper module: the patched model *is* the ``nn.Module`` (``routed.model``), so
``.to()``, ``.eval()``, ``torch.compile(routed.model)``, ``generate()`` and the KV cache work as they do
on the plain model. The handle adds what the patch needs: tracing (:meth:`RoutedModel.explain`),
changing the routing settings of every layer at once, and :meth:`RoutedModel.unpatch`.

Attribute look-ups it does not define fall through to the model (``routed.config``, ``routed.device``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn

from libstore.errors import RouterError
from libstore.router.layer import MIXINGS, STRATEGIES, Mixing, RoutedLinear, Strategy
from libstore.router.trace import RoutingTrace

__all__ = ["RoutedModel"]


class RoutedModel:
    """A model patched by :func:`libstore.router.build.build_router`.

    Attributes:
        model: the patched transformers model (call it, compile it, move it).
        layers: module name -> its :class:`~libstore.router.layer.RoutedLinear`, in model order.
        experts: the routed experts' names; traces and ``RoutedLinear.expert_ids`` index into it.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, RoutedLinear],
        experts: tuple[str, ...],
    ) -> None:
        self.model = model
        self.layers: dict[str, RoutedLinear] = dict(layers)
        self.experts = experts
        self._patched = True
        self._tracing = False

    # -- pass-through ------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_patched()
        return self.model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_patched()
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("model", "layers", "experts"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        state = "patched" if self._patched else "unpatched"
        return (
            f"RoutedModel({type(self.model).__name__}, {len(self.experts)} experts, "
            f"{len(self.layers)} routed modules, {state})"
        )

    # -- routing settings --------------------------------------------------------------------------

    def configure(
        self,
        *,
        top_k: int | None = None,
        temperature: float | None = None,
        mixing: Mixing | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        """Change routing settings on every routed layer (None leaves a setting as it is)."""
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise RouterError(f"top_k must be a positive integer, got {top_k!r}")
        if temperature is not None and not temperature > 0:
            raise RouterError(f"temperature must be > 0, got {temperature!r}")
        if mixing is not None and mixing not in MIXINGS:
            raise RouterError(f"unknown mixing {mixing!r}; use one of {MIXINGS}")
        if strategy is not None and strategy not in STRATEGIES:
            raise RouterError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
        if mixing == "parameter":
            bad = [n for n, layer in self.layers.items() if not layer.uniform_rank]
            if bad:
                raise RouterError(
                    f"mixing='parameter' needs equal ranks per module; mixed ranks in {bad[:3]}"
                )
        for layer in self.layers.values():
            if top_k is not None:
                layer.top_k = top_k
            if temperature is not None:
                layer.temperature = float(temperature)
            if mixing is not None:
                layer.mixing = mixing
            if strategy is not None:
                layer.strategy = strategy

    # -- tracing -----------------------------------------------------------------------------------

    @contextmanager
    def explain(self) -> Iterator[RoutingTrace]:
        """Record, for every routed call inside the block, each token's experts and weights.

        Off by default: outside this block a layer's only tracing cost is one ``is None`` test.
        Recording copies the (tokens x top_k) choices to the CPU, which syncs a GPU.

        Example::

            with routed.explain() as trace:
                routed.generate(**inputs, max_new_tokens=8)
            print(trace.summary()); trace.plot("routing.png")
        """
        self._check_patched()
        if self._tracing:
            raise RouterError("explain() is already active on this model; nested traces are not supported")
        trace = RoutingTrace(self.experts, tuple(self.layers))
        self._tracing = True
        for layer in self.layers.values():
            layer._trace = trace
        try:
            yield trace
        finally:
            for layer in self.layers.values():
                layer._trace = None
            self._tracing = False

    # -- undo --------------------------------------------------------------------------------------

    def unpatch(self) -> nn.Module:
        """Put every original ``nn.Linear`` back; returns the plain model. The handle is then spent."""
        self._check_patched()
        named = dict(self.model.named_modules())
        for name, layer in self.layers.items():
            if named.get(name) is not layer:
                raise RouterError(f"module {name!r} was replaced after routing; cannot unpatch it safely")
        for name, layer in self.layers.items():
            parent, _, attr = name.rpartition(".")
            setattr(named[parent] if parent else self.model, attr, layer.base_layer)
        self._patched = False
        return self.model

    def _check_patched(self) -> None:
        if not self._patched:
            raise RouterError("this RoutedModel was unpatched; build a new router to route again")
