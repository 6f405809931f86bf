"""LoRA on a full-precision base (float32 by default, bfloat16 allowed)."""

from __future__ import annotations

from typing import Any, ClassVar

from edge_agent.methods.base import TrainingMethod
from fedmq_protocol.messages import AdapterSpec


class LoraMethod(TrainingMethod):
    name: ClassVar[str] = "lora"
    quantize_4bit: ClassVar[bool] = False

    def __init__(
        self,
        model_path: str,
        adapter: AdapterSpec,
        *,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        """``gradient_checkpointing``: recompute activations in backward (less memory, ~30%
        more compute)."""
        self.gradient_checkpointing = gradient_checkpointing
        super().__init__(model_path, adapter, device=device, dtype=dtype, seed=seed)

    def _prepare_base(self, model: Any) -> Any:
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model
