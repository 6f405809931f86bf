"""The training-method interface: a base model with a peft LoRA adapter, trained locally.

Randomness never touches the global RNGs permanently: LoRA init draws ``lora_A`` from a CPU
``torch.Generator`` seeded with ``seed`` (identical on CPU and CUDA devices), batches are drawn
with ``random.Random(cfg.seed)``, and dropout inside ``fit`` runs under ``torch.random.fork_rng``
seeded with ``cfg.seed`` so a fit is reproducible and the caller's RNG state is restored.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import gc
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from edge_agent.data import Example, format_prompt
from edge_agent.models import load_causal_lm, resolve_device
from fedmq_protocol.messages import AdapterSpec, FitConfig

ADAPTER_NAME = "default"
_TOKEN_CACHE_MAX = 200_000


def _release_memory() -> None:
    """Give freed activation memory back to the OS (glibc keeps ~0.7 GB for SmolLM2 otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to do
            pass


@dataclass(frozen=True)
class FitResult:
    num_samples: int  # distinct local examples available to the fit (the FedAvg weight)
    steps: int  # optimizer steps done (< cfg.local_steps when stopped early)
    train_loss: float  # mean of the per-step losses (nan when no step was done)
    seconds: float
    tokens: int  # non-pad tokens processed


class TrainingMethod(abc.ABC):
    """Base model + LoRA adapter. Subclasses choose how the base is loaded."""

    name: ClassVar[str] = "base"
    quantize_4bit: ClassVar[bool] = False

    def __init__(
        self,
        model_path: str,
        adapter: AdapterSpec,
        *,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        from peft import LoraConfig, get_peft_model

        self.model_path = model_path
        self.adapter_spec = adapter
        self.seed = seed
        self.device = resolve_device(device)
        self.dtype = dtype
        base, self.tokenizer = load_causal_lm(
            model_path, quantize_4bit=self.quantize_4bit, dtype=dtype, device=self.device
        )
        base = self._prepare_base(base)
        lcfg = LoraConfig(
            r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=list(adapter.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with self._rng_guard(seed), warnings.catch_warnings():
            # peft calls a transformers API deprecated in v5 (is_gradient_checkpointing)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            try:
                self.model = get_peft_model(base, lcfg, adapter_name=ADAPTER_NAME)
            except ValueError as exc:  # e.g. target modules not found
                raise ValueError(f"cannot attach LoRA {adapter.model_dump()} to {model_path}: {exc}") from exc
        self.model.eval()
        self._params: dict[str, torch.nn.Parameter] = {}
        for pname, p in self.model.named_parameters():
            if p.requires_grad:
                self._params[pname.replace(f".{ADAPTER_NAME}.", ".")] = p
        if not self._params:
            raise ValueError(f"LoRA {adapter.model_dump()} on {model_path} has no trainable parameters")
        self._init_lora(seed)
        if adapter.freeze_a:
            for pname, p in self._params.items():
                if ".lora_A." in pname:
                    p.requires_grad_(False)  # still part of the adapter: it travels in the global
        self._token_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        # Memory plan (edge_agent.memory.planner): examples per forward/backward (None: the whole
        # batch), and a guard measuring every step (edge_agent.memory.guard.MemoryGuard).
        self.micro_batch: int | None = None
        self.guard: Any = None
        self._eos = self.tokenizer.eos_token_id
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos

    # -- hooks --------------------------------------------------------------------------------
    def _prepare_base(self, model: Any) -> Any:
        """Called on the loaded base before the adapter is attached."""
        return model

    def _before_train(self) -> None:
        """Called at the start of every ``fit``."""

    # -- RNG ----------------------------------------------------------------------------------
    def _rng_devices(self) -> list[int]:
        if self.device.startswith("cuda"):
            return [torch.device(self.device).index or torch.cuda.current_device()]
        return []

    @contextlib.contextmanager
    def _rng_guard(self, seed: int) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed % (2**63))
            yield

    def _init_lora(self, seed: int) -> None:
        """kaiming-uniform(a=sqrt(5)) lora_A (peft's default: U(-1/sqrt(fan_in), +)), zero
        lora_B, drawn in float32 on a private CPU generator: same init on every device."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed % (2**63))
        with torch.no_grad():
            for pname, p in self._params.items():
                if ".lora_A." in pname:
                    fan_in = p.shape[1]
                    bound = 1.0 / math.sqrt(fan_in)
                    w = torch.rand(p.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
                    p.copy_(w.to(p.device, p.dtype))
                elif ".lora_B." in pname:
                    p.zero_()

    # -- adapter I/O --------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self._params)

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self._params.values())

    def get_adapter(self) -> dict[str, np.ndarray]:
        return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in self._params.items()}

    def set_adapter(self, tensors: Mapping[str, Any]) -> None:
        """Load adapter tensors (all of them); validated first, so nothing changes on error."""
        unknown = sorted(set(tensors) - set(self._params))
        if unknown:
            raise ValueError(f"unknown adapter tensor {unknown[0]!r} ({len(unknown)} unknown)")
        missing = [n for n in self._params if n not in tensors]
        if missing:
            raise ValueError(f"missing adapter tensor {missing[0]!r} ({len(missing)} missing)")
        staged: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for n, p in self._params.items():
            try:
                arr = np.asarray(tensors[n], dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"adapter tensor {n!r} is not numeric: {exc}") from None
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(f"adapter tensor {n!r} has shape {tuple(arr.shape)}, expected {tuple(p.shape)}")
            if not np.isfinite(arr).all():
                raise ValueError(f"adapter tensor {n!r} has non-finite values")
            staged.append((p, torch.from_numpy(np.ascontiguousarray(arr))))
        with torch.no_grad():
            for p, t in staged:
                p.copy_(t.to(p.device, p.dtype))

    # -- tokenization -------------------------------------------------------------------------
    def _token_ids(self, ex: Example) -> tuple[list[int], list[int]]:
        key = (ex.prompt, ex.response)
        hit = self._token_cache.get(key)
        if hit is None:
            p = self.tokenizer(format_prompt(ex.prompt))["input_ids"]
            r = self.tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [self._eos]
            if len(self._token_cache) >= _TOKEN_CACHE_MAX:
                self._token_cache.clear()
            hit = self._token_cache[key] = (list(p), list(r))
        return hit

    def _encode(self, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels); prompt labels -100. Too long: the prompt loses its beginning
        (keeping at least half the window) and the response its end."""
        p, r = self._token_ids(ex)
        if len(p) + len(r) > max_len:
            keep_p = min(len(p), max(max_len - len(r), max_len // 2))
            p = p[len(p) - keep_p:]
            r = r[: max_len - keep_p]
        return p + r, [-100] * len(p) + r

    def _collate(self, encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in encoded)
        n = len(encoded)
        input_ids = torch.full((n, width), self._pad, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attn[i, : len(ids)] = 1
        dev = self._input_device()
        return {"input_ids": input_ids.to(dev), "attention_mask": attn.to(dev), "labels": labels.to(dev)}

    def _input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # -- training -----------------------------------------------------------------------------
    def fit(
        self,
        examples: Sequence[Example],
        cfg: FitConfig,
        *,
        progress: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> FitResult:
        """``cfg.local_steps`` AdamW steps on batches drawn without replacement (reshuffled each
        pass) by ``random.Random(cfg.seed)``. ``progress(step, loss)`` after each step (1-based);
        ``should_stop()`` is checked before each step. With ``self.micro_batch`` smaller than the
        batch, gradients are accumulated over micro-batches (each loss weighted by its share of the
        batch's response tokens: the same objective as one pass). ``self.guard`` (if set) is called
        around each step and may stop the round by raising ``OverBudget``."""
        if not examples:
            raise ValueError("fit needs at least one example")
        self._before_train()
        encoded = [self._encode(ex, cfg.max_seq_len) for ex in examples]
        rng = random.Random(cfg.seed)
        order: list[int] = []
        params = [p for p in self._params.values() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        losses: list[float] = []
        tokens = 0
        t0 = time.perf_counter()
        self.model.train()
        try:
            with self._rng_guard(cfg.seed):
                for step in range(cfg.local_steps):
                    if should_stop is not None and should_stop():
                        break
                    idx = []
                    while len(idx) < min(cfg.batch_size, len(encoded)):
                        if not order:
                            order = list(range(len(encoded)))
                            rng.shuffle(order)
                        idx.append(order.pop())
                    if self.guard is not None:
                        self.guard.before_step(step + 1)
                    opt.zero_grad(set_to_none=True)
                    lv, n_tok = self._accumulate([encoded[i] for i in idx], step)
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    if self.guard is not None:
                        self.guard.after_step(step + 1)
                    losses.append(lv)
                    tokens += n_tok
                    if progress is not None:
                        progress(step + 1, lv)
        finally:
            self.model.eval()
            opt.zero_grad(set_to_none=True)
            del opt
            _release_memory()
        return FitResult(
            num_samples=len(examples),
            steps=len(losses),
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            seconds=time.perf_counter() - t0,
            tokens=tokens,
        )

    def _accumulate(self, rows: Sequence[tuple[list[int], list[int]]], step: int) -> tuple[float, int]:
        """Forward and backward of one batch, in micro-batches of ``self.micro_batch`` rows.
        Returns (the batch's loss, non-pad tokens)."""
        mb = self.micro_batch or len(rows)
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

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], cfg: FitConfig) -> tuple[float, int]:
        """Token-weighted mean loss over response tokens, in order, batches of cfg.batch_size
        (only the first ``cfg.eval_batches`` when > 0). Returns (loss, examples evaluated)."""
        if not examples:
            raise ValueError("evaluate needs at least one example")
        bs = cfg.batch_size
        n = len(examples)
        if cfg.eval_batches > 0:
            n = min(n, cfg.eval_batches * bs)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        chunk = min(bs, self.micro_batch or bs)  # the memory plan's micro-batch bounds the logits
        try:
            for start in range(0, n, chunk):
                rows = examples[start:min(start + chunk, n)]
                batch = self._collate([self._encode(ex, cfg.max_seq_len) for ex in rows])
                labels = batch.pop("labels")
                logits = self.model(**batch).logits[:, :-1].float()
                target = labels[:, 1:]
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"))
                count += int((target != -100).sum())
        finally:
            if was_training:
                self.model.train()
        return (total / count if count else float("nan")), n

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model_path!r}, r={self.adapter_spec.r}, "
                f"device={self.device!r}, trainable={self.num_trainable_params()})")
