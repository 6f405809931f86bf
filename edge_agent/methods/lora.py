"""LoRA trained with gradients (AdamW) on a full-precision base (float32 by default, bfloat16 allowed)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from edge_agent.data import Example
from edge_agent.methods.base import NO_PLAN, FitMemory, FitResult, ProgressFn, Row, StopFn, release_memory
from edge_agent.methods.causal_lm import CausalLmMethod
from fedmq_protocol.messages import AdapterSpec, FitConfig

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig


class LoraMethod(CausalLmMethod):
    """Base model + peft LoRA adapter; the trainable state is the adapter."""

    name: ClassVar[str] = "lora"

    def __init__(self, model_path: str, adapter: AdapterSpec, *, gradient_checkpointing: bool = False,
                 **common: Any) -> None:
        """``gradient_checkpointing``: recompute activations in backward (less memory, ~30% more
        compute). ``common``: CausalLmMethod's keywords (device, dtype, seed, loader)."""
        self.gradient_checkpointing = gradient_checkpointing
        super().__init__(model_path, adapter, **common)

    @classmethod
    def options_for(cls, config: AgentConfig) -> dict[str, Any]:
        extra = {"gradient_checkpointing": True} if config.training.gradient_checkpointing else {}
        return {**super().options_for(config), **extra}

    def _build(self, base: Any) -> tuple[Any, dict[str, torch.nn.Parameter]]:
        return self._attach_lora(self._prepare_base(base))

    # -- hooks --------------------------------------------------------------------------------
    def _prepare_base(self, model: Any) -> Any:
        """Called on the loaded base before the adapter is attached."""
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model

    def _before_train(self) -> None:
        """Called at the start of every ``fit``."""

    # -- adapter I/O (the trainable state) ----------------------------------------------------
    def get_adapter(self) -> dict[str, np.ndarray]:
        return self.get_state()

    def set_adapter(self, tensors: Mapping[str, Any]) -> None:
        self.set_state(tensors)

    # -- training -----------------------------------------------------------------------------
    def fit(self, examples: Sequence[Example], cfg: FitConfig, *, memory: FitMemory | None = None,
            progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> FitResult:
        """``cfg.local_steps`` AdamW steps. With ``memory.micro_batch`` smaller than the batch,
        gradients are accumulated over micro-batches (each loss weighted by its share of the
        batch's response tokens: the same objective as one pass). ``memory.guard`` (if set) is
        called around each step and may stop the round by raising ``OverBudget``."""
        if not examples:
            raise ValueError("fit needs at least one example")
        plan = memory or NO_PLAN
        guard = plan.guard
        self._before_train()
        encoded = [self._encode(ex, cfg.max_seq_len) for ex in examples]
        params = [p for p in self._params.values() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

        def step(i: int, rows: list[Row], opt: torch.optim.Optimizer = opt) -> tuple[float, int]:
            if guard is not None:
                guard.before_step(i + 1)
            opt.zero_grad(set_to_none=True)
            lv, n_tok = self._accumulate(rows, i, plan.micro_batch)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            if guard is not None:
                guard.after_step(i + 1)
            return lv, n_tok

        t0 = time.perf_counter()
        self.model.train()
        try:
            with self._rng_guard(cfg.seed):
                losses, tokens = self._train_steps(encoded, cfg, step, progress=progress, should_stop=should_stop)
        finally:
            self.model.eval()
            opt.zero_grad(set_to_none=True)
            del opt, step  # the optimizer state goes before the memory is given back
            release_memory()
        return self._result(examples, losses, tokens, t0)

    def _accumulate(self, rows: Sequence[Row], step: int, micro_batch: int | None) -> tuple[float, int]:
        """Forward and backward of one batch, in micro-batches of ``micro_batch`` rows. Returns
        (the batch's loss, non-pad tokens)."""
        mb = micro_batch or len(rows)
        if mb >= len(rows):
            batch = self._collate(rows)
            loss = self.model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {step + 1}")
            loss.backward()
            return float(loss.detach()), int(batch["attention_mask"].sum())
        # the model's loss is a mean over the response tokens of its input (labels shifted by one)
        counts = [sum(1 for t in lab[1:] if t != -100) for _, lab in rows]
        total = sum(counts)
        value, tokens = 0.0, 0
        for start in range(0, len(rows), mb):
            part = rows[start:start + mb]
            share = sum(counts[start:start + mb]) / total if total else len(part) / len(rows)
            if share == 0:
                continue
            batch = self._collate(part)
            loss = self.model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {step + 1}")
            (loss * share).backward()
            value += float(loss.detach()) * share
            tokens += int(batch["attention_mask"].sum())
            del loss, batch
        return value, tokens
