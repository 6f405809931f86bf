"""Training methods behind one interface (``edge_agent.methods.base.TrainingMethod``).

Importing this package does not import torch: classes are imported on demand by
``get_method(name)``; ``METHODS`` (name -> class) is built on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class"; other methods register here the same way
_REGISTRY: dict[str, str] = {
    "lora": "edge_agent.methods.lora:LoraMethod",
    "qlora": "edge_agent.methods.qlora:QLoraMethod",
    "zo": "edge_agent.methods.zo:ZoMethod",
}


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def register_method(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (imported lazily)."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _REGISTRY[name] = target


def get_method(name: str) -> type:
    """The TrainingMethod subclass called ``name``; ValueError listing valid names otherwise."""
    target = _REGISTRY.get(name)
    if target is None:
        raise ValueError(f"unknown training method {name!r}; valid: {', '.join(method_names())}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(attr: str) -> Any:
    if attr == "METHODS":
        return {n: get_method(n) for n in method_names()}
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["METHODS", "get_method", "method_names", "register_method"]
