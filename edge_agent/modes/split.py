"""Split learning (SplitFed, U-shape), agent side: the adapter mode over the device's part of the model.

The device trains the embedding's blocks and the tail with LoRA (``edge_agent.methods.split``);
every step exchanges activations and gradients with the split server over its own connection
(``edge_agent.split_link.SplitLink``). The global, the update (local minus global of the
device-side adapter) and its compression are the adapter mode's. The cut comes with every task
(``SplitTask``); it is kept in ``split-cut.json`` in the state dir, so a restarted device builds
the same trainer before its next task. Until a device has seen a cut it builds no trainer (a
retained global waits for the first task).

With a ``memory_budget`` the device's memory plan checks the task's cut against it
(``edge_agent.memory.estimator.estimate_split``): a cut whose estimate exceeds the budget is
refused (state ``refused``, announced) with a message naming the budget, the MiB the cut needs
and the largest smaller cut that fits (``edge_agent.memory.planner.choose_cut``). Every device of
a federation trains the task's cut (their device-side adapters average block by block), so the
cut is chosen for the smallest device by the operator (``fedmq split-plan``), not per device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.memory import PlanRefused
from edge_agent.modes import TrainerChoice, UpdateContent
from edge_agent.modes.adapter import AdapterMode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.split import SplitSpec, SplitTask
from fedmq_protocol.storage import atomic_write

if TYPE_CHECKING:
    from edge_agent.methods.base import FitResult, TrainingMethod
    from edge_agent.split_link import SplitLink
    from fedmq_protocol.messages import AdapterSpec, Task

log = logging.getLogger("fedmq.agent.split")


class CutUnknown(PlanRefused):
    """No split task has named the cut yet: no trainer can be built (the agent waits for a task)."""


class SplitMode(AdapterMode):
    name: ClassVar[str] = "split"
    methods: ClassVar[tuple[str, ...]] = ("split",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cut_file = Path(self.ctx.state_dir) / "split-cut.json"
        self.spec: SplitSpec | None = self._load_cut()
        self._link: SplitLink | None = None

    def _load_cut(self) -> SplitSpec | None:
        try:
            return SplitSpec.model_validate(json.loads(self._cut_file.read_text()))
        except (OSError, ValueError):
            return None

    @property
    def link(self) -> SplitLink:
        if self._link is None:
            from edge_agent.split_link import SplitLink

            self._link = SplitLink(self.ctx.config, self.ctx.topics)
        return self._link

    def planned_as(self, method: str) -> str:
        return "split"  # the estimator's split plan: the device's blocks of the task's cut

    def accept_task(self, task: Task) -> None:
        if task.kind == "init" and task.payload is None:
            return
        spec = task.payload_as(SplitTask, f"{task.kind} task") if task.payload is not None else None
        if spec is None:
            raise ProtocolError(f"split federation: {task.kind} task {task.task_id} names no cut (split payload)")
        cut = SplitSpec(**spec.model_dump())
        if cut != self.spec:
            self.spec = cut
            atomic_write(self._cut_file, cut.model_dump_json().encode())
        self.link.begin(task.task_id, cut)

    def choose_trainer(self, adapter: AdapterSpec) -> TrainerChoice:
        if self.spec is None:
            raise CutUnknown("split: no task has named the cut yet")
        s = self.spec
        self.ctx.memory_plan(adapter, cut=(s.l_head, s.l_tail))  # PlanRefused when the cut exceeds the budget
        return TrainerChoice("split", {"l_head": s.l_head, "l_tail": s.l_tail}, (adapter, s.l_head, s.l_tail),
                             f"split l_head={s.l_head} l_tail={s.l_tail} adapter r={adapter.r}")

    def trainer_loaded(self, trainer: TrainingMethod) -> None:
        super().trainer_loaded(trainer)
        trainer.link = self.link  # type: ignore[attr-defined]  # a SplitMethod (the only method of this mode)

    def prepare_fit(self, task: Task, trainer: TrainingMethod) -> dict[str, float]:
        from edge_agent.memory import meter

        meter().reset()  # the fit's peak: what the device's part costs while training
        return super().prepare_fit(task, trainer)

    def update_content(self, task: Task, trainer: TrainingMethod, result: FitResult) -> UpdateContent:
        from edge_agent.memory import meter
        from edge_agent.methods.split import stats_of

        content = super().update_content(task, trainer, result)
        metrics = {**content.metrics, **stats_of(trainer), "fit_peak_host_mb": float(meter().host_peak_mb())}
        return UpdateContent(metrics=metrics, arrays=content.arrays)


MODE = SplitMode
