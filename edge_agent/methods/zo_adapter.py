"""Zeroth-order training of the LoRA adapter inside an adapter (FedAvg) federation.

The fallback of a device whose memory budget holds no gradient plan (edge_agent.memory.planner):
MeZO steps (two forward passes, no gradients, no optimizer state) on the same LoRA adapter over
an NF4 base that the other devices train with gradients. The seed stream is local (drawn from the
round's fit seed); what leaves the device is an ordinary adapter difference, so the coordinator
aggregates it with the others'. (In a zeroth-order federation the agent uses ``ZoMethod`` itself
and uploads seeds instead.)

Not in the method registry: agents choose it through their memory plan, not by name.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from edge_agent.data import Example
from edge_agent.methods.base import FitResult, TrainingMethod
from edge_agent.methods.zo import ZoMethod
from fedmq_protocol.messages import AdapterSpec, FitConfig
from fedmq_protocol.modes.zo import ZoSpec


class ZoAdapterMethod(ZoMethod):
    name: ClassVar[str] = "zo-adapter"

    def __init__(
        self,
        model_path: str,
        adapter: AdapterSpec,
        *,
        lr: float = 1e-4,
        eps: float = 1e-3,
        num_seeds: int = 4096,
        target: str = "lora",
        **method_kwargs: Any,  # ZoMethod's: device, dtype, seed, workers, backend, ...
    ) -> None:
        if target != "lora":
            raise ValueError("zeroth-order training in an adapter federation trains the LoRA adapter (target lora)")
        super().__init__(model_path, adapter, target="lora", **method_kwargs)
        self.zo_lr, self.zo_eps, self.num_seeds = lr, eps, num_seeds

    def get_adapter(self) -> dict[str, np.ndarray]:
        return TrainingMethod.get_adapter(self)  # the adapter travels (ZoMethod's global is a ledger)

    def local_spec(self, cfg: FitConfig) -> ZoSpec:
        return ZoSpec(seed=cfg.seed, num_seeds=self.num_seeds, eps=self.zo_eps, lr=self.zo_lr,
                      direction="gaussian", target="lora")

    def fit(self, examples: Sequence[Example], cfg: FitConfig, *, spec: ZoSpec | None = None,
            **fit_kwargs: Any) -> FitResult:
        """``cfg.local_steps`` MeZO steps along directions of the round's local seed stream."""
        return super().fit(examples, cfg, spec=spec or self.local_spec(cfg), **fit_kwargs)
