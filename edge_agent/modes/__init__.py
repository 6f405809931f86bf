"""The agent side of federation modes: one module per mode, found by the mode's name.

``edge_agent.modes.<name>`` defines ``MODE``, an :class:`AgentMode` subclass. The agent runtime
(``edge_agent.agent.EdgeAgent``: connection, presence, the task loop, liveness, memory budgets,
update building, signing and publishing) calls only this interface, so it knows no mode. A mode is
given an :class:`AgentContext`, never the agent itself.

Importing this package or a mode module does not import torch (trainers are built by the runtime
through ``edge_agent.methods.get_method``).
"""

from __future__ import annotations

import hashlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from fedmq_protocol.modes import DEFAULT_MODE, MODES, ModePayload, check_mode
from fedmq_protocol.topics import QOS_GLOBAL

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.memory import Plan
    from edge_agent.methods.base import FitResult, TrainingMethod
    from fedmq_protocol.globals import GlobalSync
    from fedmq_protocol.messages import AdapterSpec, Task
    from fedmq_protocol.topics import Topics


@dataclass(frozen=True)
class AgentContext:
    """What a mode may use of the agent: its configuration, topics, state directory, and the
    memory plan for an adapter (``PlanRefused`` when none fits the budget; the agent announces it)."""

    config: AgentConfig
    topics: Topics
    state_dir: Path
    # (adapter, **planner inputs, e.g. zo_target) -> the plan (None: the model's shape is unknown)
    memory_plan: Callable[..., Plan | None]

    @property
    def max_message_bytes(self) -> int:
        return self.config.broker.max_message_bytes


@dataclass(frozen=True)
class Subscription:
    """An extra topic a mode listens on; its messages reach ``AgentMode.on_message`` as ``kind``
    (also the key its rejections are counted under)."""

    topic: str
    kind: str
    qos: int = QOS_GLOBAL
    framed: bool = True  # large messages in chunks (fedmq_protocol.chunking), as the globals


@dataclass(frozen=True)
class TrainerChoice:
    """Which training method to build (``edge_agent.methods`` registry name), the constructor
    keywords besides model path and adapter (the runtime adds device, dtype, seed and the method's
    ``options_for``), and a key: a loaded trainer with the same key is reused."""

    method: str
    kwargs: Mapping[str, Any]
    key: Hashable
    what: str  # for the log: "lora adapter r=8"


@dataclass(frozen=True)
class UpdateContent:
    """A mode's part of an update: extra metrics, tensors (a fit's go through the uplink encoder:
    byte budget, error feedback; an init's travel exactly) and/or the mode's payload."""

    metrics: Mapping[str, float] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] | None = None
    payload: ModePayload | None = None


