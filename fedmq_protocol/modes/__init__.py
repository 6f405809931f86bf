"""Federation modes, registered by name.

A federation mode is one way of federating a model: what the global is, what a task asks, what an
update carries and how updates combine. Each mode has up to three parts, found by its name:

- ``fedmq_protocol.modes.<name>``: its wire payloads (torch-free; optional: the adapter mode has
  none, its tensors travel in the messages' shared ``tensors`` field);
- ``broker_coordinator.modes.<name>``: the coordinator side (``CoordinatorMode``);
- ``edge_agent.modes.<name>``: the agent side (``AgentMode``).

Adding a mode is adding its name to ``MODES`` and writing those modules (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import Literal

from fedmq_protocol.modes.base import ModePayload

MessageKind = Literal["task", "update", "global"]

#: name -> module of its wire payloads ("" for a mode without payloads)
MODES: dict[str, str] = {
    "adapter": "",
    "zo": "fedmq_protocol.modes.zo",
    "kd": "fedmq_protocol.modes.kd",
    "split": "fedmq_protocol.modes.split",
    "krso": "fedmq_protocol.modes.krso",
}

DEFAULT_MODE = "adapter"


def mode_names() -> list[str]:
    return list(MODES)


def check_mode(name: str, where: str = "mode") -> str:
    """``name`` if it is a registered mode; ValueError naming ``where`` and the valid names."""
    if name not in MODES:
        raise ValueError(f"{where}: unknown federation mode {name!r}; valid: {', '.join(sorted(MODES))}")
    return name


_payloads: dict[tuple[str, str], type[ModePayload]] | None = None


def payload_types() -> dict[tuple[str, str], type[ModePayload]]:
    """(message kind, mode name) -> the payload class that mode puts in that message."""
    global _payloads
    if _payloads is None:
        found: dict[tuple[str, str], type[ModePayload]] = {}
        for name, module in MODES.items():
            if not module:
                continue
            for kind, cls in getattr(importlib.import_module(module), "PAYLOADS", {}).items():
                if cls.mode != name:
                    raise TypeError(f"{module}: {cls.__name__}.mode is {cls.mode!r}, registered as {name!r}")
                found[(kind, name)] = cls
        _payloads = found
    return _payloads


def payload_type(kind: MessageKind, mode: str) -> type[ModePayload] | None:
    return payload_types().get((kind, mode))


_modes_by_kind: dict[str, frozenset[str]] = {}


def payload_modes(kind: MessageKind) -> frozenset[str]:
    """Names of the modes that carry a payload in messages of ``kind`` (asked by every decode)."""
    found = _modes_by_kind.get(kind)
    if found is None:
        found = _modes_by_kind[kind] = frozenset(mode for (k, mode) in payload_types() if k == kind)
    return found


__all__ = ["DEFAULT_MODE", "MODES", "ModePayload", "check_mode", "mode_names", "payload_modes", "payload_type"]
