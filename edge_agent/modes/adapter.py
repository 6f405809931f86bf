"""The adapter mode (FedAvg of LoRA adapters), agent side.

The global is the adapter's tensors: snapshots and differences reach the agent through
``fedmq_protocol.globals.GlobalSync`` and are set into the trainer as they are. A fit's update is
the local adapter minus the global it started from (the runtime's uplink encoder compresses it,
with error feedback); an init's is the freshly initialised adapter. The trainer is the one the
memory plan names (lora, qlora, or zo-adapter as the fallback of a small budget), else the
configured method.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge_agent.modes import AgentMode, GlobalRejected, TrainerChoice, UpdateContent, tensor_digest

if TYPE_CHECKING:
    from edge_agent.methods.base import FitResult, TrainingMethod
    from fedmq_protocol.globals import GlobalSync
    from fedmq_protocol.messages import AdapterSpec, Task


class AdapterMode(AgentMode):
    name: ClassVar[str] = "adapter"
    methods: ClassVar[tuple[str, ...]] = ("lora", "qlora")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the tensors of the global the trainer was last reset to (None: none applied yet)
        self.global_arrays: dict[str, np.ndarray] | None = None

    def choose_trainer(self, adapter: AdapterSpec) -> TrainerChoice:
        plan = self.ctx.memory_plan(adapter)
        name, kwargs = plan.method_spec() if plan is not None else (self.ctx.config.method, {})
        key = (adapter, plan.build_key if plan is not None else None)
        return TrainerChoice(name, kwargs, key, f"{name} adapter r={adapter.r}")

    def trainer_loaded(self, trainer: TrainingMethod) -> None:
        self.global_arrays = None

    def apply_global(self, trainer: TrainingMethod, version: int, sync: GlobalSync) -> None:
        arrays = sync.arrays
        assert arrays is not None
        try:
            trainer.set_state(arrays)  # raises ValueError naming a mismatching tensor
        except ValueError as exc:
            raise GlobalRejected("global", f"does not fit the adapter: {exc}") from None
        self.global_arrays = arrays

    def return_to_global(self, trainer: TrainingMethod) -> None:
        if self.global_arrays is not None:
            trainer.set_state(self.global_arrays)

    def global_digest(self) -> str:
        return tensor_digest(self.global_arrays or {})

    def update_content(self, task: Task, trainer: TrainingMethod, result: FitResult) -> UpdateContent:
        t0 = time.perf_counter()
        local = trainer.get_state()
        if self.global_arrays is None:
            raise RuntimeError(f"task {task.task_id} was trained without a global")
        delta = {k: local[k] - self.global_arrays[k] for k in self.global_arrays}
        return UpdateContent(metrics={"tokens": float(result.tokens), "diff_s": time.perf_counter() - t0},
                             arrays=delta)

    def init_content(self, trainer: TrainingMethod) -> UpdateContent:
        return UpdateContent(arrays=trainer.get_state())


MODE = AdapterMode
