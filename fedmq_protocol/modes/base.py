"""The base of every mode payload (the mode-specific part of a Task, Update or GlobalModel)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class ModePayload(BaseModel):
    """A mode's part of a message. On the wire it sits under the key named by ``mode`` (an
    externally tagged union: the key is the tag), so a message carries at most one."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: ClassVar[str] = ""
