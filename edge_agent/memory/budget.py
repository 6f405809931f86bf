"""Sizes and budgets: what a device may use, and how a size is written in a config.

``parse_size`` reads a size as an operator writes it (``2048`` MiB, ``2G``, ``2GB``, ``2GiB``,
``512M``, ``80%`` of RAM); ``parse_size_mb`` turns it into MiB for the agent's planner, and
``fedmq.service`` renders the same parse as a systemd ``MemoryMax=`` value, so the unit's cap and
the agent's budget read a YAML alike.

Standard library only (psutil is imported only to resolve a share of RAM): ``fedmq.service`` and
the coordinator import this without the training stack.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.memory.planner import Plan

MB = 1024 * 1024

# a positive decimal, then a unit (K, M, G, T, optionally followed by B or iB) or a % of RAM
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT]?)(?:i?B)?|(%))\s*$", re.IGNORECASE)
UNIT_MB = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}


@dataclass(frozen=True)
class Size:
    """A size as written: ``number`` (positive) of ``unit`` (K, M, G or T; ``%``: a share of the
    machine's RAM)."""

    number: float
    unit: str

    @property
    def is_share(self) -> bool:
        return self.unit == "%"

    def mb(self, total_mb: float | None = None) -> float:
        """MiB; a share is of ``total_mb`` (the machine's RAM when not given)."""
        if self.is_share:
            if total_mb is None:
                import psutil

                total_mb = psutil.virtual_memory().total / MB
            return total_mb * self.number / 100
        return self.number * UNIT_MB[self.unit]


def parse_size(value: Any, *, what: str = "memory", example: str = "2G") -> Size:
    """The size ``value`` (a number of MiB, or text such as ``2G``, ``2GB``, ``2GiB``, ``512M``,
    ``80%``). ValueError naming ``what`` (and ``example``, a size to suggest) otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what}: expected a size like {example} or a number of MB, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what}: must be a positive number of MB, got {value!r}")
        return Size(float(value), "M")
    text = str(value).strip()
    m = _SIZE.match(text)
    if text.endswith("%"):
        if not (m and m.group(3) and 0 < float(m.group(1)) <= 100):
            raise ValueError(f"{what}: a share must be in (0, 100]%, got {value!r}")
        return Size(float(m.group(1)), "%")
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{what}: expected a size like {example}, {example}B, 512M or 80%, got {value!r}")
    return Size(float(m.group(1)), (m.group(2) or "M").upper())


def parse_size_mb(value: Any, *, what: str = "memory", total_mb: float | None = None) -> float:
    """MiB from ``2048`` (a number of MiB), ``"2G"``, ``"2GB"``, ``"2GiB"``, ``"512M"`` or ``"80%"``
    (of ``total_mb``, the machine's RAM when not given). ValueError naming ``what`` otherwise."""
    return parse_size(value, what=what).mb(total_mb)


def round_mb(value: float | None) -> float | None:
    """A MiB figure as reported (one decimal); None stays None."""
    return None if value is None else round(float(value), 1)


@dataclass(frozen=True)
class Budget:
    """Memory a device may use: host RAM and (with CUDA) GPU memory, in MiB; None: unbounded."""

    host_mb: float | None = None
    gpu_mb: float | None = None

    @property
    def bounded(self) -> bool:
        return self.host_mb is not None or self.gpu_mb is not None

    def describe(self) -> str:
        parts = []
        if self.host_mb is not None:
            parts.append(f"{self.host_mb:.0f} MiB host")
        if self.gpu_mb is not None:
            parts.append(f"{self.gpu_mb:.0f} MiB GPU")
        return " + ".join(parts) or "no budget"

    def scaled_down(self, factor: float) -> Budget:
        """Each figure divided by ``factor`` (what estimates raised ``factor`` times must fit)."""
        return Budget(host_mb=None if self.host_mb is None else self.host_mb / factor,
                      gpu_mb=None if self.gpu_mb is None else self.gpu_mb / factor)


class BudgetTooSmall(ValueError):
    """No plan fits the memory budget. ``min_host_mb`` / ``min_gpu_mb``: the smallest budget of
    the cheapest plan (what the operator must configure at least)."""

    def __init__(self, message: str, *, min_host_mb: float | None, min_gpu_mb: float | None = None,
                 smallest: Plan | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.min_host_mb = min_host_mb
        self.min_gpu_mb = min_gpu_mb
        self.smallest = smallest
        self.hint = hint  # what else would fit (a split plan: the largest cut within the budget)
