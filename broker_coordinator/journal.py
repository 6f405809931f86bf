"""The open-round journal: what a coordinator must know to resume the round it was in.

A fit fan-out is journalled when its tasks go out; every accepted update (or site partial) is then
journalled on its own, its payload kept exactly as received beside the record, and those payloads
are the list of what was accepted. A restarted coordinator reads them back,
re-checks every kept payload as if it had just arrived, and continues the same round: devices
that already answered are not asked again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _nonce_hex(nonce: bytes | None) -> str | None:
    return nonce.hex() if nonce else None


def _nonce_bytes(value: Any, where: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: nonce must be hex text")
    return bytes.fromhex(value)


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of device ids")
    return list(value)


@dataclass(frozen=True)
class EarlierAttempt:
    """Updates accepted under an earlier attempt of the round; they count in the current one."""

    task_id: str
    nonce: bytes | None
    devices: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "nonce": _nonce_hex(self.nonce), "devices": sorted(self.devices)}

    @classmethod
    def from_json(cls, obj: Any) -> EarlierAttempt:
        if not isinstance(obj, dict) or not isinstance(obj.get("task_id"), str):
            raise ValueError("earlier attempt: expected a map with task_id")
        return cls(obj["task_id"], _nonce_bytes(obj.get("nonce"), "earlier attempt"),
                   tuple(_str_list(obj.get("devices", []), "earlier attempt devices")))


@dataclass(frozen=True)
class OpenRound:
    """The fit fan-out in progress: its task and the selected devices (the JSON of
    ``open-round.json``). ``accepted`` and ``partials`` are filled when it is read back, from the
    journalled payloads; the record on disk does not list them."""

    task_id: str
    round: int
    base_version: int
    attempt: int
    selected: tuple[str, ...]
    accepted: tuple[str, ...] = ()
    nonce: bytes | None = None
    earlier: tuple[EarlierAttempt, ...] = field(default_factory=tuple)
    kind: str = "fit"
    partials: tuple[str, ...] = ()  # journal keys of the accepted site partials (their payloads are kept)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "task_id": self.task_id, "kind": self.kind, "round": self.round, "base_version": self.base_version,
            "attempt": self.attempt, "selected": sorted(self.selected), "earlier": [e.to_json() for e in self.earlier],
        }
        if self.accepted:
            doc["accepted"] = sorted(self.accepted)
        if self.partials:
            doc["partials"] = sorted(self.partials)
        if self.nonce is not None:
            doc["nonce"] = self.nonce.hex()
        return doc

    @classmethod
    def from_json(cls, obj: Any) -> OpenRound:
        """ValueError naming the field when ``obj`` is not a journal record."""
        if not isinstance(obj, dict):
            raise ValueError("open round: expected a map")
        for key in ("round", "base_version", "attempt"):
            if not isinstance(obj.get(key), int) or isinstance(obj.get(key), bool):
                raise ValueError(f"open round: {key} must be an integer")
        if not isinstance(obj.get("task_id"), str) or not isinstance(obj.get("kind", "fit"), str):
            raise ValueError("open round: task_id and kind must be text")
        return cls(
            task_id=obj["task_id"], kind=obj.get("kind", "fit"), round=obj["round"],
            base_version=obj["base_version"], attempt=obj["attempt"],
            selected=tuple(_str_list(obj.get("selected", []), "open round selected")),
            accepted=tuple(_str_list(obj.get("accepted", []), "open round accepted")),
            nonce=_nonce_bytes(obj.get("nonce"), "open round"),
            earlier=tuple(EarlierAttempt.from_json(e) for e in obj.get("earlier") or []),
            partials=tuple(_str_list(obj.get("partials", []), "open round partials")),
        )
