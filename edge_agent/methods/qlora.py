"""QLoRA: 4-bit NF4 (double-quantized) base via bitsandbytes, LoRA on top in float32.

Works on CPU with bitsandbytes >= 0.45 (compute dtype float32 there, bfloat16 on CUDA).
``prepare_model_for_kbit_training`` (peft) is applied: it freezes the base, upcasts the
non-quantized fp16/bf16 parameters to fp32 and makes inputs require grad; gradient
checkpointing is off by default (it saves activation memory at ~30% more compute).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

from edge_agent.methods.base import NF4, ModelLoader
from edge_agent.methods.lora import LoraMethod


def disable_cpu_inference_packing(model: Any) -> int:
    """Keep bitsandbytes' Linear4bit weights in the trainable layout on CPU.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit weight for a fast
    inference kernel (``gemv_4bit``) on the first eval-mode no-grad forward, and never unpacks
    it: every later forward, training included, then goes through ``gemv_4bit``, which has no
    autograd formula, so gradients through the frozen base are silently dropped (LoRA params
    of earlier layers get no or wrong gradients). Turn that optimisation off and unpack any
    weight already packed. Returns the number of 4-bit modules seen.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - qlora needs bitsandbytes anyway
        return 0
    import bitsandbytes.functional as bnb_functional

    # absent from older bitsandbytes, which does no CPU packing at all
    unpack: Callable[..., Any] | None = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            n += 1
            module.support_avx512bf16_for_cpu = False
            w: Any = module.weight  # a bitsandbytes Params4bit: carries its quant_state
            qs = getattr(w, "quant_state", None)
            if unpack is not None and qs is not None and getattr(qs, "packing_format_for_cpu", False):
                w.data, w.quant_state = unpack(w.data, qs)
    return n


class QLoraMethod(LoraMethod):
    name: ClassVar[str] = "qlora"
    default_loader: ClassVar[ModelLoader] = NF4

    def _prepare_base(self, model: Any) -> Any:
        from peft import prepare_model_for_kbit_training

        disable_cpu_inference_packing(model)

        kwargs: dict[str, Any] = {"use_gradient_checkpointing": self.gradient_checkpointing}
        if self.gradient_checkpointing:
            kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            return prepare_model_for_kbit_training(model, **kwargs)

    def _before_train(self) -> None:
        disable_cpu_inference_packing(self.model)  # cheap; guards against a repack from outside
