"""Coordinator state behind one interface: in memory (tests, demos) or on disk (production).

The file store writes atomically (temp file, fsync, rename, fsync dir) after every completed
round, so a coordinator killed at any instant restarts from the last completed round with a
global adapter that matches its round counter. While a round is open, every accepted update is
written too (``save_open_round``), so a restarted coordinator resumes that round without asking
the devices again.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from fedmq_protocol.messages import GlobalModel, RoundSummary, unpack_limited
from fedmq_protocol.storage import atomic_write  # noqa: F401  (re-exported: older imports)
from fedmq_protocol.modes.zo import ZoLedgerRound

STATE_FORMAT = 1


@dataclass
class DeviceRecord:
    """What the coordinator knows of one device, from its presence messages and results."""

    device_id: str
    online: bool = False
    seq: int = -1
    last_seen: float = 0.0
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
    def from_json(cls, obj: dict[str, Any]) -> "DeviceRecord":
        known = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class CoordinatorState:
    """Everything needed to resume: the last completed round and the global it produced."""

    round_completed: int = 0  # 0: nothing trained yet (round 0 is the baseline evaluation)
    global_model: GlobalModel | None = None
    history: list[RoundSummary] = field(default_factory=list)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    # exact (optimizer) weights, optimizer moments, retained differences: broker_coordinator.downlink
    server: dict[str, Any] | None = None
    # zeroth-order federations: the global is the base checkpoint + this seed ledger (rounds 1..N)
    zo_ledger: list[ZoLedgerRound] = field(default_factory=list)

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
    def save_open_round(self, doc: dict[str, Any], device_id: str | None = None, payload: bytes | None = None) -> None:
        """Record the open round ``doc`` (task id, round, base version, attempt, selected devices,
        ``accepted`` device ids) and, when given, the accepted update ``payload`` of ``device_id``."""

    def load_open_round(self) -> tuple[dict[str, Any], dict[str, bytes]] | None:
        """The open round recorded before a crash and its accepted update payloads, or None."""
        return None

    def clear_open_round(self) -> None:
        """Forget the open round (it was aggregated or abandoned)."""


class InMemoryStateStore(StateStore):
    def __init__(self) -> None:
        self._state: CoordinatorState | None = None

    def load(self) -> CoordinatorState | None:
        return self._state

    _open: tuple[dict[str, Any], dict[str, bytes]] | None = None

    def save_open_round(self, doc: dict[str, Any], device_id: str | None = None, payload: bytes | None = None) -> None:
        payloads = dict(self._open[1]) if self._open and self._open[0].get("task_id") == doc.get("task_id") else {}
        if device_id is not None and payload is not None:
            payloads[device_id] = bytes(payload)
        self._open = (json.loads(json.dumps(doc)), payloads)

    def load_open_round(self) -> tuple[dict[str, Any], dict[str, bytes]] | None:
        return self._open

    def clear_open_round(self) -> None:
        self._open = None

    def save(self, state: CoordinatorState) -> None:
        self._state = CoordinatorState(
            round_completed=state.round_completed,
            global_model=state.global_model,
            history=list(state.history),
            devices={k: DeviceRecord.from_json(v.to_json()) for k, v in state.devices.items()},
            server=state.server,
            zo_ledger=list(state.zo_ledger),
        )


class FileStateStore(StateStore):
    """``state.json`` (round, history, devices) + ``global-v{N}.msgpack`` (the adapter devices hold)
    + ``server-v{N}.msgpack`` (exact weights and server optimizer state).

    The global is written first under a versioned name, then ``state.json`` pointing at it, so a
    crash between the two leaves the previous consistent pair in place.
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
        round_completed = int(obj["round_completed"])
        ledger: list[ZoLedgerRound] = []
        if obj.get("zo_ledger_file"):
            raw = msgpack.unpackb((self.dir / obj["zo_ledger_file"]).read_bytes(), raw=False)
            # written before state.json: a crash in between may leave one round too many
            ledger = [e for e in (ZoLedgerRound.model_validate(x) for x in raw) if e.round <= round_completed]
        return CoordinatorState(
            round_completed=round_completed,
            global_model=gm,
            history=[RoundSummary.from_obj(h) for h in obj.get("history", [])],
            devices={k: DeviceRecord.from_json(v) for k, v in obj.get("devices", {}).items()},
            server=unpack_limited((self.dir / obj["server_file"]).read_bytes(), 1 << 34, "server state")
            if obj.get("server_file") else None,
            zo_ledger=ledger,
        )

    def save(self, state: CoordinatorState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        global_file = None
        if state.global_model is not None:
            global_file = f"global-v{state.global_model.version}.msgpack"
            if not (self.dir / global_file).exists():
                atomic_write(self.dir / global_file, state.global_model.to_msgpack())
        server_file = None
        if state.server is not None and state.global_model is not None:
            # rewritten every save: it also records which differences are retained on the broker
            server_file = f"server-v{state.global_model.version}.msgpack"
            atomic_write(self.dir / server_file, msgpack.packb(state.server, use_bin_type=True))
        ledger_file = None
        if state.zo_ledger:
            ledger_file = "zo-ledger.msgpack"
            atomic_write(self.dir / ledger_file, msgpack.packb(
                [e.model_dump(by_alias=True, mode="python") for e in state.zo_ledger], use_bin_type=True))
        doc = {
            "format": STATE_FORMAT,
            "zo_ledger_file": ledger_file,
            "round_completed": state.round_completed,
            "global_version": state.global_version,
            "global_file": global_file,
            "server_file": server_file,
            "history": [json.loads(h.to_json()) for h in state.history],
            "devices": {k: v.to_json() for k, v in state.devices.items()},
        }
        atomic_write(self.state_file, json.dumps(doc, indent=1).encode())
        self._prune(state.global_version)

    # The open round: ``open-round.json`` names the task and the accepted devices; each accepted
    # update's payload (exactly as received) is ``open-{device}.msgpack``, written before the
    # json that lists it, so a crash leaves a list whose every file is complete.
    @property
    def open_round_file(self) -> Path:
        return self.dir / "open-round.json"

    def save_open_round(self, doc: dict[str, Any], device_id: str | None = None, payload: bytes | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if device_id is not None and payload is not None:
            atomic_write(self.dir / f"open-{device_id}.msgpack", bytes(payload))
        atomic_write(self.open_round_file, json.dumps({"format": STATE_FORMAT, **doc}, indent=1).encode())

    def load_open_round(self) -> tuple[dict[str, Any], dict[str, bytes]] | None:
        try:
            doc = json.loads(self.open_round_file.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # cannot happen with atomic writes; treat as no open round
        if doc.get("format") != STATE_FORMAT:
            return None
        payloads: dict[str, bytes] = {}
        for device_id in doc.get("accepted", []):
            try:
                payloads[device_id] = (self.dir / f"open-{device_id}.msgpack").read_bytes()
            except FileNotFoundError:
                pass
        return doc, payloads

    def clear_open_round(self) -> None:
        self.open_round_file.unlink(missing_ok=True)
        for p in self.dir.glob("open-*.msgpack"):
            p.unlink(missing_ok=True)

    def _prune(self, current: int) -> None:
        for p in [*self.dir.glob("global-v*.msgpack"), *self.dir.glob("server-v*.msgpack")]:
            try:
                v = int(p.stem.split("-v", 1)[1])
            except (IndexError, ValueError):
                continue
            if v <= current - self.keep_globals:
                p.unlink(missing_ok=True)
