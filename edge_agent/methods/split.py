"""The device's trainer of split learning (U-shape): head and tail blocks here, the middle on the split server.

The model holds the embedding, the first ``l_head`` blocks, the last ``l_tail`` blocks, the final
norm and the LM head (``edge_agent.methods.split_model``), with LoRA on those blocks: the trainable state
(``get_state``), averaged through the coordinator like any adapter. One step (AdamW, the same
settings as the LoRA trainer):

head forward -> hidden state up (``SplitLink.forward``) -> hidden state at the tail cut back ->
tail forward, loss, backward -> its gradient up (``SplitLink.backward``; the server steps its
adapter) -> the gradient at the head cut back -> head backward -> clip, step.

Evaluation runs the same path with ``evaluate`` requests. ``link`` is set by the split mode
(``edge_agent.modes.split``) before any fit or evaluation. ``last_stats``: what the last fit or
evaluation cost (device compute, exchanges, bytes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from edge_agent.data import Example
from edge_agent.methods.base import NO_PLAN, FitMemory, FitResult, ProgressFn, Row, StopFn, release_memory
from edge_agent.methods.causal_lm import CausalLmMethod
from edge_agent.methods.split_model import Cut, DeviceParts, attach_lora, check_splittable, keep_blocks
from edge_agent.split_link import SplitStepFailed
from fedmq_protocol.messages import AdapterSpec, FitConfig

if TYPE_CHECKING:
    from edge_agent.split_link import SplitLink

log = logging.getLogger("fedmq.agent.split")


class SplitMethod(CausalLmMethod):
    name: ClassVar[str] = "split"

    def __init__(self, model_path: str, adapter: AdapterSpec, *, l_head: int = 2, l_tail: int = 2,
                 **common: Any) -> None:
        self.l_head, self.l_tail = l_head, l_tail
        self.link: SplitLink | None = None
        self.last_stats: dict[str, float] = {}
        super().__init__(model_path, adapter, **common)

    def _build(self, base: Any) -> tuple[Any, dict[str, torch.nn.Parameter]]:
        self.cut = Cut(check_splittable(base, self.model_path), self.l_head, self.l_tail)
        with self._rng_guard(self.seed):
            model, params = attach_lora(base, self.adapter_spec, self.seed, self.model_path)
        params = keep_blocks(model, params, self.cut.device_layers, embedding=True, head=True)
        self.parts = DeviceParts(model, self.cut)
        release_memory()
        return model, params

    def _need_link(self) -> SplitLink:
        if self.link is None:
            raise SplitStepFailed("split trainer has no link to a split server")
        return self.link

    # -- training -----------------------------------------------------------------------------
    def fit(self, examples: Sequence[Example], cfg: FitConfig, *, memory: FitMemory | None = None,
            progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> FitResult:
        """``cfg.local_steps`` split steps (whole batches: the plan's micro-batch is not used, the
        server sees one exchange per step). A step that gets no answer ends the fit: the steps
        done are the update (SplitStepFailed when there are none)."""
        if not examples:
            raise ValueError("fit needs at least one example")
        link = self._need_link()
        guard = (memory or NO_PLAN).guard
        encoded = [self._encode(ex, cfg.max_seq_len) for ex in examples]
        params = [p for p in self._params.values() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        compute = [0.0]

        def step(i: int, rows: list[Row], opt: torch.optim.Optimizer = opt) -> tuple[float, int]:
            if guard is not None:
                guard.before_step(i + 1)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            batch = self._collate(rows)
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            h_head = self.parts.head(ids, mask)
            up = h_head.detach().to("cpu", torch.float32).numpy()
            mask_np = mask.to("cpu").numpy()
            compute[0] += time.perf_counter() - t0
            h_tail = link.forward(i, up, mask_np)
            t1 = time.perf_counter()
            down = torch.from_numpy(h_tail).to(h_head.device, h_head.dtype).requires_grad_(True)
            loss = self.parts.tail_loss(down, mask, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {i + 1}")
            loss.backward()
            assert down.grad is not None
            g_tail = down.grad.detach().to("cpu", torch.float32).numpy()
            compute[0] += time.perf_counter() - t1
            g_head = link.backward(i, g_tail, redo=lambda: link.forward(i, up, mask_np))
            t2 = time.perf_counter()
            h_head.backward(torch.from_numpy(g_head).to(h_head.device, h_head.dtype))
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            compute[0] += time.perf_counter() - t2
            if guard is not None:
                guard.after_step(i + 1)
            return float(loss.detach()), int(mask.sum())

        failed: list[str] = []

        def stop() -> bool:
            return bool(failed) or (should_stop is not None and should_stop())

        def guarded(i: int, rows: list[Row]) -> tuple[float, int]:
            try:
                return step(i, rows)
            except SplitStepFailed as exc:
                if i == 0:
                    raise
                failed.append(str(exc))
                return float("nan"), 0

        t0 = time.perf_counter()
        self.model.train()
        try:
            with self._rng_guard(cfg.seed):
                losses, tokens = self._train_steps(encoded, cfg, guarded, progress=progress, should_stop=stop)
        finally:
            self.model.eval()
            opt.zero_grad(set_to_none=True)
            del opt
            release_memory()
        if failed:
            log.warning("fit ended after %d of %d steps: %s", len(losses) - 1, cfg.local_steps, failed[0])
            losses = losses[:-1]
        result = self._result(examples, losses, tokens, t0)
        self.last_stats = {**link.stats.metrics(), "device_compute_s": compute[0]}
        return result

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], cfg: FitConfig, *,
                 memory: FitMemory | None = None) -> tuple[float, int]:
        """Token-weighted mean response loss through the split path (``evaluate`` requests)."""
        if not examples:
            raise ValueError("evaluate needs at least one example")
        link = self._need_link()
        bs = cfg.batch_size
        n = min(len(examples), cfg.eval_batches * bs) if cfg.eval_batches > 0 else len(examples)
        total, count = 0.0, 0
        for b, start in enumerate(range(0, n, bs)):
            batch = self._collate([self._encode(ex, cfg.max_seq_len) for ex in examples[start:min(start + bs, n)]])
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            h = self.parts.head(ids, mask)
            back = link.forward(b, h.to("cpu", torch.float32).numpy(), mask.to("cpu").numpy(), phase="evaluate")
            down = torch.from_numpy(back).to(h.device, h.dtype)
            total += float(self.parts.tail_loss(down, mask, labels, reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
        self.last_stats = link.stats.metrics("eval_split_")
        return (total / count if count else float("nan")), n


def stats_of(method: Any) -> dict[str, float]:
    stats = getattr(method, "last_stats", None)
    return {k: float(v) for k, v in stats.items() if np.isfinite(v)} if isinstance(stats, dict) else {}


METHOD = SplitMethod
