"""Coordinator state behind one interface: in memory (tests, demos) or on disk (production).

The file store writes atomically (temp file, fsync, rename, fsync dir) after every completed
round, so a coordinator killed at any instant restarts from the last completed round with a
global that matches its round counter. While a round is open, every accepted update is written
too (``save_open_round``, the typed journal of ``broker_coordinator.journal``), so a restarted
coordinator resumes that round without asking the devices again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from broker_coordinator.journal import OpenRound
from fedmq_protocol.messages import GlobalModel, RoundSummary
from fedmq_protocol.partials import parse_partial_key
from fedmq_protocol.storage import atomic_write
from fedmq_protocol.wire import unpack_limited

STATE_FORMAT = 1


@dataclass
class DeviceRecord:
    """What the coordinator knows of one device, from its presence messages and results."""

    device_id: str
    online: bool = False
    seq: int = -1
    # DeviceStatus.order of the latest status accepted (statuses not later are ignored)
    order: list[int] | None = None
    last_seen: float = 0.0  # arrival of the latest status accepted (a Will is dated by its arrival)
    state: str | None = None
    method: str | None = None
    model: str | None = None
    num_samples: int = 0
    eval_samples: int = 0
    applied_version: int | None = None
    rounds_participated: int = 0
    rounds_missed: int = 0
    resources: dict[str, Any] | None = None
    # memory budget, chosen plan, refusal and over-budget report (messages.DeviceMemory, as JSON)
    memory: dict[str, Any] | None = None
    tokenizer: str | None = None  # DeviceStatus.tokenizer (kd federations)

    @property
    def ready(self) -> bool:
        return self.online and self.state not in ("loading", "refused", "offline")

    @property
    def plan(self) -> dict[str, Any] | None:
        """The training plan the device announced for its memory budget (None: not announced)."""
        return (self.memory or {}).get("plan")

    def declined(self, task_id: str | None) -> bool:
        """The device will not answer ``task_id``: it refuses to train (no plan fits its memory
        budget) or it stopped that task over budget."""
        mem = self.memory or {}
        if self.state == "refused" or mem.get("refused"):
            return True
        over = mem.get("over_budget") or {}
        return task_id is not None and over.get("task_id") == task_id

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeviceRecord:
        known = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class CoordinatorState:
    """Everything needed to resume: the last completed round and the global it produced."""

    round_completed: int = 0  # 0: nothing trained yet (round 0 is the baseline evaluation)
    global_model: GlobalModel | None = None  # the current global, as a snapshot
    history: list[RoundSummary] = field(default_factory=list)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    # the federation mode's own state (msgpack-able; CoordinatorMode.state_blob): adapter: exact
    # weights and server optimizer moments; zo: the seed ledger
    mode_state: Any = None
    # global differences retained on the broker: version -> chunk count (cleared at the next snapshot)
    retained_diffs: dict[int, int] = field(default_factory=dict)

    @property
    def global_version(self) -> int:
        return -1 if self.global_model is None else self.global_model.version


class StateStore(ABC):
    @abstractmethod
    def load(self) -> CoordinatorState | None:
        """The last saved state, or None when starting fresh."""

    @abstractmethod
    def save(self, state: CoordinatorState) -> None:
        """Persist ``state`` atomically."""

    # -- the open round: updates accepted before the round closed (survive a coordinator crash) --
    @abstractmethod
    def save_open_round(self, record: OpenRound) -> None:
        """Record the open fan-out (written when its tasks go out, not per update)."""

    @abstractmethod
    def save_accepted(self, key: str, payload: bytes) -> None:
        """Journal one accepted update (``key``: its device id) or site partial (its partial key),
        exactly as received: once this returns it survives a crash and counts on resume."""

    @abstractmethod
    def load_open_round(self) -> tuple[OpenRound, dict[str, bytes]] | None:
        """The open round recorded before a crash and its accepted payloads (``accepted`` and
        ``partials`` of the record are those journalled), or None."""

    @abstractmethod
    def clear_open_round(self) -> None:
        """Forget the open round (it was aggregated or abandoned)."""


def _with_journalled(record: OpenRound, payloads: dict[str, bytes]) -> OpenRound:
    """``record`` whose accepted devices and partials are those with a journalled payload."""
    partials = {k for k in payloads if parse_partial_key(k) is not None}
    return dataclasses.replace(record, accepted=tuple(sorted(set(payloads) - partials)),
                               partials=tuple(sorted(partials)))


def _copy(state: CoordinatorState) -> CoordinatorState:
    return CoordinatorState(
        round_completed=state.round_completed,
        global_model=state.global_model,
        history=list(state.history),
        devices={k: DeviceRecord.from_json(v.to_json()) for k, v in state.devices.items()},
        mode_state=unpack_limited(msgpack.packb(state.mode_state, use_bin_type=True), 1 << 34, "mode state"),
        retained_diffs=dict(state.retained_diffs),
    )


class InMemoryStateStore(StateStore):
    """The same contract in memory (tests, demos): saved state is a copy, not a live reference."""

    def __init__(self) -> None:
        self._state: CoordinatorState | None = None
        self._open: tuple[OpenRound, dict[str, bytes]] | None = None

    def load(self) -> CoordinatorState | None:
        return None if self._state is None else _copy(self._state)

    def save(self, state: CoordinatorState) -> None:
        self._state = _copy(state)

    def save_open_round(self, record: OpenRound) -> None:
        payloads = self._open[1] if self._open else {}
        self._open = (OpenRound.from_json(record.to_json()), payloads)

    def save_accepted(self, key: str, payload: bytes) -> None:
        if self._open is None:
            raise RuntimeError("an update was accepted with no open round recorded")
        self._open[1][key] = bytes(payload)

    def load_open_round(self) -> tuple[OpenRound, dict[str, bytes]] | None:
        if self._open is None:
            return None
        return _with_journalled(self._open[0], self._open[1]), dict(self._open[1])

    def clear_open_round(self) -> None:
        self._open = None


class FileStateStore(StateStore):
    """``state.json`` (round, history, devices, retained differences) + ``global-v{N}.msgpack``
    (the global devices hold) + ``mode-v{N}.msgpack`` (the mode's state at version N).

    The versioned files are written first, then ``state.json`` pointing at them, so a crash
    between the two leaves the previous consistent set in place; nothing depends on write order
    beyond that one rename.
    """

    def __init__(self, directory: str | Path, keep_globals: int = 2) -> None:
        self.dir = Path(directory)
        self.keep_globals = keep_globals

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def load(self) -> CoordinatorState | None:
        if not self.state_file.exists():
            return None
        obj = json.loads(self.state_file.read_text())
        if obj.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.state_file}: unsupported state format {obj.get('format')!r}")
        gm = None
        if obj.get("global_file"):
            gm = GlobalModel.from_msgpack((self.dir / obj["global_file"]).read_bytes())
        mode_state, retained = None, {int(v): int(n) for v, n in obj.get("retained_diffs") or []}
        # earlier releases: server-v{N}.msgpack (adapter) or zo-ledger.msgpack (zo) held the mode state
        mode_file = obj.get("mode_state_file") or obj.get("server_file") or obj.get("zo_ledger_file")
        if mode_file:
            mode_state = unpack_limited((self.dir / mode_file).read_bytes(), 1 << 34, "mode state")
            if isinstance(mode_state, dict) and "retained_diffs" in mode_state and not obj.get("mode_state_file"):
                retained = {int(v): int(n) for v, n in mode_state.pop("retained_diffs")}
        return CoordinatorState(
            round_completed=int(obj["round_completed"]),
            global_model=gm,
            history=[RoundSummary.from_obj(h) for h in obj.get("history", [])],
            devices={k: DeviceRecord.from_json(v) for k, v in obj.get("devices", {}).items()},
            mode_state=mode_state,
            retained_diffs=retained,
        )

    def save(self, state: CoordinatorState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        global_file = mode_file = None
        if state.global_model is not None:
            global_file = f"global-v{state.global_model.version}.msgpack"
            if not (self.dir / global_file).exists():
                atomic_write(self.dir / global_file, state.global_model.to_msgpack())
            if state.mode_state is not None:
                mode_file = f"mode-v{state.global_model.version}.msgpack"
                atomic_write(self.dir / mode_file, msgpack.packb(state.mode_state, use_bin_type=True))
        doc = {
            "format": STATE_FORMAT,
            "round_completed": state.round_completed,
            "global_version": state.global_version,
            "global_file": global_file,
            "mode_state_file": mode_file,
            "retained_diffs": [[v, n] for v, n in sorted(state.retained_diffs.items())],
            "history": [json.loads(h.to_json()) for h in state.history],
            "devices": {k: v.to_json() for k, v in state.devices.items()},
        }
        atomic_write(self.state_file, json.dumps(doc, indent=1).encode())
        self._prune(state.global_version)

    # The open round: ``open-round.json`` names the fan-out (task, selected devices, earlier
    # attempts), written when its tasks go out; each accepted update (or site partial) is its own
    # file ``open-{key}.msgpack``, exactly as received. The files are the list of what was
    # accepted: each appears complete or not at all (atomic rename), and the record is not
    # rewritten per update, so journalling one costs the same at the 5,000th update as at the first.
    @property
    def open_round_file(self) -> Path:
        return self.dir / "open-round.json"

    def save_open_round(self, record: OpenRound) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.open_round_file, json.dumps({"format": STATE_FORMAT, **record.to_json()}, indent=1).encode())

    def save_accepted(self, key: str, payload: bytes) -> None:
        atomic_write(self.dir / f"open-{key}.msgpack", bytes(payload))

    def load_open_round(self) -> tuple[OpenRound, dict[str, bytes]] | None:
        try:
            doc = json.loads(self.open_round_file.read_text())
        except (FileNotFoundError, ValueError):  # unreadable cannot happen with atomic writes
            return None
        if not isinstance(doc, dict) or doc.pop("format", None) != STATE_FORMAT:
            return None
        record = OpenRound.from_json(doc)
        payloads: dict[str, bytes] = {}
        for path in sorted(self.dir.glob("open-*.msgpack")):
            with contextlib.suppress(FileNotFoundError):
                payloads[path.name[len("open-"):-len(".msgpack")]] = path.read_bytes()
        return _with_journalled(record, payloads), payloads

    def clear_open_round(self) -> None:
        # payloads first: a crash in between leaves a record with fewer payloads (of a round whose
        # global is saved already, so it is discarded), never payloads a later record would adopt
        for p in self.dir.glob("open-*.msgpack"):
            p.unlink(missing_ok=True)
        self.open_round_file.unlink(missing_ok=True)

    def _prune(self, current: int) -> None:
        for pattern in ("global-v*.msgpack", "mode-v*.msgpack", "server-v*.msgpack"):
            for p in self.dir.glob(pattern):
                try:
                    v = int(p.stem.split("-v", 1)[1])
                except (IndexError, ValueError):
                    continue
                if v <= current - self.keep_globals:
                    p.unlink(missing_ok=True)
