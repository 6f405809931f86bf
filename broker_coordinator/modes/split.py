"""Split learning (SplitFed, U-shape), coordinator side: the adapter mode over the devices' part.

The global is the device-side LoRA (the embedding's and head blocks', the tail blocks'), averaged
each round exactly as the adapter mode averages a whole adapter (FedAvg or a robust rule, the
server optimizer, differences or snapshots on the downlink). The middle blocks' adapter never
reaches the coordinator: the split server keeps and persists it. Tasks carry the cut and the
activation codec (the ``split:`` section), so every device trains the same cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker_coordinator.modes.adapter import AdapterMode
from fedmq_protocol.messages import TaskKind
from fedmq_protocol.modes.split import SplitSpec, SplitTask

if TYPE_CHECKING:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.state import DeviceRecord


class SplitMode(AdapterMode):
    name = "split"

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        spec = config.mode_options
        self.spec = spec if isinstance(spec, SplitSpec) else SplitSpec()

    def accepts(self, device: DeviceRecord) -> bool:
        """Devices that train their part of the split (a device announcing no plan is taken)."""
        plan = device.plan
        return plan is None or plan.get("method") in ("split", "lora")

    def task_payload(self, kind: TaskKind, round_no: int) -> SplitTask | None:
        return SplitTask(**self.spec.model_dump()) if kind in ("fit", "evaluate", "init") else None


MODE = SplitMode
