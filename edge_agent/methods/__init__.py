"""Training methods behind one interface (``edge_agent.methods.base.TrainingMethod``), by name.

Importing this package does not import torch: classes are imported on demand by
``get_method(name)``; ``METHODS`` (name -> class of the methods a config may name) is built on
first access. A method is registered by adding ``REGISTRY[name] = "module:Class"``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.methods.base import TrainingMethod

# name -> "module:Class" (imported lazily)
REGISTRY: dict[str, str] = {
    "lora": "edge_agent.methods.lora:LoraMethod",
    "qlora": "edge_agent.methods.qlora:QLoraMethod",
    "zo": "edge_agent.methods.zo:ZoMethod",
    "zo-adapter": "edge_agent.methods.zo_adapter:ZoAdapterMethod",
}
# chosen by a memory plan (edge_agent.memory.planner), never named in a config
PLAN_ONLY = frozenset({"zo-adapter"})


def method_names() -> list[str]:
    """The methods an agent config may name (``method:``)."""
    return sorted(n for n in REGISTRY if n not in PLAN_ONLY)


def get_method(name: str) -> type[TrainingMethod]:
    """The TrainingMethod subclass called ``name``; ValueError listing valid names otherwise."""
    target = REGISTRY.get(name)
    if target is None:
        raise ValueError(f"unknown training method {name!r}; valid: {', '.join(method_names())}")
    module, _, cls = target.partition(":")
    found: type[TrainingMethod] = getattr(importlib.import_module(module), cls)
    return found


def __getattr__(attr: str) -> Any:
    if attr == "METHODS":
        return {n: get_method(n) for n in method_names()}
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["METHODS", "PLAN_ONLY", "REGISTRY", "get_method", "method_names"]
