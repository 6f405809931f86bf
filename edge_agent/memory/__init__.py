"""Memory budgets of the edge agent: plan training to fit, measure it, react when it does not.

* ``budget``: sizes as written in a config (``parse_size_mb``; ``fedmq.service`` renders the same
  parse as systemd's ``MemoryMax=``), ``Budget``, ``BudgetTooSmall``;
* ``estimator``: ``ModelShape`` (from a model's config), the calibration constants, ``estimate``
  (the peak memory of a plan), ``estimate_split`` (a split device's part of a cut);
* ``planner``: ``Plan``, ``candidate_plans`` (best first), ``choose_plan``, ``lower_plan``,
  ``choose_cut`` (the largest split cut within a budget);
* ``guard``: the allocator setup, ``PeakMeter`` / ``meter``, ``MemoryGuard``, ``OverBudget``;
* ``manager``: ``MemoryManager`` (what the agent asks: a plan, its installation, the status),
  ``PlanRefused``.

The names below are loaded from their module on first use: importing this package imports
nothing (``fedmq.service`` imports ``edge_agent.memory.budget`` without the agent), and no module
of it imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.memory.budget import MB, Budget, BudgetTooSmall, parse_size_mb
    from edge_agent.memory.estimator import RUNTIME_MB, ModelShape, estimate, estimate_split
    from edge_agent.memory.guard import MemoryGuard, OverBudget, PeakMeter, configure_allocator, meter
    from edge_agent.memory.manager import MemoryManager, PlanRefused
    from edge_agent.memory.planner import Plan, candidate_plans, choose_cut, choose_plan, lower_plan

_EXPORTS = {
    "budget": ("MB", "Budget", "BudgetTooSmall", "parse_size_mb"),
    "estimator": ("RUNTIME_MB", "ModelShape", "estimate", "estimate_split"),
    "planner": ("Plan", "candidate_plans", "choose_cut", "choose_plan", "lower_plan"),
    "guard": ("MemoryGuard", "OverBudget", "PeakMeter", "configure_allocator", "meter"),
    "manager": ("MemoryManager", "PlanRefused"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [  # the names above, spelled out for tools that read __all__ statically
    "MB", "RUNTIME_MB", "Budget", "BudgetTooSmall", "MemoryGuard", "MemoryManager", "ModelShape", "OverBudget",
    "PeakMeter", "Plan", "PlanRefused", "candidate_plans", "choose_cut", "choose_plan", "configure_allocator",
    "estimate", "estimate_split", "lower_plan", "meter", "parse_size_mb",
]
assert sorted(__all__) == sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
