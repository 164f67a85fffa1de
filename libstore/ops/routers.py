"""Router configurations: parse and check :class:`~libstore.types.RouterSpec`, build router objects,
and read each router's keys from the prototype cache (computing only what is missing).

Text form of a spec (CLI ``--router``, evaluations)::

    arrow                          spectr                     uniform          oracle
    arrow:top_n=2                  spectr:granularity=sequence
    arrow:general=kind=general     arrow:top_k=2;temperature=0.5

Parameters are separated by ``;`` (a query may hold spaces, commas and ``=``: everything after the
first ``=`` of a parameter is its value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from libstore.errors import RouterError, ValidationError
from libstore.ops import prototypes as protos
from libstore.ops.context import Context
from libstore.types import GRANULARITIES, ROUTER_NAMES, Expert, PrototypeMethod, RouterSpec

if TYPE_CHECKING:
    import torch

    from libstore.router.routers import Router

NAMES = (*ROUTER_NAMES, "oracle")
COMMON = {"top_k": int, "temperature": float, "granularity": str, "general": str}
OWN: dict[str, dict[str, type]] = {
    "arrow": {"top_n": int, "method": str, "seed": int},
    "spectr": {},
    "uniform": {},
    "oracle": {},
}


def parse_spec(text: str | RouterSpec) -> RouterSpec:
    """``"arrow:top_n=2;granularity=sequence"`` -> a checked :class:`RouterSpec`.

    Raises:
        ValidationError (field ``router``): unknown router or parameter, a value of the wrong type.
    """
    if isinstance(text, RouterSpec):
        return check_spec(text)
    name, _, rest = text.strip().partition(":")
    params: dict[str, Any] = {}
    for part in [p for p in rest.split(";") if p.strip()] if rest else []:
        key, eq, value = part.partition("=")
        if not eq:
            raise ValidationError(f"router {text!r}: expected key=value, got {part!r}", field="router")
        params[key.strip()] = value.strip()
    return check_spec(RouterSpec(name.strip(), params))


def check_spec(spec: RouterSpec) -> RouterSpec:
    """The spec with its values converted to their types; ``ValidationError`` where it is wrong."""
    if spec.name not in NAMES:
        raise ValidationError(f"unknown router {spec.name!r}; routers are {', '.join(NAMES)}", field="router")
    allowed = {**COMMON, **OWN[spec.name]}
    out: dict[str, Any] = {}
    for key, value in spec.params.items():
        kind = allowed.get(key)
        if kind is None:
            raise ValidationError(
                f"router {spec.name!r} has no parameter {key!r}; it takes {', '.join(sorted(allowed))}",
                field="router",
            )
        try:
            out[key] = kind(value)
        except (TypeError, ValueError) as e:
            raise ValidationError(
                f"router {spec.label}: {key} must be a {kind.__name__}, got {value!r}", field="router"
            ) from e
    if out.get("granularity", "token") not in GRANULARITIES:
        raise ValidationError(
            f"router {spec.label}: granularity must be one of {GRANULARITIES}", field="router"
        )
    if out.get("top_k", 1) < 1 or out.get("top_n", 1) < 1:
        raise ValidationError(f"router {spec.label}: top_k and top_n must be at least 1", field="router")
    if out.get("method", "exact") not in ("exact", "peft"):
        raise ValidationError(f"router {spec.label}: method must be 'exact' or 'peft'", field="router")
    if "temperature" in out and not out["temperature"] > 0:
        raise ValidationError(f"router {spec.label}: temperature must be > 0", field="router")
    return RouterSpec(spec.name, out)


def make(name: str, *, top_n: int = 1, method: PrototypeMethod = "exact", seed: int = 0) -> Router:
    """The router object of a routed model (``oracle`` is not one: it needs each example's task)."""
    from libstore.router.routers import make_router

    if name == "oracle":
        raise RouterError(
            "'oracle' routes each example to its task's own expert, so it needs the tasks: it is a "
            "reference row of `libstore eval`; to force experts per sequence use RoutedModel.pinned()"
        )
    if name == "arrow":
        return make_router("arrow", top_n=top_n, method=method, seed=seed)
    if top_n != 1 or method != "exact":
        raise RouterError(f"top_n and method are Arrow's settings; router {name!r} takes neither")
    return make_router(name)


def cached_keys(
    ctx: Context,
    experts: Sequence[Expert],
    router: Router,
    device: str,
    loaded: Mapping[str, Any],
) -> dict[str, torch.Tensor] | None:
    """module -> (M_m, in) router keys of ``experts`` from the prototype cache, rows in expert order.

    Missing cache entries are computed on ``device`` from the tensors in ``loaded`` (weights sha256 ->
    factors) and cached (:func:`libstore.ops.prototypes.router_sets`). ``None`` for a router that
    needs no keys.
    """
    import torch

    key = router.cache()
    if key is None:
        return None
    spec = protos.method_spec(key.method, top_n=key.top_n, seed=key.seed)
    sets = protos.router_sets(ctx, experts, spec, device, loaded)
    rows: dict[str, list[torch.Tensor]] = {}
    for e in experts:
        for m, (vectors, values) in sets[e.sha256].items():
            rows.setdefault(m, []).append(router.cached_keys(vectors, values, e.scale))
    return {m: torch.cat(v).to(torch.float32) for m, v in rows.items()}
