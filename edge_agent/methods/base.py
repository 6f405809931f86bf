"""The trainer interface (``TrainingMethod``) and the pieces every method shares.

``TrainingMethod`` is what the agent runtime and the federation modes call: ``fit``, ``evaluate``,
``get_state`` / ``set_state`` (the trainable state: the adapter tensors of a LoRA method, the
trainable parameters of a zeroth-order one) and ``options_for`` (constructor keywords a method
takes from the agent's configuration). Methods load their base through an injected
``ModelLoader``, draw batches from one ``BatchSampler`` and get the memory plan's micro-batch and
per-step guard in each call (``FitMemory``). ``edge_agent.methods.causal_lm.CausalLmMethod``
implements the interface for a causal LM in memory.

This module does not import torch (the agent runtime imports it).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import gc
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from edge_agent.data import Example
from fedmq_protocol.messages import AdapterSpec, FitConfig

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig

Row = tuple[list[int], list[int]]  # (input_ids, labels) of one example
ProgressFn = Callable[[int, float], None]  # (step done, 1-based; its loss)
StopFn = Callable[[], bool]


def release_memory() -> None:
    """Give freed activation memory back to the OS (glibc keeps ~0.7 GB for SmolLM2 otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to do
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class FitResult:
    num_samples: int  # distinct local examples available to the fit (the FedAvg weight)
    steps: int  # optimizer steps done (< cfg.local_steps when stopped early)
    train_loss: float  # mean of the per-step losses (nan when no step was done)
    seconds: float
    tokens: int  # non-pad tokens processed


class StepGuard(Protocol):
    """Called around every training step; may stop the round by raising (edge_agent.memory.guard)."""

    def before_step(self, step: int) -> None: ...

    def after_step(self, step: int) -> None: ...


@dataclass
class FitMemory:
    """What a memory plan asks of ``fit`` and ``evaluate``: examples per forward (None: the whole
    batch) and a guard measuring every step. Filled in by the agent's memory manager."""

    micro_batch: int | None = None
    guard: StepGuard | None = None


NO_PLAN = FitMemory()


@dataclass(frozen=True)
class ModelLoader:
    """How a method's base model is loaded (``edge_agent.models.load_causal_lm``)."""

    quantize_4bit: bool = False  # a 4-bit NF4 base (bitsandbytes)

    def load(self, model_path: str, *, dtype: str, device: str) -> tuple[Any, Any]:
        """(model, tokenizer)."""
        from edge_agent.models import load_causal_lm

        return load_causal_lm(model_path, quantize_4bit=self.quantize_4bit, dtype=dtype, device=device)


FULL_PRECISION = ModelLoader()
NF4 = ModelLoader(quantize_4bit=True)


class BatchSampler:
    """Batches of example indices drawn without replacement by ``random.Random(seed)``, the order
    reshuffled at every pass over the examples; a batch never holds more than all of them."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples = num_examples
        self.size = min(batch_size, num_examples)
        self._rng = random.Random(seed)
        self._order: list[int] = []

    def next(self) -> list[int]:
        idx: list[int] = []
        while len(idx) < self.size:
            if not self._order:
                self._order = list(range(self.num_examples))
                self._rng.shuffle(self._order)
            idx.append(self._order.pop())
        return idx


class TrainingMethod(abc.ABC):
    """The trainer interface: local training of a model's trainable state."""

    name: ClassVar[str] = "base"
    device: str

    def __init__(self, model_path: str, adapter: AdapterSpec, **options: Any) -> None:
        """Trainers are built as ``cls(model_path, adapter, **options)``: the runtime passes
        ``device``, ``dtype``, ``seed``, the memory plan's or the mode's keywords and the method's
        ``options_for``."""
        self.model_path = model_path
        self.adapter_spec = adapter

    @classmethod
    def options_for(cls, config: AgentConfig) -> dict[str, Any]:
        """Constructor keywords this method takes from the agent's configuration."""
        return {}

    @abc.abstractmethod
    def fit(self, examples: Sequence[Example], cfg: FitConfig, *, memory: FitMemory | None = None,
            progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> FitResult:
        """``cfg.local_steps`` steps on batches of ``examples``. ``progress(step, loss)`` after each
        step; ``should_stop()`` before each; ``memory``: the memory plan's micro-batch and guard
        (the guard may stop the round by raising ``OverBudget``). Methods may take more keywords
        (a federation mode's ``fit_options``)."""

    @abc.abstractmethod
    def evaluate(self, examples: Sequence[Example], cfg: FitConfig, *,
                 memory: FitMemory | None = None) -> tuple[float, int]:
        """(mean loss over response tokens, examples evaluated)."""

    @abc.abstractmethod
    def get_state(self) -> dict[str, np.ndarray]:
        """The trainable state, float32 copies by name."""

    @abc.abstractmethod
    def set_state(self, tensors: Mapping[str, Any]) -> None:
        """Load the whole trainable state; validated first (ValueError naming a tensor), so nothing
        changes on error."""

    @abc.abstractmethod
    def num_trainable_params(self) -> int: ...
