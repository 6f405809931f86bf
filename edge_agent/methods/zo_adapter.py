"""Zeroth-order training of the LoRA adapter inside an adapter (FedAvg) federation.

The fallback of a device whose memory budget holds no gradient plan (edge_agent.memory.planner):
MeZO steps (two forward passes, no gradients, no optimizer state) on the same LoRA adapter over
an NF4 base that the other devices train with gradients. The seed stream is local (drawn from the
round's fit seed); what leaves the device is an ordinary adapter difference (the trainable state
is the adapter), so the coordinator aggregates it with the others'. (In a zeroth-order federation
the agent uses ``ZoMethod`` itself and uploads seeds instead.)

Registered as ``zo-adapter``: agents reach it through their memory plan, configs do not name it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.data import Example
from edge_agent.methods.base import FitResult
from edge_agent.methods.zo import ZoMethod
from fedmq_protocol.messages import AdapterSpec, FitConfig
from fedmq_protocol.modes.zo import ZoSpec

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig


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
        **method_kwargs: Any,  # ZoMethod's: device, dtype, seed, workers, backend, loader, ...
    ) -> None:
        if target != "lora":
            raise ValueError("zeroth-order training in an adapter federation trains the LoRA adapter (target lora)")
        super().__init__(model_path, adapter, target="lora", **method_kwargs)
        self.zo_lr, self.zo_eps, self.num_seeds = lr, eps, num_seeds

    @classmethod
    def options_for(cls, config: AgentConfig) -> dict[str, Any]:
        """The fallback's step and perturbation (``memory_budget.zo_lr`` / ``zo_eps``)."""
        mb = config.memory_budget
        return {**super().options_for(config), **({"lr": mb.zo_lr, "eps": mb.zo_eps} if mb is not None else {})}

    def local_spec(self, cfg: FitConfig) -> ZoSpec:
        return ZoSpec(seed=cfg.seed, num_seeds=self.num_seeds, eps=self.zo_eps, lr=self.zo_lr,
                      direction="gaussian", target="lora", pro=False, base_fingerprint=None)

    def fit(self, examples: Sequence[Example], cfg: FitConfig, *, spec: ZoSpec | None = None,
            **fit_kwargs: Any) -> FitResult:
        """``cfg.local_steps`` MeZO steps along directions of the round's local seed stream."""
        return super().fit(examples, cfg, spec=spec or self.local_spec(cfg), **fit_kwargs)
