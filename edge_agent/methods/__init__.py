"""Training methods behind one interface (``edge_agent.methods.base.TrainingMethod``), by name.

Importing this package does not import torch: classes are imported on demand by
``get_method(name)``; ``METHODS`` (name -> class of the methods a config may name) is built on
first access. A method is registered by adding ``REGISTRY[name] = "module:Class"``, or by its file
alone: ``edge_agent/methods/<name>.py`` defining ``METHOD`` (the class) is found by its name.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.methods.base import TrainingMethod

# name -> "module:Class" (imported lazily)
REGISTRY: dict[str, str] = {
    "lora": "edge_agent.methods.lora:LoraMethod",
    "qlora": "edge_agent.methods.qlora:QLoraMethod",
    "zo": "edge_agent.methods.zo:ZoMethod",
    "zo-adapter": "edge_agent.methods.zo_adapter:ZoAdapterMethod",
    "krso": "edge_agent.methods.krso:KrsoMethod",
}
# chosen by a memory plan (edge_agent.memory.planner), never named in a config
PLAN_ONLY = frozenset({"zo-adapter"})


def _by_file(name: str) -> str | None:
    """``module:METHOD`` of a method registered by its file alone (found without importing it)."""
    module = f"{__name__}.{name.replace('-', '_')}"
    if not name.replace("-", "_").isidentifier():
        return None
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    try:  # a helper module of the package (e.g. split_model) defines no METHOD: not a method
        source = Path(spec.origin).read_text(encoding="utf-8")
    except OSError:
        return None
    if not re.search(r"^METHOD\s*[:=]|^class METHOD\b|\bas METHOD\b", source, re.MULTILINE):
        return None
    return f"{module}:METHOD"


def method_names() -> list[str]:
    """The methods an agent config may name (``method:``): the registry's and those registered by
    their file (found by reading the package's files, without importing them)."""
    by_file = {f.stem.replace("_", "-") for f in Path(__file__).parent.glob("*.py")
               if not f.stem.startswith("_") and _by_file(f.stem) is not None}
    return sorted(n for n in {*REGISTRY, *by_file} if n not in PLAN_ONLY)


def is_method(name: str) -> bool:
    """Whether an agent config may name ``name``."""
    return name not in PLAN_ONLY and (name in REGISTRY or _by_file(name) is not None)


def get_method(name: str) -> type[TrainingMethod]:
    """The TrainingMethod subclass called ``name``; ValueError listing valid names otherwise."""
    target = REGISTRY.get(name) or _by_file(name)
    if target is None:
        raise ValueError(f"unknown training method {name!r}; valid: {', '.join(method_names())}")
    module, _, cls = target.partition(":")
    found = getattr(importlib.import_module(module), cls, None)
    if found is None:
        raise ValueError(f"training method {name!r}: {module} defines no {cls}")
    return found  # type: ignore[no-any-return]  # a TrainingMethod subclass by the registry's contract


def __getattr__(attr: str) -> Any:
    if attr == "METHODS":
        return {n: get_method(n) for n in method_names()}
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["METHODS", "PLAN_ONLY", "REGISTRY", "get_method", "is_method", "method_names"]
