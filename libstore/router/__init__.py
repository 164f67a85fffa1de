"""Arrow routing over LoRA experts: routed Linear layers, the model builder and routing traces."""

from __future__ import annotations

from libstore.router.build import ExpertTensors, build_router, exact_prototype_fn, peft_prototype_fn
from libstore.router.model import RoutedModel
from libstore.router.trace import RoutingTrace

__all__ = [
    "ExpertTensors",
    "RoutedModel",
    "RoutingTrace",
    "build_router",
    "exact_prototype_fn",
    "peft_prototype_fn",
]
