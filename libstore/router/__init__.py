"""Routing over LoRA experts: routed Linear layers, the routers (Arrow, SpectR, uniform), the model
builder, per-sequence routing, exact mixture export and routing traces."""

from __future__ import annotations

from libstore.router.build import ExpertTensors, build_router, exact_prototype_fn, peft_prototype_fn
from libstore.router.export import mixture_factors
from libstore.router.model import RoutedModel
from libstore.router.routers import ROUTERS, Router, make_router
from libstore.router.sequence import SequenceRoutes
from libstore.router.trace import RoutingTrace

__all__ = [
    "ROUTERS",
    "ExpertTensors",
    "RoutedModel",
    "Router",
    "RoutingTrace",
    "SequenceRoutes",
    "build_router",
    "exact_prototype_fn",
    "make_router",
    "mixture_factors",
    "peft_prototype_fn",
]