class GlobalRejected(Exception):
    """The newest global cannot be applied to this device's model; the agent forgets it, counts a
    rejection of ``kind`` and waits for the next one."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class AgentMode(ABC):
    """One way of federating, agent side. Hooks are called on the agent's main thread."""

    name: ClassVar[str]
    #: the training methods an agent of this mode may be configured with (``method:``)
    methods: ClassVar[tuple[str, ...]]
    #: the device's status names its tokenizer (modes federating different models that must share one)
    announces_tokenizer: ClassVar[bool] = False

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx

    # -- messages ---------------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        """Topics besides the task and global topics."""
        return []

    def on_message(self, kind: str, topic: str, payload: bytes) -> None:  # noqa: B027 - optional hook, a no-op by default
        """A message of one of ``subscriptions()``; ProtocolError to reject it."""

    def accept_task(self, task: Task) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Check the task's mode payload (ProtocolError to reject the task) and note what the mode
        needs of it."""

    # -- the trainer ------------------------------------------------------------------------
    @abstractmethod
    def choose_trainer(self, adapter: AdapterSpec) -> TrainerChoice:
        """The trainer for ``adapter`` (asks ``ctx.memory_plan``; PlanRefused passes through)."""

    def planned_as(self, method: str) -> str:
        """The training method whose memory estimate bounds ``method`` for the memory planner
        (edge_agent.memory.estimator knows lora, qlora, zo and krso); a new trainer names the closest."""
        return method

    def trainer_loaded(self, trainer: TrainingMethod) -> None:  # noqa: B027 - optional hook, a no-op by default
        """A freshly loaded model: it holds no global yet."""

    # -- the global -------------------------------------------------------------------------
    def needs_reload(self, version: int) -> bool:
        """Whether global ``version`` can only be reached from a freshly loaded model."""
        return False

    def can_reach(self, version: int) -> bool:
        """Whether everything needed to apply global ``version`` has arrived."""
        return True

    @abstractmethod
    def apply_global(self, trainer: TrainingMethod, version: int, sync: GlobalSync) -> None:
        """Bring the trainer (holding the global last applied, or a fresh model) to ``version``,
        the newest global ``sync`` holds; GlobalRejected when this model cannot take it."""

    @abstractmethod
    def return_to_global(self, trainer: TrainingMethod) -> None:
        """Undo local training: the trainer holds the global last applied again, exactly."""

    def global_digest(self) -> str:
        """Names the global the trainer was reset to; a task answered from the same task id and
        digest is answered with the same bytes again."""
        return tensor_digest({})

    def state_record(self, version: int, trainer: TrainingMethod) -> dict[str, Any] | None:
        """What the agent writes to ``{name}-state.json`` in its state dir after applying a global
        (None: no file)."""
        return None

    # -- training ---------------------------------------------------------------------------
    def check_fit(self, task: Task, trainer: TrainingMethod) -> None:  # noqa: B027 - optional hook, a no-op by default
        """ValueError: the task is refused (logged, no update)."""

    def prepare_fit(self, task: Task, trainer: TrainingMethod) -> dict[str, float]:
        """Just before local training (e.g. keep what ``return_to_global`` needs); returns metrics."""
        return {}

    def fit_options(self, task: Task) -> dict[str, Any]:
        """Keywords of the trainer's ``fit`` besides examples, settings, memory and callbacks."""
        return {}

    @abstractmethod
    def update_content(self, task: Task, trainer: TrainingMethod, result: FitResult) -> UpdateContent:
        """What a fit's update carries."""

    def init_content(self, trainer: TrainingMethod) -> UpdateContent:
        """What the answer to an ``init`` task carries (default: nothing)."""
        return UpdateContent()


def tensor_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named tensors (names, shapes, float32 values), in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype=np.float32)
        h.update(f"{name}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


_T = TypeVar("_T")


def trainer_as(trainer: TrainingMethod, cls: type[_T], mode: str) -> _T:
    """``trainer`` as the trainer class ``mode`` needs; TypeError naming both otherwise."""
    if not isinstance(trainer, cls):
        raise TypeError(f"the {mode} mode trains with {cls.__name__}, not {type(trainer).__name__}")
    return trainer


def mode_class(name: str) -> type[AgentMode]:
    """The agent side of mode ``name`` (``edge_agent.modes.<name>.MODE``)."""
    check_mode(name)
    cls: type[AgentMode] = importlib.import_module(f"edge_agent.modes.{name}").MODE
    return cls


def default_mode(method: str) -> str:
    """The mode an agent configured with training method ``method`` runs when its config names
    none: the mode of that name (``method: zo``), else the default (adapter)."""
    return method if method in MODES else DEFAULT_MODE


def create_mode(ctx: AgentContext) -> AgentMode:
    """The agent side of the configured mode."""
    return mode_class(ctx.config.mode)(ctx)


__all__ = ["AgentContext", "AgentMode", "GlobalRejected", "Subscription", "TrainerChoice", "UpdateContent",
           "create_mode", "default_mode", "mode_class", "tensor_digest"]
