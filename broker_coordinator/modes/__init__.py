"""The coordinator side of federation modes: one module per mode, found by the mode's name.

``broker_coordinator.modes.<name>`` defines ``MODE``, a :class:`CoordinatorMode` subclass. The
round runner, update intake and global publisher call only this interface, so they know no mode.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import GlobalModel, TaskKind, Update
from fedmq_protocol.modes import ModePayload, check_mode

if TYPE_CHECKING:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.state import CoordinatorState, DeviceRecord
    from fedmq_protocol.partials import PartialAggregate


@dataclass(frozen=True)
class RoundOutcome:
    """What aggregating one round produced."""

    message: GlobalModel  # published to the devices: a snapshot, or a difference from the last version
    snapshot: GlobalModel  # the new global in full (persisted)
    # (topic, payload) published retained before ``message``, e.g. a ledger entry it depends on
    retained: list[tuple[str, bytes]] = field(default_factory=list)


class CoordinatorMode(ABC):
    """One way of federating, coordinator side: the global, the tasks' and updates' mode payloads,
    how updates combine, what is retained on the broker and what is persisted."""

    name: ClassVar[str]

    def __init__(self, config: CoordinatorConfig) -> None:
        self.cfg = config

    # -- state ------------------------------------------------------------------------------
    @abstractmethod
    def restore(self, state: CoordinatorState) -> None:
        """Take up the persisted state (``state.global_model``, ``state.mode_state``)."""

    @abstractmethod
    def state_blob(self) -> Any:
        """The mode's state to persist with the global (msgpack-able), or None."""

    # -- devices and tasks ------------------------------------------------------------------
    def accepts(self, device: DeviceRecord) -> bool:
        """Whether the device (its announced training plan) can take part."""
        return True

    @abstractmethod
    def initial_global(self) -> GlobalModel | None:
        """Version 0 of the global, or None to ask one device for its initial tensors (``init``)."""

    def adopt_initial(self, arrays: dict[str, Any]) -> GlobalModel:
        """Version 0 from the tensors of a device's ``init`` result."""
        raise NotImplementedError(f"mode {self.name} defines version 0 itself")

    def task_payload(self, kind: TaskKind, round_no: int) -> ModePayload | None:
        """The mode's part of the tasks sent for ``kind`` in ``round_no``."""
        return None

    def task_payload_for(self, kind: TaskKind, round_no: int, device_id: str) -> ModePayload | None:
        """The mode's part of the task sent to ``device_id`` (default: the round's ``task_payload``)."""
        return self.task_payload(kind, round_no)

    # -- updates ----------------------------------------------------------------------------
    @abstractmethod
    def validate_update(self, update: Update) -> Any:
        """Check a fit update against the current global; returns what ``aggregate`` needs of it
        (e.g. its decoded tensors). ProtocolError when it cannot be aggregated."""

    @abstractmethod
    def aggregate(self, round_no: int, version: int, updates: Sequence[Update],
                  contributions: Sequence[Any]) -> RoundOutcome:
        """Combine the round's accepted updates (sorted by device) into global ``version``."""

    def fold(self, running: Any, update: Update, contribution: Any) -> tuple[Any, Update, Any]:
        """Take an accepted fit update into the round as it arrives: returns the round's running
        state (``running`` is None before the first update), the update as the round keeps it and
        what it keeps of ``contribution``. A linear rule adds the update into a running sum here and
        keeps neither its tensors nor its decoded contribution, so a round holds O(model) state,
        not O(devices x model). The default keeps everything for ``aggregate``."""
        return running, update, contribution

    def fold_weighted(self, running: Any, update: Update, contribution: Any,
                      weight: float) -> tuple[Any, Update, Any]:
        """``fold`` for an asynchronous buffer: the update counts ``weight`` times (its staleness
        weight, ``broker_coordinator.staleness``). ProtocolError when the mode has no asynchronous
        buffer (the default)."""
        raise ProtocolError(f"the {self.name} mode does not run asynchronously")

    def fold_partial(self, running: Any, partial: PartialAggregate) -> Any:
        """Take a site aggregator's partial sum into the round's running state (returned);
        ProtocolError when the mode cannot combine partials (the default)."""
        raise ProtocolError(f"the {self.name} mode does not combine partial aggregates; "
                            "run its devices on the coordinator's broker")

    def aggregate_folded(self, round_no: int, version: int, updates: Sequence[Update],
                         contributions: Sequence[Any], running: Any) -> RoundOutcome:
        """Global ``version`` from the round's running state and what ``fold`` kept (sorted by
        device). The default is ``aggregate`` over the kept updates and contributions."""
        return self.aggregate(round_no, version, updates, contributions)

    def retained_messages(self, base_topic: str, everything: bool = False) -> list[tuple[str, bytes]]:
        """(topic, payload) the mode keeps retained on the broker that were not published yet
        (``everything``: all of them, after the broker lost its retained messages); an empty
        payload clears its topic."""
        return []


def mode_class(name: str) -> type[CoordinatorMode]:
    check_mode(name)
    cls: type[CoordinatorMode] = importlib.import_module(f"broker_coordinator.modes.{name}").MODE
    return cls


def create_mode(config: CoordinatorConfig) -> CoordinatorMode:
    """The coordinator side of ``config.mode``."""
    return mode_class(config.mode or "adapter")(config)


__all__ = ["CoordinatorMode", "RoundOutcome", "create_mode", "mode_class"]
