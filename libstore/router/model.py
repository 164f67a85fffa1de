"""``RoutedModel``: a thin handle on a transformers model whose Linear layers were routed in place.

It is not a wrapper module: the patched model *is* the ``nn.Module`` (``routed.model``), so
``.to()``, ``.eval()``, ``torch.compile(routed.model)``, ``generate()`` and the KV cache work as they do
on the plain model. The handle adds what the patch needs: tracing (:meth:`RoutedModel.explain`),
changing the routing settings of every layer at once, per-sequence routing
(:meth:`RoutedModel.sequence_routing`, :meth:`RoutedModel.pinned`, or ``granularity="sequence"`` for
every call) and :meth:`RoutedModel.unpatch`.

Attribute look-ups it does not define fall through to the model (``routed.config``, ``routed.device``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from libstore.errors import RouterError
from libstore.router.layer import RoutedLinear
from libstore.router.sequence import SequenceRoutes
from libstore.router.trace import RoutingTrace
from libstore.types import GRANULARITIES, MIXINGS, STRATEGIES, Granularity, Mixing, Strategy

__all__ = ["RoutedModel"]


class RoutedModel:
    """A model patched by :func:`libstore.router.build.build_router`.

    Attributes:
        model: the patched transformers model (call it, compile it, move it).
        layers: module name -> its :class:`~libstore.router.layer.RoutedLinear`, in model order.
        experts: the routed experts' names; traces and ``RoutedLinear.expert_ids`` index into it.
        granularity: ``"token"`` (route every token) or ``"sequence"`` (every ``__call__`` and
            ``generate`` of this handle routes each sequence once, from its tokens of the first call:
            the prompt; see :meth:`sequence_routing`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, RoutedLinear],
        experts: tuple[str, ...],
        granularity: Granularity = "token",
    ) -> None:
        if granularity not in GRANULARITIES:
            raise RouterError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")
        self.model = model
        self.layers: dict[str, RoutedLinear] = dict(layers)
        self.experts = experts
        self.granularity: Granularity = granularity
        self._patched = True
        self._tracing = False
        self._routes: SequenceRoutes | None = None

    @property
    def router(self) -> str:
        """The name of the router every layer uses."""
        return next(iter(self.layers.values())).router.name

    # -- pass-through ------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_patched()
        if self.granularity == "sequence" and self._routes is None:
            with self.sequence_routing(kwargs.get("attention_mask")):
                return self.model(*args, **kwargs)
        return self.model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_patched()
        if self.granularity == "sequence" and self._routes is None:
            with self.sequence_routing(kwargs.get("attention_mask")):
                return self.model.generate(*args, **kwargs)  # type: ignore[operator]  # nn.Module attr
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]  # an HF model's method

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("model", "layers", "experts", "granularity"):
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
        granularity: Granularity | None = None,
    ) -> None:
        """Change routing settings on every routed layer (None leaves a setting as it is)."""
        if granularity is not None and granularity not in GRANULARITIES:
            raise RouterError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")
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
        if granularity is not None:
            self.granularity = granularity
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

    # -- per-sequence routing ----------------------------------------------------------------------

    @contextmanager
    def sequence_routing(self, attention_mask: Tensor | None = None) -> Iterator[SequenceRoutes]:
        """Route each sequence once: every module decides at its first call inside the block.

        The decision uses the router's scores averaged over each sequence's tokens of that call (where
        ``attention_mask`` is 1; all tokens without one), then top-k and the softmax with temperature;
        later calls (the decoding steps) reuse it. The yielded :class:`SequenceRoutes` holds the
        choice per module (``routes.names(module)``); :meth:`pinned` replays it.

        Example::

            with routed.sequence_routing(batch["attention_mask"]) as routes:
                out = routed.model.generate(**batch, max_new_tokens=32)
            print(routes.names("model.layers.0.self_attn.q_proj"))
        """
        with self._routing(SequenceRoutes(self.experts, mask=attention_mask)) as routes:
            yield routes

    @contextmanager
    def pinned(
        self,
        routes: SequenceRoutes | Sequence[Sequence[str]],
        weights: Sequence[Sequence[float]] | None = None,
    ) -> Iterator[SequenceRoutes]:
        """Route with given experts per sequence: the routes of a :meth:`sequence_routing` block, or
        expert names per sequence (``[["arc_easy"], ["boolq", "piqa"]]``) used in every module with
        ``weights`` (default equal). A module an expert lacks gets no update from it."""
        if isinstance(routes, SequenceRoutes):
            if routes.experts != self.experts:
                raise RouterError("these routes were made by a router over other experts")
            given = SequenceRoutes(self.experts, every=routes.every)
            given.routes = dict(routes.routes)
        else:
            given = SequenceRoutes.given(self.experts, routes, weights)
        with self._routing(given) as out:
            yield out

    @contextmanager
    def _routing(self, routes: SequenceRoutes) -> Iterator[SequenceRoutes]:
        self._check_patched()
        if self._routes is not None:
            raise RouterError("a sequence-routing block is already active on this model; blocks do not nest")
        self._routes = routes
        for layer in self.layers.values():
            layer._seq = routes
        try:
            yield routes
        finally:
            for layer in self.layers.values():
                layer._seq = None
            self._routes = None

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
