"""Zeroth-order training (FedKSeed client rule with MeZO in-place perturbation).

Two targets: every parameter of a full-precision model (``full``), or only the LoRA parameters on a
4-bit NF4 base (``lora``). Memory stays at inference level: the model runs in eval mode under
``torch.no_grad`` and z is never materialised: ``zo_directions`` draws each element from a
counter-based generator keyed by ``param_seed(seed, parameter index)`` and adds it in the same pass.

One step, seed s drawn from the K candidates: theta += eps z; L+; theta -= 2 eps z; L-;
g = (L+ - L-) / (2 eps); theta += (eps - lr g) z (restore and SGD update fused in one pass, itself
folded element by element into the next step's +eps pass: three draws of z per step, two trips
through memory). A ledger round is replayed as theta += (-lr g_sum) z(s) in ascending index order.
Every update is two exactly rounded element-wise operations in a fixed order per element, so the
result depends neither on how elements are split across threads nor on the machine.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from edge_agent.data import Example
from edge_agent.methods import zo_directions
from edge_agent.methods.base import (
    FULL_PRECISION,
    NF4,
    NO_PLAN,
    FitMemory,
    FitResult,
    ModelLoader,
    ProgressFn,
    Row,
    StopFn,
    release_memory,
)
from edge_agent.methods.causal_lm import CausalLmMethod
from edge_agent.models import model_fingerprint
from fedmq_protocol.messages import AdapterSpec, FitConfig
from fedmq_protocol.modes.zo import ZoLedgerRound, ZoSpec, candidate_seeds, param_seed

# parameters that are not float32 on the CPU get z through a float32 staging buffer of this size
STAGING_ELEMENTS = 1 << 20


def draw_direction(seed: int, param_index: int, numel: int, direction: str) -> torch.Tensor:
    """The whole z of one parameter (float32, CPU), for tests and references."""
    return torch.from_numpy(zo_directions.draw(param_seed(seed, param_index), numel, direction))


class _Perturber:
    """theta_i += coef * z_i(seed) for every trainable parameter, split over worker threads.

    Elements are independent, so the work is cut into equal element ranges (any cut gives the same
    bits); the numba kernels release the GIL."""

    def __init__(self, params: Sequence[torch.Tensor], workers: int, backend: str | None = None) -> None:
        self.params = list(params)
        total = sum(p.numel() for p in self.params)
        self.backend = backend or zo_directions.backend_for(total)
        if self.backend == "numpy":
            workers = 1  # numpy holds the GIL for much of a draw: threads would only contend
        self.workers = max(1, min(workers, total // 65536 or 1))
        # (param index, first element, end) ranges per worker, about total / workers elements each
        share = -(-total // self.workers)
        self.ranges: list[list[tuple[int, int, int]]] = [[] for _ in range(self.workers)]
        w, room = 0, share
        for i, p in enumerate(self.params):
            start, n = 0, p.numel()
            while start < n:
                take = min(room, n - start)
                self.ranges[w].append((i, start, start + take))
                start += take
                room -= take
                if room == 0 and w + 1 < self.workers:
                    w, room = w + 1, share
        self._staging = threading.local()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="zo") if self.workers > 1 else None

    def _run(self, ranges: list[tuple[int, int, int]], terms: Sequence[tuple[int, float]], direction: str) -> None:
        for i, lo, hi in ranges:
            p = self.params[i]
            keys = [(param_seed(seed, i), coef) for seed, coef in terms]
            flat = p.detach().view(-1)
            if p.dtype == torch.float32 and p.device.type == "cpu":
                zo_directions.add_terms(flat[lo:hi].numpy(), lo, keys, direction, self.backend)
                continue
            # z is defined in float32 on the CPU: scale there, then cast, move and add, term by term
            buf = getattr(self._staging, "buf", None)
            if buf is None:
                buf = self._staging.buf = np.empty(STAGING_ELEMENTS, dtype=np.float32)
            for off in range(lo, hi, STAGING_ELEMENTS):
                m = min(STAGING_ELEMENTS, hi - off)
                for key, coef in keys:
                    zo_directions.fill_scaled(buf[:m], off, key, coef, direction, self.backend)
                    flat[off:off + m].add_(torch.from_numpy(buf[:m]).to(p.device, p.dtype))

    def add(self, terms: Sequence[tuple[int, float]], direction: str) -> None:
        """theta += sum over terms (seed, coef) of coef * z(seed), terms applied in order."""
        with torch.no_grad():
            if self.pool is None:
                self._run(self.ranges[0], terms, direction)
                return
            futures = [self.pool.submit(self._run, r, terms, direction) for r in self.ranges]
            for f in futures:
                f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class ZoMethod(CausalLmMethod):
    """FedKSeed client. ``target`` "full": all parameters of a float32 model; "lora": the LoRA
    parameters of an NF4 base (QLoRA's loading). The trainable state is those parameters."""

    name: ClassVar[str] = "zo"

    def __init__(
        self,
        model_path: str,
        adapter: AdapterSpec,
        *,
        target: str = "full",
        workers: int | None = None,
        backend: str | None = None,
        loader: ModelLoader | None = None,
        **common: Any,
    ) -> None:
        """``backend``: how directions are drawn, ``numba`` kernels or ``numpy`` (the same bits);
        by default numpy up to ``zo_directions.NUMPY_MAX_ELEMENTS`` trainable elements.
        ``loader``: by default a float32 base for ``full``, an NF4 base for ``lora``. ``common``:
        CausalLmMethod's keywords (device, dtype, seed)."""
        if target not in ("full", "lora"):
            raise ValueError(f"zo target must be 'full' or 'lora', got {target!r}")
        self.target = target
        if loader is None:
            loader = NF4 if target == "lora" else FULL_PRECISION
        super().__init__(model_path, adapter, loader=loader, **common)
        self.fingerprint = model_fingerprint(model_path)
        if workers is None:
            workers = min(4, torch.get_num_threads())
        self._perturb = _Perturber(list(self._params.values()), workers, backend)
        if self._perturb.backend == "numba":
            zo_directions.kernels_ready()  # compile once here, not inside the first timed step
        self._seeds_cache: tuple[tuple[int, int], list[int]] | None = None
        self._pending: list[tuple[int, float]] = []
        self._pending_direction = "gaussian"
        self.last_pool: dict[int, float] = {}

    def _build(self, base: Any) -> tuple[Any, dict[str, torch.nn.Parameter]]:
        if self.target == "lora":
            model, params = self._attach_lora(base)
        else:
            model = base
            model.eval()
            params = {}
            seen: set[int] = set()
            for pname, p in model.named_parameters():
                if id(p) not in seen:  # tied weights (embeddings / lm_head) count once
                    seen.add(id(p))
                    params[pname] = p
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        return model, params

    # -- seeds ----------------------------------------------------------------------------------
    def candidate_seeds(self, spec: ZoSpec) -> list[int]:
        key = (spec.seed, spec.num_seeds)
        if self._seeds_cache is None or self._seeds_cache[0] != key:
            self._seeds_cache = (key, candidate_seeds(spec.seed, spec.num_seeds))
        return self._seeds_cache[1]

    def perturb(self, seed: int, coef: float, direction: str) -> None:
        """theta += coef * z(seed) over every trainable parameter."""
        self._perturb.add([(seed, coef)], direction)

    # -- local training -------------------------------------------------------------------------
    @torch.no_grad()
    def _loss(self, batch: dict[str, torch.Tensor], micro_batch: int | None = None) -> float:
        """The batch's mean response-token loss; with a memory plan's ``micro_batch`` smaller than
        the batch, computed in chunks (token-weighted: the same value, less activation memory)."""
        mb = micro_batch
        n = batch["input_ids"].shape[0]
        if not mb or mb >= n:
            return float(self.model(**batch).loss)
        total, count = 0.0, 0
        for s in range(0, n, mb):
            part = {k: v[s:s + mb] for k, v in batch.items()}
            k = int((part["labels"][:, 1:] != -100).sum())
            if k:
                total += float(self.model(**part).loss) * k
                count += k
        return total / count if count else float("nan")

    def step(self, batch: dict[str, torch.Tensor], seed: int, spec: ZoSpec,
             micro_batch: int | None = None) -> tuple[float, float]:
        """One ZO-SGD step along z(seed): returns (projected gradient g, mean of the two losses).

        The step's last pass (restore + update, theta += (eps - lr g) z) is deferred and folded into
        the next step's +eps pass, chunk by chunk, so theta streams through memory twice per step;
        ``flush()`` applies a deferred pass (``fit`` does at its end)."""
        eps, lr = spec.eps, spec.lr
        if self._pending and self._pending_direction != spec.direction:
            self.flush()
        self._perturb.add([*self._pending, (seed, eps)], spec.direction)
        self._pending = []
        l_plus = self._loss(batch, micro_batch)
        self.perturb(seed, -2.0 * eps, spec.direction)
        l_minus = self._loss(batch, micro_batch)
        if not (np.isfinite(l_plus) and np.isfinite(l_minus)):
            self.perturb(seed, eps, spec.direction)
            raise FloatingPointError("non-finite zo loss")
        g = (l_plus - l_minus) / (2.0 * eps)
        self._pending = [(seed, eps - lr * g)]
        self._pending_direction = spec.direction
        return g, 0.5 * (l_plus + l_minus)

    def flush(self) -> None:
        """Apply a deferred restore + update pass of the last ``step``."""
        if self._pending:
            self._perturb.add(self._pending, self._pending_direction)
            self._pending = []

    def fit(
        self,
        examples: Sequence[Example],
        cfg: FitConfig,
        *,
        memory: FitMemory | None = None,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        spec: ZoSpec | None = None,
        probabilities: np.ndarray | None = None,
    ) -> FitResult:
        """``cfg.local_steps`` ZO-SGD steps along seeds drawn from ``spec``'s K candidates (by
        ``probabilities`` when given, FedKSeed-Pro); the seed pool is left in ``self.last_pool``
        (candidate index -> accumulated g)."""
        if spec is None:
            raise ValueError("zo fit needs the federation's ZoSpec")
        if not examples:
            raise ValueError("fit needs at least one example")
        plan = memory or NO_PLAN
        guard = plan.guard  # edge_agent.memory.MemoryGuard, when a memory plan runs
        seeds = self.candidate_seeds(spec)
        encoded = [self._encode(ex, cfg.max_seq_len) for ex in examples]
        seed_rng = random.Random(f"zo-seeds:{cfg.seed}")
        weights = None if probabilities is None else probabilities.tolist()
        pool: dict[int, float] = {}

        def step(i: int, rows: list[Row]) -> tuple[float, int]:
            batch = self._collate(rows)
            k = (seed_rng.randrange(spec.num_seeds) if weights is None
                 else seed_rng.choices(range(spec.num_seeds), weights=weights)[0])
            if guard is not None:
                guard.before_step(i + 1)
            try:
                g, lv = self.step(batch, seeds[k], spec, plan.micro_batch)
            except FloatingPointError as exc:
                raise FloatingPointError(f"{exc} at step {i + 1}") from None
            if guard is not None:
                guard.after_step(i + 1)
            pool[k] = pool.get(k, 0.0) + g
            return lv, 2 * int(batch["attention_mask"].sum())

        t0 = time.perf_counter()
        self.model.eval()
        try:
            losses, tokens = self._train_steps(encoded, cfg, step, progress=progress, should_stop=should_stop)
        finally:
            self.flush()
            release_memory()
        self.last_pool = pool
        return self._result(examples, losses, tokens, t0)

    # -- ledger replay --------------------------------------------------------------------------
    def check_spec(self, spec: ZoSpec) -> None:
        if spec.target != self.target:
            raise ValueError(f"ledger trains target {spec.target!r}; this method holds {self.target!r}")
        if spec.base_fingerprint is not None and spec.base_fingerprint != self.fingerprint:
            raise ValueError(f"ledger base {spec.base_fingerprint} differs from this device's {self.fingerprint}")

    def apply_round(self, entry: ZoLedgerRound) -> int:
        """Replay one ledger round; returns the number of seeds applied."""
        self.check_spec(entry.spec)
        self.flush()
        seeds = self.candidate_seeds(entry.spec)
        terms = [(seeds[k], -entry.spec.lr * g) for k, g in entry.entries() if g != 0.0]  # ascending index
        # All terms in one trip over theta, each block updated term after term in canonical order:
        # every element sees the same sequence of rounded ops as one pass per term.
        self._perturb.add(terms, entry.spec.direction)
        return len(terms)

    # -- exact return to the pre-round weights ---------------------------------------------------
    def snapshot(self, path: str | Path) -> None:
        """Write the trainable parameters to ``path`` (restored bit for bit by ``restore``)."""
        self.flush()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({str(i): p.detach() for i, p in enumerate(self._params.values())}, tmp)
        os.replace(tmp, path)

    def restore(self, path: str | Path) -> None:
        self._pending = []  # a deferred local pass is moot: the snapshot replaces theta
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        with torch.no_grad():
            for i, p in enumerate(self._params.values()):
                p.copy_(state[str(i)])
        del state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return dict(self._params)

    def param_digest(self) -> str:
        """blake2b of the trainable parameters' bytes, in order: equal digests, equal weights."""
        import hashlib

        self.flush()
        h = hashlib.blake2b(digest_size=16)
        for p in self._params.values():
            t = p.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            h.update(t.contiguous().view(torch.uint8).numpy().data if t.dtype != torch.bfloat16
                     else t.contiguous().view(torch.int16).numpy().tobytes())
        return h.hexdigest()

    def get_state(self) -> dict[str, np.ndarray]:
        self.flush()
        return super().get_state()

    def set_state(self, tensors: Mapping[str, Any]) -> None:
        super().set_state(tensors)
        self._pending = []  # a deferred local pass is moot: the new state replaces theta

    def __repr__(self) -> str:
        return f"ZoMethod(model={self.model_path!r}, target={self.target}, trainable={self.num_trainable_params()})"
